"""The real-node tests (marked `e2e` and `nodes`: root, the control plane, the node kit, the images; tests/tiers.py)
and their cluster: two real nodes (llama_operator.nodes.RealNodes: containerd + kubelet each, one kube-proxy,
CoreDNS, a local registry holding the images scripts/build-images.sh built) around the product's ControlPlane,
started once per module.

The node kit (`make node-kit`, $LLAMA_OPERATOR_NODE_KIT_DIR) and the images (`make images`,
$LLAMA_OPERATOR_IMAGES_DIR) are found by tests/tiers.py, never built here: without them the tests skip, saying
which is missing (in CI they fail).

Fixtures:
- `host_before` (module) -> HostSnapshot of the host before the cluster: interfaces, iptables chains, cgroups,
  mounts, sysctls, ipsets; `HostSnapshot.take()` again after stop() must equal it.
- `real_cluster` (module) -> RealCluster (NetworkPolicies enforced on node-a): `.nodes` (RealNodes),
  `.control_plane`, `.kubectl(*args)`,
  `.images` ({name: registry ref}), `.start_seconds`.
- `namespace` -> a fresh namespace, deleted after the test.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llama_operator.controlplane import ControlPlane, find_binaries
from llama_operator.nodes import NodeKit, RealNodes, find_kit
from llama_operator.nodes.host import MOUNT_POINTS, cgroup_hierarchies, chains, ipsets, read_sysctls
from tests.diskspace import drop_node_images
from tests.tiers import CONTROL_PLANE, IMAGES, NODE_KIT, mark_tier, require


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, Path(__file__).parent, "e2e")
    mark_tier(items, Path(__file__).parent, "nodes")


def find_images() -> Path:
    """The images' directory (tests/tiers.py found it before the test ran, or skipped it)."""
    return Path(require(IMAGES))


def find_node_kit() -> NodeKit:
    return find_kit(require(NODE_KIT))


@dataclass(frozen=True)
class HostSnapshot:
    links: frozenset[str]
    chains: frozenset[str]
    cgroups: frozenset[str]
    mounts: frozenset[str]
    sysctls: tuple[tuple[str, str], ...]
    existing: frozenset[str]
    """Which of the nodes' mount points (/var/lib/kubelet ...) exist."""
    ipsets: frozenset[str]

    @classmethod
    def take(cls) -> HostSnapshot:
        found_chains = {f"{binary}/{table}/{chain}" for binary in ("iptables", "ip6tables")
                        for table, names in chains(binary).items() for chain in names}
        cgroups = {str(h / entry.name) for h in cgroup_hierarchies() for entry in h.iterdir()
                   if entry.is_dir() and entry.name.startswith("node-")}
        mounts = {line.split(" ")[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
        return cls(links=frozenset(os.listdir("/sys/class/net")), chains=frozenset(found_chains),
                   cgroups=frozenset(cgroups), mounts=frozenset(mounts),
                   sysctls=tuple(sorted(read_sysctls().items())),
                   existing=frozenset(p for p in MOUNT_POINTS if Path(p).exists()), ipsets=frozenset(ipsets()))


@pytest.fixture(scope="module")
def host_before() -> HostSnapshot:
    return HostSnapshot.take()


@dataclass
class RealCluster:
    nodes: RealNodes
    control_plane: ControlPlane
    start_seconds: float

    @property
    def images(self) -> dict[str, str]:
        return self.nodes.image_refs

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 90
                ) -> subprocess.CompletedProcess[str]:
        assert self.control_plane.binaries is not None
        proc = subprocess.run([str(self.control_plane.binaries.kubectl), "--kubeconfig",
                               str(self.control_plane.admin_kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
        return proc


@pytest.fixture(scope="module")
def real_cluster(host_before: HostSnapshot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    kit = find_node_kit()
    images = find_images()
    binaries = find_binaries(require(CONTROL_PLANE))
    state = tmp_path_factory.mktemp("real-nodes")
    begin = time.monotonic()
    nodes = RealNodes(state / "nodes", kit, count=2, images_dir=images, network_policies=True)
    nodes.prepare()
    control_plane = ControlPlane(state / "control-plane", binaries, controllers=True, scheduler=True,
                                 address=nodes.host_address)
    try:
        control_plane.start()
        nodes.start(control_plane)
        cluster = RealCluster(nodes, control_plane, time.monotonic() - begin)
        print(f"\nreal nodes ready in {cluster.start_seconds:.1f} s: "
              + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in nodes.timings.items()))
        yield cluster
    finally:
        nodes.stop()
        control_plane.stop()
    drop_node_images(state)


@pytest.fixture
def namespace(real_cluster: RealCluster) -> Iterator[str]:
    name = f"nodes-{uuid.uuid4().hex[:6]}"
    real_cluster.kubectl("create", "namespace", name)
    yield name
    real_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)

