"""The Kubernetes API as the operator and the gateway use it: `resources` (what is called), `permissions` (what
may be called: the source of the chart's RBAC), `applied` (what our last apply sent), `watch` (a watch's event
stream) and `client` (`Kube`, the only caller of the API besides kopf's own watching, and its error translation).

Callers import from here; the API errors live in errors.py and are re-exported where they are raised.
"""

from ..errors import Conflict, Forbidden, Invalid, KubeError, NotFound, Unavailable
from .applied import UNKNOWN, Applied, desired_digest
from .client import FIELD_MANAGER, Kube, connection_settings, load_api_client, translate
from .permissions import PERMISSIONS, Permission, check_permission, required_permissions, rule
from .resources import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    ENDPOINT_SLICES,
    INFERENCE_POOLS,
    KINDS_BY_API,
    LLAMA_MODELS,
    LLAMA_SERVERS,
    NETWORK_POLICIES,
    NODES,
    PERSISTENT_VOLUME_CLAIMS,
    POD_DISRUPTION_BUDGETS,
    PODS,
    SECRETS,
    SERVICES,
    STATEFUL_SETS,
    ResourceKind,
)

__all__ = [
    "CONFIG_MAPS", "DEPLOYMENTS", "ENDPOINT_SLICES", "FIELD_MANAGER", "INFERENCE_POOLS", "KINDS_BY_API", "LLAMA_MODELS",
    "LLAMA_SERVERS",
    "NETWORK_POLICIES", "NODES", "PERMISSIONS", "PERSISTENT_VOLUME_CLAIMS", "POD_DISRUPTION_BUDGETS", "PODS", "SECRETS",
    "SERVICES", "STATEFUL_SETS", "UNKNOWN",
    "Applied",
    "Conflict", "Forbidden", "Invalid", "Kube", "KubeError", "NotFound", "Permission", "ResourceKind", "Unavailable",
    "check_permission", "connection_settings", "desired_digest", "load_api_client", "required_permissions", "rule",
    "translate",
]
