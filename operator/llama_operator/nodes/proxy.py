"""The one kube-proxy of all real nodes (iptables mode, in the host network namespace, which every node shares:
two would fight over the same rules), identity `system:kube-proxy`; `cleanup` removes its rules at stop.

Its config leaves the host's conntrack sysctls alone (`maxPerCore: 0`, zero timeouts), keeps NodePorts off
127.0.0.1 (`localhostNodePorts: false`, no route_localnet) and opens them only on the node bridges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..controlplane.cluster import free_port
from .host import POD_RANGE
from .kubelet import Issuer
from .processes import Process, run

IDENTITY = "system:kube-proxy"


def proxy_config(*, kubeconfig: Path, hostname: str, address: str, healthz_port: int, metrics_port: int
                 ) -> dict[str, Any]:
    """`hostname`/`address`: the node whose address kube-proxy takes as its own (any of them serves all)."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": hostname,
        "clusterCIDR": POD_RANGE,
        "detectLocalMode": "ClusterCIDR",
        "bindAddress": address,
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        "nodePortAddresses": [POD_RANGE],
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "syncPeriod": "30s",
                     "minSyncPeriod": "0s"},
        "oomScoreAdj": 0,  # lowering it needs CAP_SYS_RESOURCE, which root lacks here
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def start(cluster: Issuer, kube_proxy: Path, state_dir: Path, *, hostname: str, address: str) -> Process:
    state_dir.mkdir(parents=True, exist_ok=True)
    pair = cluster.issue_cert("kube-proxy", common_name=IDENTITY, client=True)
    kubeconfig = cluster.kubeconfig_for_cert(state_dir / "kube-proxy.kubeconfig", pair, user=IDENTITY)
    config = state_dir / "kube-proxy.yaml"
    config.write_text(yaml.safe_dump(proxy_config(kubeconfig=kubeconfig, hostname=hostname, address=address,
                                                  healthz_port=free_port(), metrics_port=free_port())))
    return Process("kube-proxy", [str(kube_proxy), "--config", str(config), "--v=1"],
                   state_dir / "logs" / "kube-proxy.log").start()


def cleanup(kube_proxy: Path) -> None:
    """`kube-proxy --cleanup`: its iptables rules and chains go (the host's restore deletes whatever is left)."""
    run([str(kube_proxy), "--cleanup", "--v=0"], check=False, timeout=60)
