"""Trust on first use (pure): which models need it, and the ConfigMap that carries the recorded sha256.

A source that publishes no sha256 (a plain URL, a mirror without `X-Linked-Etag`) and has no `spec.sha256` gets
verified against what its first verified download found. The fetcher reports that in its termination message,
the operator records it in the LlamaModel's `status.trustOnFirstUse` and in this ConfigMap, and every fetcher of
the model reads the ConfigMap through an optional env var: the pod template never changes when the record is
made, so recording it rolls nothing (see docs/model-sources.md).
"""

from __future__ import annotations

from typing import Any

from ..api.v1beta1 import LlamaModel
from ..contract import TRUST_CONFIGMAP_KEY, TRUSTED_ENV, trusted_sums_text
from .objects import model_labels, object_meta


def needs_trust(model: LlamaModel) -> bool:
    """A downloaded model whose sha256 nobody publishes or pins."""
    return model.spec.source.volume is None and not (model.status.sha256 or model.spec.sha256)


def trust_configmap_name(model: LlamaModel) -> str:
    return f"{model.metadata.name}-sha256"


def trusted_env(model: LlamaModel) -> dict[str, Any]:
    """The fetcher's env var with the recorded sums; optional, so pods start before anything is recorded."""
    ref = {"name": trust_configmap_name(model), "key": TRUST_CONFIGMAP_KEY, "optional": True}
    return {"name": TRUSTED_ENV, "valueFrom": {"configMapKeyRef": ref}}


def build_trust_configmap(model: LlamaModel) -> dict[str, Any] | None:
    """The ConfigMap of a recorded first use (owned by the LlamaModel), or None when there is nothing to carry."""
    record = model.status.trust_on_first_use
    if record is None or not needs_trust(model) or record.cache_key != model.status.cache_key:
        return None
    sums = {file.name: file.sha256 for file in record.files}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(model, name=trust_configmap_name(model), labels=model_labels(model)),
        "data": {TRUST_CONFIGMAP_KEY: trusted_sums_text(record.cache_key, sums)},
    }
