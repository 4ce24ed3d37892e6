"""One node's containerd: its config (pure functions: config.toml, the CNI network, the registry's hosts.toml), its
files in the node's state directory, and waiting until it answers on its socket.

What the config says, and why (../shared/REAL-NODE.md has the measurements):
- its own root, state, gRPC/ttrpc sockets and runc `Root`, so two nodes on one machine share nothing;
- `restrict_oom_score_adj`: root here lacks CAP_SYS_RESOURCE, and runc fails every pod asking for -998/-997;
- `disable_apparmor` (no AppArmor in this kernel), cgroupfs (`SystemdCgroup = false`: PID 1 is not systemd);
- `netns_mounts_under_state_dir`: the pods' network namespaces are mounted in the node's own state;
- the CRI stream server (exec, logs, port-forward) on 127.0.0.1 only; overlayfs; the snapshotters this machine
  cannot use, NRI and tracing off;
- the sandbox (pause) image from the local registry, which `config_path`'s hosts.toml reaches over plain HTTP.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..controlplane.cluster import SERVICE_CIDR
from .host import POD_RANGE, bridge_address, bridge_name, pod_subnet
from .processes import Process, run

DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs", "io.containerd.nri.v1.nri",
    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
)
CNI_NETWORK = "llama-nodes"
# In the node's own /run/containerd (a private bind mount): a socket path in a deep state directory would pass
# the 104-byte limit of unix socket paths. The kubelet shares the namespace; the host reaches it via nsenter.
SOCKET = "/run/containerd/containerd.sock"


def _toml(value: Any) -> str:
    """A TOML scalar or array of what the config uses (strings, booleans, ints, lists of strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _table(name: str, values: dict[str, Any]) -> str:
    return "\n".join([f"[{name}]", *(f"  {key} = {_toml(value)}" for key, value in values.items())])


def containerd_config(node_dir: Path, *, runc: Path, cni_bin_dir: Path, sandbox_image: str) -> str:
    """config.toml (version 3) of the node whose state is `node_dir`."""
    state = node_dir / "containerd"
    runtime = "plugins.'io.containerd.cri.v1.runtime'"
    images = "plugins.'io.containerd.cri.v1.images'"
    head = "\n".join([
        "version = 3",
        f"root = {_toml(state / 'root')}",
        f"state = {_toml(state / 'state')}",
        f"disabled_plugins = {_toml(DISABLED_PLUGINS)}",
        "imports = []",  # never the host's /etc/containerd/conf.d
    ])
    tables = [
        _table("grpc", {"address": SOCKET}),
        _table("ttrpc", {"address": f"{SOCKET}.ttrpc"}),
        _table("plugins.'io.containerd.internal.v1.opt'", {"path": state / "opt"}),
        _table(images, {"snapshotter": "overlayfs"}),
        _table(f"{images}.pinned_images", {"sandbox": sandbox_image}),
        _table(f"{images}.registry", {"config_path": state / "certs.d"}),
        _table("plugins.'io.containerd.transfer.v1.local'", {"config_path": state / "certs.d"}),
        _table(runtime, {"disable_apparmor": True, "restrict_oom_score_adj": True, "enable_selinux": False,
                         "netns_mounts_under_state_dir": True, "enable_cdi": False}),
        _table(f"{runtime}.containerd", {"default_runtime_name": "runc"}),
        _table(f"{runtime}.containerd.runtimes.runc", {"runtime_type": "io.containerd.runc.v2"}),
        _table(f"{runtime}.containerd.runtimes.runc.options",
               {"BinaryName": runc, "Root": state / "runc", "SystemdCgroup": False}),
        _table(f"{runtime}.cni", {"bin_dirs": [str(cni_bin_dir)], "conf_dir": state / "net.d", "max_conf_num": 1}),
        _table("plugins.'io.containerd.grpc.v1.cri'", {"stream_server_address": "127.0.0.1",
                                                        "stream_server_port": "0"}),
    ]
    return head + "\n\n" + "\n\n".join(tables) + "\n"


def cni_network(index: int, ipam_dir: Path) -> dict[str, Any]:
    """The node's CNI network: its pods on its bridge, no masquerade, routes to the pod and service ranges through
    the node's address (the host forwards between bridges and kube-proxy DNATs), no default route off the host."""
    gateway = bridge_address(index)
    subnet = pod_subnet(index)
    return {
        "cniVersion": "1.0.0", "name": CNI_NETWORK,
        "plugins": [
            {"type": "bridge", "bridge": bridge_name(index), "isGateway": False, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                      "ranges": [[{"subnet": subnet, "gateway": gateway,
                                   "rangeStart": subnet.replace(".0/24", ".10")}]],
                      "routes": [{"dst": POD_RANGE, "gw": gateway}, {"dst": SERVICE_CIDR, "gw": gateway}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def hosts_toml(registry: str) -> str:
    """certs.d/<registry>/hosts.toml: pull from the local registry over plain HTTP."""
    return (f'server = "http://{registry}"\n\n[host."http://{registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n  skip_verify = true\n')


def write_files(node_dir: Path, index: int, *, runc: Path, cni_bin_dir: Path, sandbox_image: str,
                registry: str) -> Path:
    """Writes config.toml, the CNI network and the registry's hosts.toml; returns the config's path."""
    state = node_dir / "containerd"
    (state / "net.d").mkdir(parents=True, exist_ok=True)
    (state / "net.d" / "10-llama-nodes.conflist").write_text(json.dumps(cni_network(index, state / "ipam"), indent=1))
    hosts = state / "certs.d" / registry
    hosts.mkdir(parents=True, exist_ok=True)
    (hosts / "hosts.toml").write_text(hosts_toml(registry))
    config = state / "config.toml"
    config.write_text(containerd_config(node_dir, runc=runc, cni_bin_dir=cni_bin_dir, sandbox_image=sandbox_image))
    return config


def wait_ready(process: Process, ctr: list[str], timeout: float = 30.0) -> None:
    """Until `ctr version` answers (`ctr`: its argv prefix, in the node's namespace); a NodesError with
    containerd's log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.running():
            raise process.error("exited during start-up")
        if run([*ctr, "version"], check=False, timeout=10).returncode == 0:
            return
        time.sleep(0.1)
    raise process.error(f"did not answer on {SOCKET} within {timeout:.0f} s")


def remove_all_containers(ctr: list[str]) -> None:
    """Kill and delete every task and container of the node (namespace k8s.io), so no shim outlives containerd."""
    base = [*ctr, "--namespace", "k8s.io"]
    tasks = run([*base, "tasks", "list", "--quiet"], check=False, timeout=30).stdout.split()
    for task in tasks:
        run([*base, "tasks", "kill", "--signal", "SIGKILL", task], check=False, timeout=30)
    for task in tasks:
        run([*base, "tasks", "delete", "--force", task], check=False, timeout=30)
    containers = run([*base, "containers", "list", "--quiet"], check=False, timeout=30).stdout.split()
    if containers:
        run([*base, "containers", "delete", *containers], check=False, timeout=60)
