"""The Deployment of a LlamaServer around its pod template (one model or router mode)."""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import LlamaServer
from .objects import object_meta, selector_labels, server_labels


def deployment_object(server: LlamaServer, template: dict[str, Any]) -> dict[str, Any]:
    """The Deployment around a pod template (one model or router mode)."""
    # Two GPU pods rarely fit side by side during a rolling update: replace instead of surge.
    strategy: dict[str, Any] = (
        {"type": "Recreate"}
        if server.spec.gpu is not None
        else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(server, name=server.metadata.name, labels=server_labels(server)),
        "spec": {
            "replicas": server.spec.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(server.metadata.name)},
            "strategy": strategy,
            "template": template,
        },
    }
