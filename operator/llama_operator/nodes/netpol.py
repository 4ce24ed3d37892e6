"""NetworkPolicy enforcement (optional): kube-router's firewall alone (`--run-firewall`, no routing, no service
proxy, no CNI) as a host process with an identity of its own, `system:kube-router`, bound to a ClusterRole that
only reads what it enforces from.

Why kube-router, and its limit here: sigs.k8s.io/kube-network-policies programs an nftables `queue`, which this
kernel lacks; kube-router's firewall uses iptables + ipset, which work. kube-router treats as its own the pods whose
host IP is its node's address, and two instances in one network namespace would each rewrite the filter table and
delete the other's chains. All nodes here share the host's network namespace, so one instance runs, for the
first node: **policies are enforced for pods on that node only** (a test pins the pods it protects there).
The Go proxy flags kube-router v2.1.0 for reported security flaws; it runs only here, on nodes that reach nothing
off the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .kubeapi import AdminApi
from .kubelet import Issuer
from .processes import Process

IDENTITY = "system:kube-router"


def rbac_objects() -> list[dict[str, Any]]:
    read = ["get", "list", "watch"]
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": IDENTITY},
         "rules": [{"apiGroups": [""], "resources": ["namespaces", "pods", "services", "nodes", "endpoints"],
                    "verbs": read},
                   {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": read},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": IDENTITY},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": IDENTITY},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": IDENTITY}]},
    ]


def start(cluster: Issuer, api: AdminApi, kube_router: Path, state_dir: Path, *, node: str) -> Process:
    for obj in rbac_objects():
        api.apply(obj)
    pair = cluster.issue_cert("kube-router", common_name=IDENTITY, client=True)
    kubeconfig = cluster.kubeconfig_for_cert(state_dir / "kube-router.kubeconfig", pair, user=IDENTITY)
    return Process("kube-router", [
        str(kube_router), "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
        "--enable-cni=false", "--kubeconfig", str(kubeconfig), "--hostname-override", node,
        "--health-port", "0", "--metrics-port", "0", "--iptables-sync-period", "30s", "-v", "1",
    ], state_dir / "logs" / "kube-router.log").start()
