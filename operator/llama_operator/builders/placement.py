"""Where a LlamaServer's replicas run and how many a voluntary disruption may take: its topology spread and its
PodDisruptionBudget (docs/architecture.md, "The pods").

The default spread is soft (ScheduleAnyway): a cluster with one GPU node still runs every replica. It is in
every pod template, one replica or many, so that scaling never changes the template (a changed template is a
rollout of every pod). The budget exists only with more than one replica: a budget on a single replica either
blocks every node drain forever (maxUnavailable 0 in effect) or protects nothing.
"""

from __future__ import annotations

from typing import Any

from ..api.v1beta1 import LlamaServer
from .objects import object_meta, selector_labels, server_labels

DEFAULT_MAX_UNAVAILABLE = 1
"""Replicas a drain may take at once when spec.disruption is absent."""


def topology_spread(server: LlamaServer) -> list[dict[str, Any]]:
    """spec.topologySpreadConstraints when given, else a soft spread of the server's pods over nodes."""
    given = server.spec.topology_spread_constraints
    if given is not None:
        return [constraint.to_wire() for constraint in given]
    return [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector_labels(server.metadata.name)},
    }]


def build_disruption_budget(server: LlamaServer) -> dict[str, Any] | None:
    """The server's PodDisruptionBudget, or None with one replica (or none)."""
    if server.spec.replicas <= 1:
        return None
    given = server.spec.disruption
    budget = given.to_wire() if given is not None else {"maxUnavailable": DEFAULT_MAX_UNAVAILABLE}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": object_meta(server, name=server.metadata.name, labels=server_labels(server)),
        "spec": {"selector": {"matchLabels": selector_labels(server.metadata.name)}, **budget},
    }
