"""Metadata shared by every object the operator creates: names, labels, owner references."""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..api.v1beta1 import API_VERSION, LlamaModel, LlamaServer
from ..contract import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    NAME_LABEL,
    OPERATOR_VERSION_ANNOTATION,
    SERVER_LABEL,
    SERVER_NAME,
)


def selector_labels(server_name: str) -> dict[str, str]:
    """The Deployment selector. Immutable on a real cluster, so it holds nothing that may change."""
    return {NAME_LABEL: SERVER_NAME, SERVER_LABEL: server_name}


def label_selector(labels: dict[str, str]) -> str:
    """Labels as a `labelSelector` query string."""
    return ",".join(f"{key}={value}" for key, value in labels.items())


def server_labels(server: LlamaServer) -> dict[str, str]:
    labels = {
        **selector_labels(server.metadata.name),
        "app.kubernetes.io/instance": server.metadata.name,
        "app.kubernetes.io/component": "inference",
        MANAGED_BY_LABEL: MANAGED_BY,
    }
    if server.spec.model_ref is not None:  # a router-mode server serves several: no one model label
        labels[MODEL_LABEL] = server.spec.model_ref.name
    return labels


def model_labels(model: LlamaModel) -> dict[str, str]:
    return {
        NAME_LABEL: "llama-model-cache",
        "app.kubernetes.io/instance": model.metadata.name,
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_LABEL: model.metadata.name,
    }


def owner_reference(owner: LlamaServer | LlamaModel) -> dict[str, Any]:
    assert owner.metadata.uid, "owner references need the owner's uid"
    return {
        "apiVersion": API_VERSION,
        "kind": owner.kind,
        "name": owner.metadata.name,
        "uid": owner.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(
    owner: LlamaServer | LlamaModel, *, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """Metadata of an owned object, with the release that writes it. Offline renders have no owner uid and so no
    owner reference."""
    meta: dict[str, Any] = {"name": name, "namespace": owner.metadata.namespace, "labels": labels,
                            "annotations": {**(annotations or {}), OPERATOR_VERSION_ANNOTATION: __version__}}
    if owner.metadata.uid:
        meta["ownerReferences"] = [owner_reference(owner)]
    return meta
