"""The Deployment of a LlamaServer around its pod template (one model or router mode)."""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import LlamaModel, LlamaServer
from ..config import Settings
from .objects import object_meta, selector_labels, server_labels
from .pod import pod_template


def build_deployment(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None = None
) -> dict[str, Any]:
    """The Deployment; `draft` is the resolved speculative draft LlamaModel when spec.speculative is set."""
    return deployment_object(server, pod_template(server, model, settings, draft))


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
