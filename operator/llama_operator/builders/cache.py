"""The model cache: which volume holds the GGUF files, where it is mounted, and how big it is.

A HostPath cache is always a directory below the operator's root (`<hostPathRoot>/<cache.path>`): the fetcher
mounts that directory (it writes `<cacheKey>/` and its lock there), llama-server only its models' own
`<cacheKey>` subdirectories (subPath, read-only), so a pod running a tenant's image never sees another model's
files on the node. Every EmptyDir has a sizeLimit: the cache's size, else the model's plus headroom, else the
fetcher's cap on downloads of unknown size.
"""

from __future__ import annotations

import posixpath
from typing import Any

from ..api.v1beta1 import CacheType, LlamaModel
from ..config import Settings
from ..contract import CACHE_MOUNT, CACHE_VOLUME, SOURCE_MOUNT, SOURCE_VOLUME
from ..fetch.plan import DEFAULT_MAX_UNKNOWN_SIZE
from .quantity import gibibytes_ceil, parse_quantity

HEADROOM = 1.1
"""Cache sizes derived from the model size leave 10% (and at least 1 GiB) for .part files and markers."""
TMP_SIZE_LIMIT = "1Gi"
"""sizeLimit of the pod's /tmp EmptyDir (llama-server's HOME, the fetcher's scratch)."""
SCRATCH_BYTES = 2 * 2**30
"""Ephemeral storage a pod needs besides its EmptyDir caches: /tmp (TMP_SIZE_LIMIT) and container logs."""


def cache_type(model: LlamaModel, settings: Settings) -> CacheType:
    return model.spec.cache.type or settings.default_cache_type


def cache_pvc_name(model: LlamaModel) -> str:
    return f"{model.metadata.name}-cache"


def _with_headroom(size_bytes: int) -> str:
    return gibibytes_ceil(int(size_bytes * HEADROOM) + 2**30)


def cache_size(model: LlamaModel) -> str | int | None:
    """The cache size: the user's, else the resolved model size (with its projector) plus headroom, else unknown."""
    if model.spec.cache.size is not None:
        return model.spec.cache.size
    if model.status.size:
        projector = model.status.mmproj.size if model.status.mmproj is not None else None
        return _with_headroom(model.status.size + (projector or 0))
    return None


def empty_dir_size(model: LlamaModel, *sharing: LlamaModel) -> str | int:
    """An EmptyDir cache's sizeLimit: the cache size, else room for the largest download of unknown size; plus
    the same for every model fetched into it too (`sharing`: a speculative draft, LoRA adapters)."""
    if sharing:
        return gibibytes_ceil(sum(int(parse_quantity(empty_dir_size(each))) for each in (model, *sharing)))
    size = cache_size(model)
    return size if size is not None else _with_headroom(DEFAULT_MAX_UNKNOWN_SIZE)


def host_path(model: LlamaModel, settings: Settings) -> str:
    """The node directory of a HostPath cache: cache.path below the operator's root (CEL keeps it relative)."""
    relative = (model.spec.cache.path or "").strip("/")
    return posixpath.join(settings.host_path_root, relative) if relative else settings.host_path_root


def model_path(model: LlamaModel) -> str:
    """Path of the (first) GGUF file inside the llama-server container."""
    source = model.spec.source
    if source.volume is not None:
        return f"{SOURCE_MOUNT}/{source.volume.path}"
    return f"{CACHE_MOUNT}/{require_cache_key(model)}/{model.first_file}"


def mmproj_path(model: LlamaModel) -> str | None:
    """Path of the multimodal projector (spec.mmproj) inside the llama-server container: next to the weights."""
    if model.spec.mmproj is None:
        return None
    if model.spec.source.volume is not None:
        return f"{SOURCE_MOUNT}/{model.spec.mmproj.file}"
    return f"{CACHE_MOUNT}/{require_cache_key(model)}/{model.spec.mmproj.file_name}"


def require_cache_key(model: LlamaModel) -> str:
    if not model.status.cache_key:
        raise ValueError(f"LlamaModel {model.metadata.name} has no status.cacheKey yet (not resolved)")
    return model.status.cache_key


def cache_volume(model: LlamaModel, settings: Settings, *, sharing: tuple[LlamaModel, ...] = ()) -> dict[str, Any]:
    """`model`'s cache volume; `sharing`: other models fetched into it (they count in an EmptyDir's sizeLimit)."""
    kind = cache_type(model, settings)
    if kind == "PersistentVolumeClaim":
        return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache_pvc_name(model)}}
    if kind == "HostPath":
        return {"name": CACHE_VOLUME, "hostPath": {"path": host_path(model, settings), "type": "DirectoryOrCreate"}}
    return {"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": empty_dir_size(model, *sharing)}}


def model_volumes(model: LlamaModel, settings: Settings, *, sharing: tuple[LlamaModel, ...] = ()
                  ) -> list[dict[str, Any]]:
    """The volumes the pod needs for the model: the user's PVC (read-only) or the cache (shared with `sharing`)."""
    source = model.spec.source
    if source.volume is not None:
        claim = {"claimName": source.volume.persistent_volume_claim, "readOnly": True}
        return [{"name": SOURCE_VOLUME, "persistentVolumeClaim": claim}]
    return [cache_volume(model, settings, sharing=sharing)]


def cache_mounts(owner: LlamaModel, keys: list[str], settings: Settings, *, volume: str = CACHE_VOLUME,
                 mount: str = CACHE_MOUNT) -> list[dict[str, Any]]:
    """llama-server's read-only mounts of `owner`'s cache volume holding the cache keys `keys`: the whole
    volume, or for a HostPath cache (shared by every model on the node) each key's directory alone."""
    if cache_type(owner, settings) != "HostPath":
        # llama-server only reads the model; mmap of a read-only mount is fine.
        return [{"name": volume, "mountPath": mount, "readOnly": True}]
    return [{"name": volume, "mountPath": f"{mount}/{key}", "subPath": key, "readOnly": True}
            for key in dict.fromkeys(keys)]


def server_model_mounts(model: LlamaModel, settings: Settings, draft: LlamaModel | None = None,
                        adapters: tuple[LlamaModel, ...] = ()) -> list[dict[str, Any]]:
    """llama-server's mounts of the served model (and the draft model, which shares its cache when the served
    model is downloaded, or has a cache of its own when the served model is on a volume; and the LoRA adapters,
    which share a downloaded model's cache)."""
    if model.spec.source.volume is not None:
        mounts = [{"name": SOURCE_VOLUME, "mountPath": SOURCE_MOUNT, "readOnly": True}]
        if draft is not None:
            mounts += cache_mounts(draft, [require_cache_key(draft)], settings)
        return mounts
    keys = [require_cache_key(each) for each in (model, *((draft,) if draft is not None else ()), *adapters)]
    return cache_mounts(model, keys, settings)


def fetcher_ephemeral_storage(caches: list[tuple[LlamaModel, ...]], settings: Settings) -> dict[str, dict[str, str]]:
    """The ephemeral-storage request and limit of a pod's fetchers, `caches` being the pod's cache volumes, each
    as the models fetched into it (its owner first). The kubelet counts every EmptyDir of the pod against the
    largest init container's limit, so the limit is the sum of the EmptyDir caches' sizeLimits plus scratch (a
    download that outgrows it evicts the pod, it does not fill the node's disk); the request, what the scheduler
    reserves, counts only the sizes known."""
    empty = [models for models in caches if cache_type(models[0], settings) == "EmptyDir"]
    known = sum(int(parse_quantity(size)) for models in empty for model in models
                if (size := cache_size(model)) is not None)
    limit = sum(int(parse_quantity(empty_dir_size(*models))) for models in empty)
    return {"requests": {"ephemeral-storage": gibibytes_ceil(known + SCRATCH_BYTES)},
            "limits": {"ephemeral-storage": gibibytes_ceil(limit + SCRATCH_BYTES)}}
