"""The NetworkPolicy next to a LlamaServer: who may open connections to its llama-server pods.

Made only when the operator is configured with the peers to admit (`Settings.server_network_policy_from`, set by
the chart from `networkPolicy.llamaServers`): the pods of the server's own namespace always, then those peers —
the operator (it reads router-mode pods' /models), the gateway, the monitoring namespaces that scrape the pods'
/metrics, and any the installation adds. Everything else is refused on every port. Only ingress is restricted:
the fetch init containers share the pod's network and download from the model host.

Traffic from the node a pod runs on (kubelet probes) is always allowed by NetworkPolicy semantics, so the
/health probes need no rule. Same name as the server, owned by it: garbage collection removes it with the server.
"""

from __future__ import annotations

from typing import Any

from ..api.v1beta1 import LlamaServer
from ..config import Settings
from ..flags.render import SERVER_PORT
from .objects import object_meta, selector_labels, server_labels


def build_network_policy(server: LlamaServer, settings: Settings) -> dict[str, Any] | None:
    """The server's NetworkPolicy, or None when the operator makes none (the setting is unset)."""
    peers = settings.server_network_policy_from
    if peers is None:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(server, name=server.metadata.name, labels=server_labels(server)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(server.metadata.name)},
            "policyTypes": ["Ingress"],
            "ingress": [{
                # A peer with only a podSelector selects pods of the policy's own namespace: the server's.
                "from": [{"podSelector": {}}, *(dict(peer) for peer in peers)],
                "ports": [{"protocol": "TCP", "port": SERVER_PORT}],
            }],
        },
    }
