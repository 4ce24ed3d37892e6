"""What the operator's code may call on the API, per resource: the source the chart's RBAC is checked against.

`Kube` refuses a call outside its declared permissions at once, so the RBAC cannot silently fall behind the code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..api.v1beta1 import GROUP
from .resources import ResourceKind


@dataclass(frozen=True)
class Permission:
    """One RBAC rule: verbs on a resource (`plural` or `plural/subresource`) of an API group."""

    api_group: str
    resource: str
    verbs: frozenset[str]
    cluster_scoped: bool = False
    """A cluster-scoped resource: granted by the chart only in cluster mode (a Role cannot grant it)."""


# What `Kube` does, per resource. Reads of owned kinds also come from kopf's watches (the chart test derives
# those from kopf's registry).
# Server-side apply that creates an object is authorised as create as well as patch.
PERMISSIONS: tuple[Permission, ...] = (
    Permission("apps", "deployments", frozenset({"get", "list", "create", "patch", "delete"})),
    # A distributed server's workers; removed with the server by garbage collection (its owner reference).
    Permission("apps", "statefulsets", frozenset({"get", "create", "patch"})),
    Permission("", "services", frozenset({"get", "list", "create", "patch", "delete"})),
    Permission("", "persistentvolumeclaims", frozenset({"get", "list", "create", "patch", "delete"})),
    Permission("", "pods", frozenset({"list"})),
    # The tail of a running fetcher's log: its progress lines become status.download while it downloads.
    Permission("", "pods/log", frozenset({"get"})),
    Permission("", "secrets", frozenset({"get"})),
    # A LlamaModel's trust ConfigMap (the sha256 recorded on first use, read by its pods' fetchers).
    Permission("", "configmaps", frozenset({"get", "create", "patch"})),
    # The NetworkPolicy next to each LlamaServer; delete: when the setting is turned off (reconcile/network.py).
    Permission("networking.k8s.io", "networkpolicies", frozenset({"get", "create", "patch", "delete"})),
    # The PodDisruptionBudget of each LlamaServer with more than one replica; delete: back to one replica.
    Permission("policy", "poddisruptionbudgets", frozenset({"get", "create", "patch", "delete"})),
    # The InferencePool of each LlamaServer where the cluster serves it; delete: pools turned off by the setting.
    Permission("inference.networking.k8s.io", "inferencepools", frozenset({"get", "create", "patch", "delete"})),
    Permission(GROUP, "llamamodels", frozenset({"get", "list"})),
    Permission(GROUP, "llamaservers", frozenset({"get", "list"})),
    Permission(GROUP, "llamamodels/status", frozenset({"patch"})),
    Permission(GROUP, "llamaservers/status", frozenset({"patch"})),
    # Owned objects carry blockOwnerDeletion: the OwnerReferencesPermissionEnforcement admission plugin
    # then requires update on the owner's finalizers subresource.
    Permission(GROUP, "llamamodels/finalizers", frozenset({"update"})),
    Permission(GROUP, "llamaservers/finalizers", frozenset({"update"})),
    # GPU memory per node (nvidia.com/gpu.memory) for the Fits condition; namespaced mode does without.
    Permission("", "nodes", frozenset({"list"}), cluster_scoped=True),
)


def check_permission(kind: ResourceKind, verb: str, subresource: str | None = None,
                     permissions: tuple[Permission, ...] = PERMISSIONS) -> None:
    resource = kind.plural if subresource is None else f"{kind.plural}/{subresource}"
    for permission in permissions:
        if permission.api_group == kind.api_group and permission.resource == resource and verb in permission.verbs:
            return
    raise AssertionError(f"the declared permissions lack {verb} on {kind.api_group or 'core'}/{resource}")


def rule(verb: str, kind: ResourceKind, namespace: str | None, subresource: str | None = None) -> str:
    """The RBAC rule a request needs, as a person reads it: `patch deployments.apps in namespace ml`."""
    resource = kind.plural + (f".{kind.api_group}" if kind.api_group else "")
    resource += f"/{subresource}" if subresource else ""
    where = f"in namespace {namespace}" if namespace else "cluster-wide"
    return f"{verb} {resource} {where}"


def required_permissions(*, namespaced: bool = False) -> tuple[Permission, ...]:
    """What the operator may call, for RBAC (kopf's own watches are derived from its registry by the chart test).

    `namespaced`: what a Role in each watched namespace must grant (no cluster-scoped resources)."""
    return tuple(p for p in PERMISSIONS if not (namespaced and p.cluster_scoped))
