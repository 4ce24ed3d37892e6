"""The operator's own pods in a real-node sandbox (two replicas under leader election, templates/operator-ha.yaml):
which pods run, which one holds the leader Lease, and waiting until both are ready and one leads."""

from __future__ import annotations

from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.rest import ApiException

from tests.e2e.harness import SandboxProcess, wait_for
from tests.e2e.servers import SYSTEM

OPERATOR_PODS = "app.kubernetes.io/name=llama-operator"
LEASE = "llama-operator-leader"
"""The release is named llama-operator (sandbox/helm.py), so the chart's fullname is too; the Lease adds -leader."""


def operator_pods(sandbox: SandboxProcess) -> list[Any]:
    """The operator's pods that are not being deleted."""
    return [pod for pod in sandbox.core.list_namespaced_pod(SYSTEM, label_selector=OPERATOR_PODS).items
            if pod.metadata.deletion_timestamp is None]


def lease_holder(sandbox: SandboxProcess) -> str:
    """The pod whose operator process holds the leader Lease ("" when it is free or absent); the Lease names the
    process as `<pod>_<random>` (leader.ElectionConfig.from_env)."""
    try:
        lease = k8s_client.CoordinationV1Api(sandbox.core.api_client).read_namespaced_lease(LEASE, SYSTEM)
    except ApiException as exc:
        if exc.status == 404:
            return ""
        raise
    return str(lease.spec.holder_identity or "").rsplit("_", 1)[0]


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def leader_pod(sandbox: SandboxProcess, replicas: int = 2, timeout: float = 120) -> Any:
    """The operator pod holding the Lease, once `replicas` operator pods are ready and one of them leads."""
    def settled() -> Any:
        live = operator_pods(sandbox)
        holder = lease_holder(sandbox)
        ready = [pod for pod in live if _ready(pod)]
        return len(ready) == replicas and next((p for p in ready if p.metadata.name == holder), None)
    return wait_for(settled, timeout=timeout, message=f"{replicas} operator pods ready, one holding {LEASE}")
