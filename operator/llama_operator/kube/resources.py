"""The API resources the operator and the gateway call: enough of each to build its URLs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..api.v1beta1 import GROUP, VERSION


@dataclass(frozen=True)
class ResourceKind:
    """A namespaced API resource: enough to build its URLs."""

    api_group: str
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL of the object, or of the collection (namespace None: across all namespaces)."""
        base = f"/api/{self.version}" if not self.api_group else f"/apis/{self.api_group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}" if namespace else f"{base}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


DEPLOYMENTS = ResourceKind("apps", "v1", "deployments")
SERVICES = ResourceKind("", "v1", "services")
STATEFUL_SETS = ResourceKind("apps", "v1", "statefulsets")
"""The RPC workers of a distributed LlamaServer (builders/distributed.py)."""
PERSISTENT_VOLUME_CLAIMS = ResourceKind("", "v1", "persistentvolumeclaims")
PODS = ResourceKind("", "v1", "pods")
SECRETS = ResourceKind("", "v1", "secrets")
CONFIG_MAPS = ResourceKind("", "v1", "configmaps")
NETWORK_POLICIES = ResourceKind("networking.k8s.io", "v1", "networkpolicies")
"""Written next to each LlamaServer when the operator is configured to (builders/network_policy.py)."""
POD_DISRUPTION_BUDGETS = ResourceKind("policy", "v1", "poddisruptionbudgets")
"""Written next to each LlamaServer with more than one replica (builders/placement.py)."""
INFERENCE_POOLS = ResourceKind("inference.networking.k8s.io", "v1", "inferencepools")
"""Written next to each LlamaServer where the cluster serves the Gateway API Inference Extension
(builders/inference_pool.py)."""
LLAMA_MODELS = ResourceKind(GROUP, VERSION, "llamamodels")
LLAMA_SERVERS = ResourceKind(GROUP, VERSION, "llamaservers")
ENDPOINT_SLICES = ResourceKind("discovery.k8s.io", "v1", "endpointslices")
"""Read (watched) by the gateway: the ready addresses of each LlamaServer's Service."""
NODES = ResourceKind("", "v1", "nodes")
"""Cluster-scoped: read (cluster mode only) for the GPU memory labels the Fits condition compares with."""

KINDS_BY_API: Mapping[tuple[str, str], ResourceKind] = {
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("apps/v1", "StatefulSet"): STATEFUL_SETS,
    ("v1", "Service"): SERVICES,
    ("v1", "PersistentVolumeClaim"): PERSISTENT_VOLUME_CLAIMS,
    ("v1", "ConfigMap"): CONFIG_MAPS,
    ("networking.k8s.io/v1", "NetworkPolicy"): NETWORK_POLICIES,
    ("policy/v1", "PodDisruptionBudget"): POD_DISRUPTION_BUDGETS,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOLS,
}

