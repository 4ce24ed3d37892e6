"""What the e2e tests read of a pod's containers on a real node, from this machine: the host processes of a
container or a pod (cgroup v1 names both: `.../pod<uid>/<container id>`), and through /proc a file as the
container sees it or its environment; and a node's power cut (`power_off`). Containers run in the host's pid
namespace view, so no `kubectl exec` (and no shell in the image) is needed."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any


def _pids_whose_cgroup_has(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            alive = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if alive and marker in (proc / "cgroup").read_text():
                found.append(int(proc.name))
        except OSError:
            continue
    return sorted(found)


def container_pids(container_id: str) -> list[int]:
    """Live processes of one container (`containerd://<id>` as the pod status gives it)."""
    return _pids_whose_cgroup_has("/" + container_id.split("://", 1)[-1])


def pod_pids(uid: str) -> list[int]:
    """Live processes of every container of the pod with this uid, its sandbox (pause) included."""
    return _pids_whose_cgroup_has(f"/pod{uid}/")


def main_pid(pod: Any, container: str) -> int:
    """The first process of a running container of `pod` (a kubernetes V1Pod)."""
    status = next(s for s in pod.status.container_statuses if s.name == container)
    assert status.container_id and status.container_id.startswith("containerd://"), status.container_id
    pids = container_pids(status.container_id)
    assert pids, f"no process of {pod.metadata.name}/{container} ({status.container_id})"
    return pids[0]


def container_file(pid: int, path: str) -> Path:
    """`path` as the container of process `pid` sees it (its root filesystem and volumes). Symbolic links resolve
    inside the container (an image's /var/run -> /run would otherwise point into this machine's /run)."""
    root = Path(f"/proc/{pid}/root")
    parts, resolved, hops = [p for p in path.split("/") if p], root, 0
    while parts:
        part = parts.pop(0)
        candidate = resolved / part
        if candidate.is_symlink():
            hops += 1
            assert hops < 40, f"too many symbolic links in {path}"
            target = os.readlink(candidate)
            parts = [p for p in target.split("/") if p] + parts
            resolved = root if target.startswith("/") else resolved
            continue
        resolved = candidate if part != ".." else (resolved.parent if resolved != root else root)
    return resolved


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def power_off(state_dir: Path, node: str) -> int:
    """What a node losing power does to its side of the cluster: every process of the sandbox's node `node` (its
    kubelet, containerd and the shims: its mount namespace) and every container it ran (its pod cgroups under
    `cgroupRoot: /<node>`: a container has a mount namespace of its own and would outlive its killed shim)
    SIGKILLed at once. The process that holds the node's mount namespace is spared, so the sandbox's own stop
    still finds and clears the namespace. Returns how many processes were killed."""
    marker = f"{state_dir}/nodes/{node}/"
    kubelet = next(pid for pid in _pids() if marker in _cmdline(pid) and "kubelet" in _cmdline(pid).split()[0])
    namespace = os.readlink(f"/proc/{kubelet}/ns/mnt")
    victims = set(_pids_whose_cgroup_has(f"/{node}/kubepods"))
    for pid in _pids():
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/mnt") == namespace and _cmdline(pid) != "sleep infinity":
                victims.add(pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
