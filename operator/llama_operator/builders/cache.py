"""The model cache: which volume holds the GGUF files, where it is mounted, and how big it is."""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import CacheType, LlamaModel
from ..config import Settings
from ..contract import CACHE_MOUNT, CACHE_VOLUME, SOURCE_MOUNT, SOURCE_VOLUME
from .quantity import gibibytes_ceil

HEADROOM = 1.1
"""Cache sizes derived from the model size leave 10% (and at least 1 GiB) for .part files and markers."""


def cache_type(model: LlamaModel, settings: Settings) -> CacheType:
    return model.spec.cache.type or settings.default_cache_type


def cache_pvc_name(model: LlamaModel) -> str:
    return f"{model.metadata.name}-cache"


def cache_size(model: LlamaModel) -> str | int | None:
    """The cache size: the user's, else the resolved model size plus headroom, else unknown."""
    if model.spec.cache.size is not None:
        return model.spec.cache.size
    if model.status.size:
        return gibibytes_ceil(int(model.status.size * HEADROOM) + 2**30)
    return None


def model_path(model: LlamaModel) -> str:
    """Path of the (first) GGUF file inside the llama-server container."""
    source = model.spec.source
    if source.volume is not None:
        return f"{SOURCE_MOUNT}/{source.volume.path}"
    first = model.status.files[0].name if model.status.files else source.file_name
    return f"{CACHE_MOUNT}/{require_cache_key(model)}/{first}"


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


def cache_volume(model: LlamaModel, settings: Settings) -> dict[str, Any]:
    kind = cache_type(model, settings)
    if kind == "PersistentVolumeClaim":
        return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": cache_pvc_name(model)}}
    if kind == "HostPath":
        path = model.spec.cache.path or settings.host_path_root
        return {"name": CACHE_VOLUME, "hostPath": {"path": path, "type": "DirectoryOrCreate"}}
    empty_dir: dict[str, Any] = {}
    size = cache_size(model)
    if size is not None:
        empty_dir["sizeLimit"] = size
    return {"name": CACHE_VOLUME, "emptyDir": empty_dir}


def model_volumes(model: LlamaModel, settings: Settings) -> list[dict[str, Any]]:
    """The volumes the pod needs for the model: the user's PVC (read-only) or the cache."""
    source = model.spec.source
    if source.volume is not None:
        claim = {"claimName": source.volume.persistent_volume_claim, "readOnly": True}
        return [{"name": SOURCE_VOLUME, "persistentVolumeClaim": claim}]
    return [cache_volume(model, settings)]


def server_model_mount(model: LlamaModel) -> dict[str, Any]:
    if model.spec.source.volume is not None:
        return {"name": SOURCE_VOLUME, "mountPath": SOURCE_MOUNT, "readOnly": True}
    # llama-server only reads the model; mmap of a read-only mount is fine.
    return {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT, "readOnly": True}
