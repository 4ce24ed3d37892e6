"""The Deployment of a LlamaServer around its pod template (one model or router mode)."""

from __future__ import annotations

from typing import Any

from ..api.v1beta1 import LlamaServer
from .objects import object_meta, selector_labels, server_labels


def rollout_strategy(*, gpu: bool, replicas: int, exclusive: bool = False) -> dict[str, Any]:
    """How a spec change replaces the pods (the trade-off: docs/architecture.md, "The pods").

    `exclusive`: a distributed server's leader. Its workers serve one client at a time, so a new leader could not
    load before the old one lets go of them: the old one stops first (docs/distributed.md).

    CPU: surge first (a new pod is ready before an old one stops), no capacity lost. GPU: a second pod rarely
    finds a free GPU, so a surge would wait forever; with several replicas one stops at a time (one replica's
    capacity lost during the rollout, never the service); a single replica can only be replaced (an outage).
    """
    if exclusive:
        return {"type": "Recreate"}
    if not gpu:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    if replicas > 1:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "Recreate"}


def deployment_object(server: LlamaServer, template: dict[str, Any]) -> dict[str, Any]:
    """The Deployment around a pod template (one model or router mode)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(server, name=server.metadata.name, labels=server_labels(server)),
        "spec": {
            "replicas": server.spec.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(server.metadata.name)},
            "strategy": rollout_strategy(gpu=server.spec.gpu is not None, replicas=server.spec.replicas,
                                         exclusive=server.spec.distributed is not None),
            "template": template,
        },
    }
