"""The node processes (containerd, kubelet, kube-proxy, the registry): one long-running child each, its log file,
its stop, and `run` for the short commands (ip, iptables, ctr, skopeo) around them. `NodesError` is the one error
of this package: a line that says what failed, then the tail of the failing process's log or output.

Every child gets the same guard environment: HTTP(S)_PROXY pointing at a dead port on 127.0.0.1, so an image
pull or any other request that escapes the local registry fails on the spot instead of leaving the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..controlplane.cluster import ChildProcess

DEAD_PROXY = "http://127.0.0.1:9"
NO_PROXY = "127.0.0.1,localhost,10.244.0.0/16"


class NodesError(RuntimeError):
    """Real nodes could not be prepared, started or stopped; the message ends with the failing log's tail."""


def child_env(path_first: Sequence[Path] = ()) -> dict[str, str]:
    """The environment of every node process: the proxy guard, and the kit's directory first on PATH (containerd
    finds its shim there)."""
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[key] = DEAD_PROXY
    env["NO_PROXY"] = env["no_proxy"] = NO_PROXY
    # distribution's OpenTelemetry exporters stay off: nothing to send anything to.
    env["OTEL_TRACES_EXPORTER"] = "none"
    env["OTEL_SDK_DISABLED"] = "true"
    env["PATH"] = os.pathsep.join([*(str(p) for p in path_first), env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
    return env


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, input: str | None = None,
        env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A short command; with `check`, a non-zero exit is a NodesError quoting its output."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, input=input, env=env, timeout=timeout)
    except FileNotFoundError as exc:
        raise NodesError(f"{args[0]} not found: {exc}") from None
    except subprocess.TimeoutExpired:
        raise NodesError(f"`{' '.join(args)}` did not finish in {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        raise NodesError(f"`{' '.join(args)}` exited {proc.returncode}:\n{tail(proc.stderr + proc.stdout)}")
    return proc


@dataclass
class Process(ChildProcess):
    """A node process: the control plane's child process (controlplane.cluster.ChildProcess) with the guard
    environment by default, its log directory made at start, and whatever of its group outlived it killed at stop
    (a kubelet or containerd leaves helpers behind)."""

    env: dict[str, str] | None = field(default_factory=child_env)

    def start(self) -> Process:  # type: ignore[override]  # returns itself for `Process(...).start()`
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        super().start()
        return self

    def stop(self, grace: float = 10.0) -> None:
        pid = self.pid
        super().stop(grace)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # whatever of its group outlived the leader

    def log_tail(self, lines: int = 20) -> str:
        try:
            return tail(self.log_path.read_text(errors="replace"), lines)
        except OSError:
            return "(no log)"

    def error(self, what: str) -> NodesError:
        """`what` (e.g. "exited during start-up") with this process's log tail."""
        return NodesError(f"{self.name} {what} (log {self.log_path}):\n{self.log_tail()}")


def processes_in(namespace: str) -> list[int]:
    """Pids whose mount namespace is `namespace` ("mnt:[...]")."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == namespace:
                    pids.append(int(entry.name))
    return pids


def kill_namespace(namespace: str, timeout: float = 10.0) -> None:
    """SIGKILL every process left in the mount namespace until none is (the namespace then goes)."""
    deadline = time.monotonic() + timeout
    while pids := processes_in(namespace):
        if time.monotonic() > deadline:
            raise NodesError(f"processes {pids} of mount namespace {namespace} outlived SIGKILL for {timeout:.0f} s")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
