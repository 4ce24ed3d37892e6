"""One node's kubelet: its KubeletConfiguration (a pure function), its identity and serving certificate from the
control plane's CA, and its command line.

The non-defaults this machine needs (../shared/REAL-NODE.md): `failCgroupV1: false` (cgroup v1 here), the
cgroupfs driver (PID 1 is not systemd), `failSwapOn: false`, `cgroupRoot: /<node>` so two kubelets never share
a cgroup, its own address/healthz port, and a `--node-ip` on the node's bridge (the kubelet refuses loopback).
The serving certificate is issued here (no TLS bootstrap: nothing approves CSRs); the API server's client
certificate is trusted through the x509 client CA, everything else through webhook authn/authz. resolvConf is a
file of our own pointing at the pod's own loopback, so no pod is ever handed a resolver outside this machine.
Disk-pressure thresholds are low and image GC off: a test machine's full disk must not taint the nodes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import yaml

from ..controlplane.certs import KeyPair

CLUSTER_DNS = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
HEALTHZ_BASE_PORT = 10248


class Issuer(Protocol):
    """What the kubelet needs of the control plane (llama_operator.controlplane.ControlPlane)."""

    ca_cert: Path

    def issue_cert(self, name: str, *, common_name: str, organizations: list[str] | tuple[str, ...] = (),
                   ip_addresses: list[str] | tuple[str, ...] = (), dns_names: list[str] | tuple[str, ...] = (),
                   client: bool = False, server: bool = False) -> KeyPair: ...

    def kubeconfig_for_cert(self, path: Path, pair: KeyPair, *, user: str, namespace: str = "default") -> Path: ...


def kubelet_config(*, name: str, index: int, address: str, node_dir: Path, ca_cert: Path, serving: KeyPair,
                   runtime_socket: Path) -> dict[str, Any]:
    """The KubeletConfiguration of node `name` (the `index`th, from 1) on `address`."""
    endpoint = f"unix://{runtime_socket}"
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{name}",
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "address": address,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": HEALTHZ_BASE_PORT + 10 * index,
        "clusterDNS": [CLUSTER_DNS],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": str(node_dir / "resolv.conf"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(ca_cert)}},
        "authorization": {"mode": "Webhook"},
        "serverTLSBootstrap": False,
        "rotateCertificates": False,
        "tlsCertFile": str(serving.cert),
        "tlsPrivateKeyFile": str(serving.key),
        "containerRuntimeEndpoint": endpoint,
        "imageServiceEndpoint": endpoint,
        "podLogsDir": str(node_dir / "pod-logs"),
        "staticPodPath": "",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        # Absolute, not the default 10 %/15 % (or 1 %: 2.5 GiB of a 252 GiB shared disk): a test node shares the
        # machine's disk with everything else on it, and a taint it cannot clear fails every pod after it.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "256Mi", "imagefs.available": "256Mi",
                         "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
        "evictionPressureTransitionPeriod": "5s",
        "protectKernelDefaults": False,
        "serializeImagePulls": False,
        "registerNode": True,
        # A test's pod status within a second of the container's start, not at the next 10 s sync.
        "syncFrequency": "5s",
        "nodeStatusUpdateFrequency": "4s",
        "shutdownGracePeriod": "0s",
    }


def write_files(cluster: Issuer, *, name: str, index: int, address: str, node_dir: Path,
                runtime_socket: Path) -> Path:
    """Certificates, kubeconfig, resolv.conf and config of node `name`; returns the config's path."""
    node_dir.mkdir(parents=True, exist_ok=True)
    identity = f"system:node:{name}"
    client = cluster.issue_cert(f"kubelet-{name}", common_name=identity, organizations=["system:nodes"], client=True)
    serving = cluster.issue_cert(f"kubelet-{name}-serving", common_name=identity, ip_addresses=[address],
                                 dns_names=[name], server=True)
    cluster.kubeconfig_for_cert(node_dir / "kubelet.kubeconfig", client, user=identity)
    (node_dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (node_dir / "pod-logs").mkdir(exist_ok=True)
    config = node_dir / "kubelet.yaml"
    config.write_text(yaml.safe_dump(kubelet_config(name=name, index=index, address=address, node_dir=node_dir,
                                                    ca_cert=cluster.ca_cert, serving=serving,
                                                    runtime_socket=runtime_socket), sort_keys=False))
    return config


def kubelet_argv(kubelet: Path, *, name: str, address: str, node_dir: Path, config: Path) -> list[str]:
    return [str(kubelet), "--config", str(config), "--kubeconfig", str(node_dir / "kubelet.kubeconfig"),
            "--hostname-override", name, "--node-ip", address, "--cert-dir", str(node_dir / "pki"), "--v=1"]
