"""One real node: its containerd and kubelet in one private mount namespace of their own.

The namespace is held by a small process (`unshare --mount --propagation private`, then `sleep`) that first
bind-mounts the node's own directories over the paths the kubelet and containerd hard-code or share
(host.MOUNT_POINTS: /var/lib/kubelet, /var/log/containers, /run/containerd, /var/lib/cni, and the HostPath cache
root's /var/lib/llama-operator); containerd and the kubelet then join it with `nsenter`. Every mount they make
(volumes, overlay root filesystems, the pods' network namespaces) lives and dies with that namespace, invisible to
the host and to the other node. Both stay in the host's network namespace: the node's address is its bridge's.

`stop` kills the containers (ctr), the kubelet and containerd, then every process still in the namespace (shims,
container processes), so the namespace and all its mounts are gone when it returns.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import containerd, kubelet
from .host import MOUNT_POINTS, bridge_address
from .kit import NodeKit
from .processes import NodesError, Process, child_env, kill_namespace


@dataclass
class Node:
    name: str
    index: int
    state_dir: Path
    kit: NodeKit
    holder: Process | None = None
    containerd: Process | None = None
    kubelet: Process | None = None
    namespace: str = ""
    _binds: dict[str, Path] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return bridge_address(self.index)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def start(self, cluster: kubelet.Issuer, *, sandbox_image: str, registry: str,
              on_namespace: Callable[[str], None] = lambda namespace: None) -> None:
        """Namespace (reported to `on_namespace` at once), containerd (answering), kubelet (started; the caller
        waits for the Node to be Ready)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._enter_namespace()
        on_namespace(self.namespace)
        env = child_env([self.kit.directory])
        config = containerd.write_files(self.state_dir, self.index, runc=self.kit.tool("runc"),
                                        cni_bin_dir=self.kit.cni_dir, sandbox_image=sandbox_image,
                                        registry=registry)
        self.containerd = Process(f"{self.name}/containerd",
                                  self._in_namespace([str(self.kit.binary("containerd")), "--config", str(config)]),
                                  self.logs / "containerd.log", env).start()
        containerd.wait_ready(self.containerd, self.ctr)
        kubelet_config = kubelet.write_files(cluster, name=self.name, index=self.index, address=self.address,
                                             node_dir=self.state_dir, runtime_socket=Path(containerd.SOCKET))
        argv = kubelet.kubelet_argv(self.kit.binary("kubelet"), name=self.name, address=self.address,
                                    node_dir=self.state_dir, config=kubelet_config)
        self.kubelet = Process(f"{self.name}/kubelet", self._in_namespace(argv), self.logs / "kubelet.log",
                               env).start()

    def _enter_namespace(self, timeout: float = 10.0) -> None:
        script = ["set -e"]
        for point in MOUNT_POINTS:
            own = self.state_dir / "mounts" / point.strip("/").replace("/", "-")
            own.mkdir(parents=True, exist_ok=True)
            self._binds[point] = own
            script.append(f"mount --bind {shlex.quote(str(own))} {shlex.quote(point)}")
        script.append("exec sleep infinity")
        self.holder = Process(f"{self.name}/namespace",
                              [str(self.kit.tool("unshare")), "--mount", "--propagation", "private", "--",
                               "/bin/sh", "-c", "\n".join(script)], self.logs / "namespace.log").start()
        # Joined only once it runs `sleep`: by then unshare has made the namespace private and the binds are made.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.holder.running():
                raise self.holder.error("could not make the node's mount namespace")
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.holder.pid}/exe").endswith("/sleep"):
                    self.namespace = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
                    return
            time.sleep(0.02)
        raise self.holder.error(f"mount namespace not ready after {timeout:.0f} s")

    @property
    def ctr(self) -> list[str]:
        """`ctr` on this node's containerd, in its namespace (where its socket is)."""
        return self._in_namespace([str(self.kit.binary("ctr")), "--address", containerd.SOCKET])

    def _in_namespace(self, argv: list[str]) -> list[str]:
        return [str(self.kit.tool("nsenter")), f"--target={self.holder.pid if self.holder else 0}", "--mount", "--",
                *argv]

    def failed(self) -> NodesError | None:
        """The error of the first of its processes that exited, if one did."""
        for process in (self.holder, self.containerd, self.kubelet):
            if process is not None and process.popen is not None and not process.running():
                return process.error(f"exited (code {process.popen.returncode})")
        return None

    def stop(self) -> None:
        """Safe after a partial start and twice."""
        if self.kubelet is not None:
            self.kubelet.stop(grace=5)
        if self.containerd is not None:
            if self.containerd.running():
                containerd.remove_all_containers(self.ctr)
            self.containerd.stop(grace=10)
        if self.holder is not None:
            self.holder.stop(grace=2)
        if self.namespace:
            kill_namespace(self.namespace)
            self.namespace = ""

