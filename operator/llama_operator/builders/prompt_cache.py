"""The prompt caches a server keeps across pod restarts (spec.promptCache.persist): where they live, and what the
llama-server container and the drain sidecar get for them.

They live in the served model's PersistentVolumeClaim cache, in `slots/<server>/` (the fetcher creates it):
llama-server writes a slot's state there on the sidecar's call (`--slot-save-path`), the sidecar lists, restores
and prunes the files (drain.py, slotstore.py). Each file name starts with the model's key, so a server whose model
changed never restores another model's state; the directory is the server's, in a claim of its own namespace.
What rules out other caches (EmptyDir dies with the pod, HostPath is the node's disk): flags/spec.py.

Router mode (spec.models): the directory is on the claim of the first entry's LlamaModel (the home model), and each
model gets a directory of its own below it, named by its key (`slots/<server>/<key>`, the preset's
`slot-save-path` for that model): the gateway saves and restores a model's slots there through llama-server's API
by fixed names (gateway/room.py), without listing files, and a model never reads another's directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
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
    """One model: its key. Router mode: the home model's (the claim's owner)."""
    max_bytes: int
    volume: str = CACHE_VOLUME
    """The pod's volume of the claim (router mode: the home model's cache volume)."""
    model_keys: tuple[str, ...] = ()
    """Router mode: every model's key, each once, in spec order: a directory each below the server's."""

    @property
    def mount(self) -> dict[str, Any]:
        """The server's directory, read-write, in llama-server and in the sidecar."""
        return {"name": self.volume, "mountPath": SLOTS_MOUNT, "subPath": self.subpath}

    @property
    def make_dirs(self) -> tuple[str, ...]:
        """What the (home model's) fetcher creates before llama-server starts: llama-server refuses a
        slot-save-path that is not a directory."""
        return (self.subpath, *(f"{self.subpath}/{key}" for key in self.model_keys))

    def sidecar_args(self) -> list[str]:
        if self.model_keys:
            return ["--slots-dir", SLOTS_MOUNT, "--model-keys", ",".join(self.model_keys),
                    "--slots-max-bytes", str(self.max_bytes)]
        return ["--slots-dir", SLOTS_MOUNT, "--slot-key", self.key, "--slots-max-bytes", str(self.max_bytes)]


def model_slot_path(key: str) -> str:
    """Router mode: the slot-save-path of a model whose key is `key`, in llama-server."""
    return f"{SLOTS_MOUNT}/{key}"


def kept_slots(server: LlamaServer, model: LlamaModel) -> KeptSlots | None:
    """The kept prompt caches of a one-model server, or None when it keeps none."""
    if not server.spec.keeps_prompt_cache():
        return None
    assert server.spec.prompt_cache is not None
    return KeptSlots(subpath=slots_directory(server), key=model_key(model),
                     max_bytes=int(parse_quantity(server.spec.prompt_cache.max_size)))


def home_model(server: LlamaServer) -> str:
    """Router mode: the LlamaModel on whose claim the kept prompt caches of every model live (the first entry's)."""
    assert server.spec.models
    return server.spec.models[0].model_ref.name


def router_kept_slots(server: LlamaServer, models: Mapping[str, LlamaModel], volume: str) -> KeptSlots | None:
    """The kept prompt caches of a router-mode server (`volume`: the pod's volume of the home model's cache), or
    None when it keeps none."""
    if not server.spec.keeps_prompt_cache() or not server.spec.models:
        return None
    assert server.spec.prompt_cache is not None
    keys = tuple(dict.fromkeys(model_key(models[entry.model_ref.name]) for entry in server.spec.models))
    return KeptSlots(subpath=slots_directory(server), key=model_key(models[home_model(server)]),
                     max_bytes=int(parse_quantity(server.spec.prompt_cache.max_size)), volume=volume,
                     model_keys=keys)


def room_problem(server: LlamaServer, model: LlamaModel) -> str | None:
    """Whether the model's claim has promptCache.maxSize of room beyond the model's files (with its projector):
    saved slots filling it would fail the saves and the next revision's download."""
    size = cache_size(model)
    if not server.spec.keeps_prompt_cache() or size is None or not model.status.size:
        return None
    assert server.spec.prompt_cache is not None
    max_bytes = int(parse_quantity(server.spec.prompt_cache.max_size))
    files = model.status.size + ((model.status.mmproj.size or 0) if model.status.mmproj is not None else 0)
    room = int(parse_quantity(size)) - files
    if room >= max_bytes:
        return None
    return (f"spec.promptCache.maxSize: {server.spec.prompt_cache.max_size if server.spec.prompt_cache else ''} "
            f"does not fit LlamaModel {model.metadata.name}'s cache ({size}, {files / 2**30:.1f} GiB of it the "
            f"model's files): set its cache.size to at least {gibibytes_ceil(files + max_bytes)}, or a "
            "smaller maxSize")
