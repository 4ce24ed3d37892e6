"""The host side of real nodes: the interfaces, routes, sysctls, cgroup roots and mount points they need, and the
exact restore of all of it.

- `llnodes0`, a bridge without ports (this kernel has no `dummy` driver), holds the host address 10.244.0.1/32:
  where the API server binds and advertises, and where host-side services listen for pods. It also carries the
  routes of the whole pod range and of the service range, so a packet to an address no node or kube-proxy rule
  answers ends there instead of following the default route off the machine.
- one bridge per node, `llnodes<k>` with 10.244.<k>.1/24: the node's address (`--node-ip`) and its pods' gateway;
  the host routes between the bridges (ip_forward=1 while running).
- cgroup roots `/<node>` in every v1 hierarchy, cpuset.cpus/mems copied from the root (the kubelet's cgroupRoot).
- the mount points the nodes' private bind mounts need (/var/lib/kubelet ..., the HostPath cache root's parent),
  created only if absent.

`restore()` puts back what `prepare()` found, in order: processes left in the nodes' mount namespaces (after a
crash: shims, containers), leftover mounts, iptables chains the run added (KUBE-*, CNI-*; v4 and v6) and then its
ipsets, sysctls (the
kubelet sets kernel.panic, kernel.panic_on_oops, vm.overcommit_memory ...), interfaces (their routes go with
them), cgroups depth-first (killing anything left in them), mount points.

What it found, the owner's pid and the nodes' mount namespaces are recorded in RECORD (/run: gone at reboot, as
is all of the above). A `prepare()` that finds the record of a dead owner (a harness killed by SIGKILL, whose
state directory may be gone too) restores from it first; a live owner means another cluster runs: refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_HOSTPATH_ROOT
from ..controlplane.cluster import SERVICE_CIDR
from .processes import NodesError, kill_namespace, run

HOST_ADDRESS = "10.244.0.1"
POD_RANGE = "10.244.0.0/16"
HOST_INTERFACE = "llnodes0"
CHAIN_PREFIXES = ("KUBE-", "CNI-")
IPSET_PREFIXES = ("KUBE-", "kube-router-")
TABLES = ("filter", "nat", "mangle", "raw")
SYSCTLS = ("net.ipv4.ip_forward", "kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory",
           "vm.panic_on_oom", "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes",
           "net.ipv4.conf.all.route_localnet", "net.bridge.bridge-nf-call-iptables")
# Paths the kubelet and containerd hard-code; each node bind-mounts its own directory over them, privately. Also
# the operator's HostPath cache root (its parent): each node keeps its own HostPath caches, as separate machines do.
MOUNT_POINTS = ("/var/lib/kubelet", "/var/log/containers", "/run/containerd", "/var/lib/cni",
                str(Path(DEFAULT_HOSTPATH_ROOT).parent))
RECORD = Path("/run/llama-operator-nodes.json")


def bridge_name(index: int) -> str:
    return f"llnodes{index}"


def bridge_address(index: int) -> str:
    return f"10.244.{index}.1"


def pod_subnet(index: int) -> str:
    return f"10.244.{index}.0/24"


def cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 and the v2 `unified` one, where runc also makes directories)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split(" ")[0] in ("cgroup", "cgroup2"):
            found.append(Path(left.split(" ")[4]))
    return found


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = _sysctl_path(name).read_text().strip()
    return values


def chains(binary: str) -> dict[str, list[str]]:
    """{table: [chain, ...]} of `binary` (iptables or ip6tables)."""
    found: dict[str, list[str]] = {}
    for table in TABLES:
        listing = run([binary, "-w", "-t", table, "-S"], check=False)
        found[table] = [line.split()[1] for line in listing.stdout.splitlines() if line.startswith(("-N ", "-P "))]
    return found


def ipsets() -> list[str]:
    """Names of the ipsets (kube-router's NetworkPolicy firewall makes KUBE-SRC-*/KUBE-DST-* ...)."""
    return run(["ipset", "list", "-n"], check=False).stdout.split()


def mounts_under(prefixes: list[str]) -> list[str]:
    """Mount points in this (the host's) mount namespace at or below any of `prefixes`, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split(" ")[4].encode().decode("unicode_escape")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)


@dataclass
class Host:
    """The host state of one real-node cluster of `len(nodes)` nodes (node k+1 on bridge llnodes<k+1>)."""

    state_dir: Path
    nodes: list[str]
    found: dict[str, object] = field(default_factory=dict)

    def interfaces(self) -> list[str]:
        return [HOST_INTERFACE] + [bridge_name(i + 1) for i in range(len(self.nodes))]

    def prepare(self) -> None:
        """Refuses (NodesError) when another real-node cluster runs on this machine; restores first what a dead
        one left."""
        _restore_dead_owner()
        for name in self.interfaces():
            if Path(f"/sys/class/net/{name}").exists():
                raise NodesError(f"interface {name} already exists: another real-node cluster runs on this machine "
                                 f"(stop it, or remove what it left with `ip link delete {name}`)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.found = {
            "pid": os.getpid(),
            "state_dir": str(self.state_dir),
            "nodes": self.nodes,
            "namespaces": [],
            "sysctls": read_sysctls(),
            "chains": {binary: chains(binary) for binary in ("iptables", "ip6tables")},
            "ipsets": ipsets(),
            "mount_points": [p for p in MOUNT_POINTS if not Path(p).exists()],
        }
        self._write_record()
        try:
            self._make_interfaces()
            _write_sysctl("net.ipv4.ip_forward", "1")
            for name in self.nodes:
                make_cgroup_root(name)
            for point in MOUNT_POINTS:
                Path(point).mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.restore()
            raise

    def add_namespace(self, namespace: str) -> None:
        """A node's mount namespace ("mnt:[...]"): restore kills whatever a crash left in it."""
        self.found.setdefault("namespaces", []).append(namespace)  # type: ignore[attr-defined]
        self._write_record()

    def add_process(self, pid: int) -> None:
        """A process outside the nodes' namespaces (kube-proxy, the registry): restore kills it if a crash left it
        running (the same executable at the same pid)."""
        with contextlib.suppress(OSError):
            self.found.setdefault("processes", []).append([pid, os.readlink(f"/proc/{pid}/exe")])  # type: ignore
            self._write_record()

    def _write_record(self) -> None:
        tmp = RECORD.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.found, indent=1))
        tmp.replace(RECORD)

    def _make_interfaces(self) -> None:
        for index, name in enumerate(self.interfaces()):
            run(["ip", "link", "add", "name", name, "type", "bridge"])
            address = f"{HOST_ADDRESS}/32" if index == 0 else f"{bridge_address(index)}/24"
            run(["ip", "addr", "add", address, "dev", name])
            run(["ip", "link", "set", name, "up"])
        for destination in (POD_RANGE, SERVICE_CIDR):
            run(["ip", "route", "add", destination, "dev", HOST_INTERFACE])

    def restore(self) -> list[str]:
        """Put the host back as `prepare` found it; safe to call twice. Returns what could not be undone (empty
        when all went back)."""
        if not self.found:
            return []
        problems: list[str] = []
        for pid, exe in list(self.found.get("processes", [])):  # type: ignore[call-overload]
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/exe") == exe:
                    os.kill(pid, signal.SIGKILL)
        for namespace in list(self.found.get("namespaces", [])):  # type: ignore[call-overload]
            try:
                kill_namespace(namespace)
            except NodesError as exc:
                problems.append(str(exc))
        for point in mounts_under([str(self.state_dir), *MOUNT_POINTS]):
            outcome = run(["umount", "--lazy", point], check=False)
            if outcome.returncode != 0:
                problems.append(f"umount {point}: {outcome.stderr.strip()}")
        for binary, before in dict(self.found["chains"]).items():  # type: ignore[call-overload]
            problems += delete_new_chains(binary, before)
        before = set(self.found.get("ipsets", ipsets()))  # type: ignore[call-overload]
        for name in {n for n in set(ipsets()) - before if n.startswith(IPSET_PREFIXES)}:
            outcome = run(["ipset", "destroy", name], check=False)
            if outcome.returncode != 0:
                problems.append(f"ipset destroy {name}: {outcome.stderr.strip()}")
        for name, value in dict(self.found["sysctls"]).items():  # type: ignore[call-overload]
            try:
                _write_sysctl(name, str(value))
            except OSError as exc:
                problems.append(f"sysctl {name}={value}: {exc}")
        for name in self.interfaces():
            if Path(f"/sys/class/net/{name}").exists():
                outcome = run(["ip", "link", "delete", name], check=False)
                if outcome.returncode != 0:
                    problems.append(f"ip link delete {name}: {outcome.stderr.strip()}")
        for name in self.nodes:
            problems += remove_cgroup_root(name)
        for point in list(self.found.get("mount_points", [])):  # type: ignore[call-overload]
            with contextlib.suppress(OSError):
                Path(point).rmdir()
        if not problems:
            if _read_record().get("pid") == self.found.get("pid"):
                RECORD.unlink(missing_ok=True)
            self.found = {}
        return problems


def _read_record() -> dict[str, object]:
    try:
        return dict(json.loads(RECORD.read_text()))
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _restore_dead_owner() -> None:
    """What a real-node cluster whose process died left: restored, or a NodesError if its owner still runs."""
    found = _read_record()
    if not found:
        return
    owner = int(found.get("pid", 0))  # type: ignore[call-overload]
    if owner == os.getpid() or _alive(owner):
        raise NodesError(f"another real-node cluster runs on this machine (pid {owner}, state "
                         f"{found.get('state_dir')}): stop it first")
    host = Host(Path(str(found.get("state_dir"))), list(found.get("nodes", [])), found)  # type: ignore[call-overload]
    problems = host.restore()
    if problems:
        raise NodesError(f"could not restore what the real-node cluster of pid {owner} (dead) left: "
                         + "; ".join(problems))


def _write_sysctl(name: str, value: str) -> None:
    path = _sysctl_path(name)
    if path.read_text().strip() != value:
        path.write_text(value)


def make_cgroup_root(name: str) -> None:
    for hierarchy in cgroup_hierarchies():
        directory = hierarchy / name
        directory.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # an empty cpuset admits no process
            if (hierarchy / knob).exists():
                (directory / knob).write_text((hierarchy / knob).read_text())


def remove_cgroup_root(name: str) -> list[str]:
    """Remove /<name> in every hierarchy, deepest first, killing whatever still lives in it."""
    problems = []
    for hierarchy in cgroup_hierarchies():
        root = hierarchy / name
        if not root.is_dir():
            continue
        for directory in sorted((p for p in [root, *root.rglob("*")] if p.is_dir()),
                                key=lambda p: len(p.parts), reverse=True):
            if not _rmdir_cgroup(directory):
                problems.append(f"cgroup {directory} could not be removed")
    return problems


def _rmdir_cgroup(directory: Path) -> bool:
    for _ in range(50):
        try:
            directory.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            with contextlib.suppress(OSError):
                for pid in (directory / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)
    return False


def delete_new_chains(binary: str, before: dict[str, list[str]]) -> list[str]:
    """Delete the KUBE-*/CNI-* chains of `binary` that were not there `before`, and every rule that jumps to them."""
    problems = []
    for table in TABLES:
        listing = run([binary, "-w", "-t", table, "-S"], check=False).stdout.splitlines()
        existing = {line.split()[1] for line in listing if line.startswith("-N ")}
        doomed = {c for c in existing - set(before.get(table, [])) if c.startswith(CHAIN_PREFIXES)}
        if not doomed:
            continue
        for line in listing:
            words = shlex.split(line)
            if words[0] == "-A" and words[1] not in doomed and _jumps_to(words, doomed):
                run([binary, "-w", "-t", table, "-D", *words[1:]], check=False)
        for chain in doomed:
            run([binary, "-w", "-t", table, "-F", chain], check=False)
        for chain in doomed:
            outcome = run([binary, "-w", "-t", table, "-X", chain], check=False)
            if outcome.returncode != 0:
                problems.append(f"{binary} -t {table} -X {chain}: {outcome.stderr.strip()}")
    return problems


def _jumps_to(words: list[str], chains: set[str]) -> bool:
    pairs = zip(words, words[1:], strict=False)
    return any(flag in ("-j", "-g", "--jump", "--goto") and target in chains for flag, target in pairs)
