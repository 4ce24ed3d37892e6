"""The PersistentVolumeClaim a LlamaModel owns when its cache type is PersistentVolumeClaim."""

from __future__ import annotations

from typing import Any

from ..api.v1beta1 import LlamaModel
from ..config import Settings
from .cache import cache_pvc_name, cache_size, cache_type
from .objects import model_labels, object_meta


def build_cache_pvc(model: LlamaModel, settings: Settings) -> dict[str, Any] | None:
    """The cache PVC, or None when the cache is not a PVC or its size is not known yet.

    ReadWriteOnce (the default) pins every replica to the node that mounted the volume first;
    ReadWriteMany lets replicas spread across nodes and share one download.
    """
    if cache_type(model, settings) != "PersistentVolumeClaim":
        return None
    size = cache_size(model)
    if size is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": list(model.spec.cache.access_modes or ["ReadWriteOnce"]),
        "resources": {"requests": {"storage": size}},
    }
    if model.spec.cache.storage_class_name:
        spec["storageClassName"] = model.spec.cache.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": object_meta(model, name=cache_pvc_name(model), labels=model_labels(model)),
        "spec": spec,
    }
