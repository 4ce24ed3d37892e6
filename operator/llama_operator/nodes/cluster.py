"""A cluster of real nodes on this machine, around a `ControlPlane`:

    nodes = RealNodes(state_dir, find_kit(), count=2, images_dir=...)
    nodes.prepare()                                   # host side; the API server binds nodes.host_address
    cp = ControlPlane(state_dir / "cp", binaries, scheduler=True, address=nodes.host_address).start()
    nodes.start(cp)                                   # registry + images, containerd + kubelet per node,
    ...                                               # kube-proxy, every Node Ready, CoreDNS Ready
    nodes.stop(); cp.stop()

`stop()` undoes everything in REAL-NODE.md's order (kube-proxy and its rules, each node: kubelet, containers,
containerd, its mount namespace; the registry; then the host) and is safe after a partial start and twice.
`timings` holds how long each step of the last start took, in seconds.
"""

from __future__ import annotations

import shutil
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import addons, netpol, proxy
from .host import HOST_ADDRESS, Host
from .kit import NodeKit
from .kubeapi import AdminApi, ControlPlaneLike
from .kubelet import Issuer
from .node import Node
from .processes import NodesError, Process
from .registry import Registry

# What a start writes to the state directory's disk, measured: each node's containerd unpacks the images (~650 MiB
# for the product's five), the registry holds them once (~130 MiB); the kubelets' eviction threshold (256Mi,
# kubelet.py) must stay free on top, or they taint their nodes DiskPressure and no pod schedules.
DISK_PER_NODE = 768 << 20
DISK_BASE = 512 << 20


def check_disk(state_dir: Path, names: list[str]) -> None:
    """Refuse to start on a disk the nodes would fill, in one line (not a DiskPressure taint minutes later). A node
    whose containerd directory is there from an earlier start has its images already."""
    existing = next((p for p in (state_dir, *state_dir.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    fresh = sum(not (state_dir / name / "containerd").is_dir() for name in names)
    needed = DISK_BASE + DISK_PER_NODE * fresh
    if free < needed:
        raise NodesError(f"the disk holding {state_dir} has {free / 2**30:.1f} GiB free; the nodes need "
                         f"{needed / 2**30:.1f} GiB for their images: free some space or pass another state "
                         "directory")


class ClusterLike(Issuer, ControlPlaneLike, Protocol):
    """A started llama_operator.controlplane.ControlPlane."""


@dataclass
class RealNodes:
    state_dir: Path
    kit: NodeKit
    count: int = 2
    images_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    image_refs: dict[str, str] = field(default_factory=dict)
    registry: Registry | None = None
    nodes: list[Node] = field(default_factory=list)
    proxy: Process | None = None
    network_policies: bool = False
    """Run kube-router's firewall (netpol.py): NetworkPolicies enforced for the pods of the first node only."""
    firewall: Process | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        if not 1 <= self.count <= 9:
            raise NodesError(f"count must be 1..9 (one bridge 10.244.<k>.0/24 per node), not {self.count}")
        self.host = Host(self.state_dir, self.node_names)

    @property
    def node_names(self) -> list[str]:
        return [f"node-{string.ascii_lowercase[i]}" for i in range(self.count)]

    @property
    def host_address(self) -> str:
        """Where the API server must bind and advertise, and where host-side services listen for pods."""
        return HOST_ADDRESS

    def prepare(self) -> None:
        """The host side (interfaces, sysctls, cgroups): before the control plane starts on host_address."""
        self.host.prepare()

    def start(self, cluster: ClusterLike, timeout: float = 60.0) -> RealNodes:
        if self.images_dir is None:
            raise NodesError("RealNodes needs images_dir (scripts/build-images.sh's directory) to start")
        check_disk(self.state_dir, self.node_names)
        begin = time.monotonic()
        try:
            self._start_registry()
            sandbox_image = self.image_refs.get("pause")
            if not sandbox_image:
                raise NodesError(f"{self.images_dir}/images.json has no `pause` image (the pods' sandbox)")
            mark = time.monotonic()
            for index, name in enumerate(self.node_names, start=1):
                node = Node(name, index, self.state_dir / name, self.kit)
                self.nodes.append(node)
                node.start(cluster, sandbox_image=sandbox_image, registry=self.registry.host if self.registry else "",
                           on_namespace=self.host.add_namespace)
            api = AdminApi(cluster)
            self._wait_nodes_ready(api, timeout)
            self.timings["nodes ready"] = time.monotonic() - mark
            self.proxy = proxy.start(cluster, self.kit.binary("kube-proxy"), self.state_dir,
                                     hostname=self.nodes[0].name, address=self.nodes[0].address)
            self.host.add_process(self.proxy.pid or 0)
            if self.network_policies:
                mark = time.monotonic()
                self._start_firewall(cluster, api)
                self.timings["firewall synced"] = time.monotonic() - mark
            mark = time.monotonic()
            if "coredns" in self.image_refs:
                addons.install(api, self.image_refs["coredns"], timeout)
            self.timings["coredns ready"] = time.monotonic() - mark
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - begin
        return self

    def _start_registry(self) -> None:
        assert self.images_dir is not None
        mark = time.monotonic()
        self.registry = Registry(self.kit.binary("registry"), self.state_dir / "registry", self.kit.tool("skopeo"))
        self.registry.start()
        if self.registry.process is not None:
            self.host.add_process(self.registry.process.pid or 0)
        self.image_refs = self.registry.push(self.images_dir)
        self.timings["registry + push"] = time.monotonic() - mark

    def _start_firewall(self, cluster: ClusterLike, api: AdminApi, timeout: float = 30.0) -> None:
        if self.kit.kube_router is None:
            raise NodesError(f"network_policies needs kube-router, which the node kit {self.kit.directory} lacks")
        self.firewall = netpol.start(cluster, api, self.kit.kube_router, self.state_dir, node=self.nodes[0].name)
        self.host.add_process(self.firewall.pid or 0)
        deadline = time.monotonic() + timeout
        while "sync iptables took" not in self.firewall.log_tail(200):  # its first full sync is done
            if not self.firewall.running():
                raise self.firewall.error("exited during start-up")
            if time.monotonic() > deadline:
                raise self.firewall.error(f"did not sync its rules within {timeout:.0f} s")
            time.sleep(0.1)

    def _wait_nodes_ready(self, api: AdminApi, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if problem := node.failed():
                    raise problem
            ready = {n["metadata"]["name"] for n in (api.get("/api/v1/nodes") or {}).get("items", [])
                     if _condition(n, "Ready")}
            if ready >= set(self.node_names):
                return
            if time.monotonic() > deadline:
                waiting = sorted(set(self.node_names) - ready)
                logs = "\n".join(f"--- {n.name} kubelet:\n{n.kubelet.log_tail(8)}" for n in self.nodes
                                 if n.name in waiting and n.kubelet)
                raise NodesError(f"nodes {', '.join(waiting)} not Ready after {timeout:.0f} s:\n{logs}")
            time.sleep(0.2)

    def failed(self) -> NodesError | None:
        """The first of the cluster's processes found dead, as an error (None while all run)."""
        for node in self.nodes:
            if problem := node.failed():
                return problem
        for process in (self.proxy, self.firewall, self.registry.process if self.registry else None):
            if process is not None and process.popen is not None and not process.running():
                return process.error("exited")
        return None

    def stop(self) -> list[str]:
        """Everything down and the host restored; returns what could not be undone (empty when all went)."""
        if self.firewall is not None:
            self.firewall.stop()
            self.firewall = None
        if self.proxy is not None:
            self.proxy.stop()
            proxy.cleanup(self.kit.binary("kube-proxy"))
            self.proxy = None
        problems: list[str] = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except NodesError as exc:
                problems.append(str(exc))
        self.nodes = []
        if self.registry is not None:
            self.registry.stop()
        problems += self.host.restore()
        return problems

    def __enter__(self) -> RealNodes:
        self.prepare()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _condition(obj: dict[str, Any], kind: str) -> bool:
    return any(c.get("type") == kind and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])
