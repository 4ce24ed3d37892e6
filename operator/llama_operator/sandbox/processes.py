"""The sandbox's container processes: start one in a pod's namespaces, stop its whole process group, and its
exit code as a container's.

Each process is its own session (so its process group can be signalled as a whole) and gets
PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed sandbox leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

from ..controlplane.cluster import die_with_parent
from .network import enter_pod


async def spawn(argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path,
                pod: tuple[str, dict[str, str]] | None = None) -> asyncio.subprocess.Process:
    """Start a process in a session of its own, output appended to `log_path`; with `pod` = (netns, /run
    mounts), inside that pod's network namespace and a private mount namespace."""
    def prepare() -> None:
        die_with_parent(signal.SIGKILL)  # however the sandbox dies
        if pod is not None:
            enter_pod(*pod)

    with log_path.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=str(cwd), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, preexec_fn=prepare)


def signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM, wait `grace` seconds, SIGKILL; then make sure no member of its process group is left."""
    if proc.returncode is None:
        signal_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            signal_group(proc, signal.SIGKILL)
            await proc.wait()
    signal_group(proc, signal.SIGKILL)  # grandchildren that outlived the leader
    return exit_code(proc.returncode)


def exit_code(returncode: int | None) -> int:
    """A container's exit code: 128 + signal for a process killed by a signal (137 for SIGKILL)."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode
