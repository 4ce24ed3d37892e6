"""The prompt caches a server keeps across pod restarts (spec.promptCache.persist): where they live, and what the
llama-server container and the drain sidecar get for them.

They live in the served model's PersistentVolumeClaim cache, in `slots/<server>/` (the fetcher creates it):
llama-server writes a slot's state there on the sidecar's call (`--slot-save-path`), the sidecar lists, restores
and prunes the files (drain.py, slotstore.py). Each file name starts with the model's key, so a server whose model
changed never restores another model's state; the directory is the server's, in a claim of its own namespace.
What rules out other caches (EmptyDir dies with the pod, HostPath is the node's disk): flags/spec.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ..api.v1beta1 import LlamaModel, LlamaServer
from ..contract import CACHE_VOLUME, SLOTS_DIR, SLOTS_MOUNT
from .cache import cache_size
from .quantity import gibibytes_ceil, parse_quantity


def slots_directory(server: LlamaServer) -> str:
    """The server's directory below the cache root."""
    return f"{SLOTS_DIR}/{server.metadata.name}"


def model_key(model: LlamaModel) -> str:
    """16 hex digits naming the model's weights: its sha256 when known, else its cache key and file (a source
    without a published sha256 is pinned by its cache key)."""
    sha256 = model.status.sha256 or model.spec.sha256
    if sha256:
        return sha256.lower()[:16]
    return hashlib.sha256(f"{model.status.cache_key}/{model.first_file}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KeptSlots:
    """What the pod of a server keeping its prompt caches needs beyond the usual."""

    subpath: str
    key: str
    max_bytes: int

    @property
    def mount(self) -> dict[str, Any]:
        """The server's directory, read-write, in llama-server and in the sidecar."""
        return {"name": CACHE_VOLUME, "mountPath": SLOTS_MOUNT, "subPath": self.subpath}

    def sidecar_args(self) -> list[str]:
        return ["--slots-dir", SLOTS_MOUNT, "--slot-key", self.key, "--slots-max-bytes", str(self.max_bytes)]


def kept_slots(server: LlamaServer, model: LlamaModel) -> KeptSlots | None:
    """The kept prompt caches of a one-model server, or None when it keeps none."""
    if not server.spec.keeps_prompt_cache():
        return None
    assert server.spec.prompt_cache is not None
    return KeptSlots(subpath=slots_directory(server), key=model_key(model),
                     max_bytes=int(parse_quantity(server.spec.prompt_cache.max_size)))


def room_problem(server: LlamaServer, model: LlamaModel) -> str | None:
    """Whether the model's claim has promptCache.maxSize of room beyond the model's files (with its projector):
    saved slots filling it would fail the saves and the next revision's download."""
    kept = kept_slots(server, model)
    size = cache_size(model)
    if kept is None or size is None or not model.status.size:
        return None
    files = model.status.size + ((model.status.mmproj.size or 0) if model.status.mmproj is not None else 0)
    room = int(parse_quantity(size)) - files
    if room >= kept.max_bytes:
        return None
    return (f"spec.promptCache.maxSize: {server.spec.prompt_cache.max_size if server.spec.prompt_cache else ''} "
            f"does not fit LlamaModel {model.metadata.name}'s cache ({size}, {files / 2**30:.1f} GiB of it the "
            f"model's files): set its cache.size to at least {gibibytes_ceil(files + kept.max_bytes)}, or a "
            "smaller maxSize")
