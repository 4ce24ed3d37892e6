"""CoreDNS as a cluster add-on: the objects (pure functions) and `install`, which applies them and waits until its
Deployment is available, so `<svc>.<ns>.svc.cluster.local` resolves in pods.

CoreDNS answers only the cluster's zones (cluster.local and the reverse zones) and forwards nothing: any other
name gets NXDOMAIN, so no pod's lookup ever leaves the machine. It runs as 65532 with no capabilities on a
read-only root filesystem, listening on 1053; the kube-dns Service maps 53 to it.
"""

from __future__ import annotations

import time
from typing import Any

from .kubeapi import AdminApi
from .kubelet import CLUSTER_DNS, CLUSTER_DOMAIN
from .processes import NodesError, run

NAMESPACE = "kube-system"
NAME = "coredns"
PORT = 1053
COREFILE = f"""{CLUSTER_DOMAIN}:{PORT} in-addr.arpa:{PORT} ip6.arpa:{PORT} {{
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        ttl 5
    }}
    cache 5
}}
.:{PORT} {{
    errors
    health 127.0.0.1:8080
    ready :8181
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


def _meta(name: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"k8s-app": "kube-dns"}}
    if namespaced:
        meta["namespace"] = NAMESPACE
    return meta


def coredns_objects(image: str) -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole and binding, ConfigMap, Deployment and the kube-dns Service."""
    restricted = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "allowPrivilegeEscalation": False,
                  "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                  "seccompProfile": {"type": "RuntimeDefault"}}
    container = {
        "name": "coredns", "image": image, "imagePullPolicy": "IfNotPresent",
        "args": ["-conf", "/etc/coredns/Corefile"],
        "ports": [{"name": "dns", "containerPort": PORT, "protocol": "UDP"},
                  {"name": "dns-tcp", "containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 1},
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        "securityContext": restricted,
        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(NAME)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": _meta("system:coredns", False),
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": _meta("system:coredns", False),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(NAME), "data": {"Corefile": COREFILE}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(NAME),
         "spec": {"replicas": 1, "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
                  "template": {"metadata": {"labels": {"k8s-app": "kube-dns"}},
                               "spec": {"serviceAccountName": NAME, "dnsPolicy": "Default",
                                        "priorityClassName": "system-cluster-critical",
                                        "containers": [container],
                                        "volumes": [{"name": "config", "configMap": {"name": NAME}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {**_meta("kube-dns"), "name": "kube-dns"},
         "spec": {"clusterIP": CLUSTER_DNS, "selector": {"k8s-app": "kube-dns"},
                  "ports": [{"name": "dns", "port": 53, "targetPort": PORT, "protocol": "UDP"},
                            {"name": "dns-tcp", "port": 53, "targetPort": PORT, "protocol": "TCP"}]}},
    ]


def install(api: AdminApi, image: str, timeout: float = 60.0) -> None:
    """Apply the objects; return once the Deployment has a ready replica and kube-proxy routes the kube-dns
    Service to it (NodesError with its pods' state if not)."""
    for obj in coredns_objects(image):
        api.apply(obj)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployment = api.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{NAME}") or {}
        if (deployment.get("status") or {}).get("readyReplicas") and _routed(CLUSTER_DNS):
            return
        time.sleep(0.2)
    pods = api.get(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=k8s-app%3Dkube-dns") or {}
    states = [(p["metadata"]["name"], p.get("status", {}).get("phase"),
               [c.get("state") for c in p.get("status", {}).get("containerStatuses", [])])
              for p in pods.get("items", [])]
    raise NodesError(f"CoreDNS not ready after {timeout:.0f} s: {states}")


def _routed(cluster_ip: str) -> bool:
    """kube-proxy has a rule sending `cluster_ip` to its endpoints (a Service without ready ones has none)."""
    rules = run(["iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES"], check=False).stdout
    return any(f"-d {cluster_ip}/32" in line and "-j KUBE-SVC-" in line for line in rules.splitlines())
