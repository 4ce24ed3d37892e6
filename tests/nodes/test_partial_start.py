"""Real nodes that fail half-way leave nothing behind, and a second cluster on the same machine is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_operator.controlplane import ControlPlane, find_binaries
from llama_operator.nodes import NodesError, RealNodes
from tests.nodes.conftest import HostSnapshot, find_images, find_node_kit
from tests.tiers import CONTROL_PLANE, require


def test_a_failed_start_stops_everything_and_restores_the_host(tmp_path: Path) -> None:
    kit = find_node_kit()
    before = HostSnapshot.take()
    nodes = RealNodes(tmp_path / "nodes", kit, count=2, images_dir=find_images())
    nodes.prepare()
    control_plane = ControlPlane(tmp_path / "control-plane", find_binaries(require(CONTROL_PLANE)),
                                 controllers=False, address=nodes.host_address)
    try:
        with pytest.raises(NodesError, match="already exists: another real-node cluster"):
            RealNodes(tmp_path / "second", kit, count=1).prepare()
        control_plane.start()
        # Registry, images and both nodes' containerd + kubelet run when the wait for Ready gives up.
        with pytest.raises(NodesError, match=r"nodes .* not Ready after 0 s"):
            nodes.start(control_plane, timeout=0.01)
        assert nodes.nodes == [] and nodes.proxy is None
    finally:
        assert nodes.stop() == []  # a second stop: nothing left to do
        control_plane.stop()
    after = HostSnapshot.take()
    assert not any(link.startswith("llnodes") for link in after.links)
    assert after.cgroups == before.cgroups
    assert after.sysctls == before.sysctls
    assert {c for c in after.chains if "KUBE-" in c} == {c for c in before.chains if "KUBE-" in c}
    assert not [m for m in after.mounts if m.startswith(str(tmp_path))]
