"""Real nodes that fail half-way, or whose harness is killed, leave nothing behind; a second cluster on the same
machine is refused."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llama_operator.controlplane import ControlPlane, find_binaries
from llama_operator.nodes import NodesError, RealNodes
from llama_operator.nodes.host import RECORD
from llama_operator.nodes.processes import processes_in
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
        with pytest.raises(NodesError, match="another real-node cluster runs on this machine"):
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


OWNER = """
import sys, time
from pathlib import Path
from llama_operator.controlplane import ControlPlane, find_binaries
from llama_operator.nodes import RealNodes, find_kit
state, kit, images, binaries = map(Path, sys.argv[1:5])
nodes = RealNodes(state / "nodes", find_kit(kit), count=2, images_dir=images)
nodes.prepare()
control_plane = ControlPlane(state / "cp", find_binaries(binaries), scheduler=True, address=nodes.host_address).start()
nodes.start(control_plane)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_killed_cluster_is_cleaned_up_by_the_next_prepare(tmp_path: Path) -> None:
    """A harness SIGKILLed with its nodes running (CoreDNS's container and shim outlive it) and its state directory
    gone: the next prepare() kills what is left, restores the host from the record in /run, and goes on."""
    kit = find_node_kit()
    before = HostSnapshot.take()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path / "owner"), str(kit.directory),
                              str(find_images()), require(CONTROL_PLANE)], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "ready"
        namespaces = json.loads(RECORD.read_text())["namespaces"]
        assert len(namespaces) == 2 and all(processes_in(ns) for ns in namespaces)
    finally:
        owner.kill()
        owner.wait()
        # Its control plane got SIGTERM with it; the API server, its etcd gone, may hang in graceful shutdown.
        kill_started_under(tmp_path / "owner")
    shutil.rmtree(tmp_path / "owner")
    nodes = RealNodes(tmp_path / "next", kit, count=1, images_dir=find_images())
    nodes.prepare()
    try:
        assert not any(processes_in(ns) for ns in namespaces)
        assert json.loads(RECORD.read_text())["pid"] == os.getpid()
    finally:
        assert nodes.stop() == []
    after = HostSnapshot.take()
    assert not RECORD.exists()
    assert not any(link.startswith("llnodes") for link in after.links)
    assert after.cgroups == before.cgroups
    assert after.sysctls == before.sysctls
    assert {c for c in after.chains if "KUBE-" in c} == {c for c in before.chains if "KUBE-" in c}


def kill_started_under(directory: Path) -> None:
    """SIGKILL the processes whose command line names `directory` (the killed owner's control plane)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(directory) in (entry / "cmdline").read_text():
                    os.kill(int(entry.name), signal.SIGKILL)
