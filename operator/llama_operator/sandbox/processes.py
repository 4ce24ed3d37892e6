"""The sandbox's own child processes (`--operator local`: `llama-operator run`): find the executable, start it in
a session of its own, stop its whole process group.

Each process is its own session (so its process group can be signalled as a whole) and gets
PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed sandbox leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path

from ..controlplane.cluster import die_with_parent


class ExecutableMissing(RuntimeError):
    """The executable to run is not installed (one line: which one, and where it was looked for)."""


def operator_executable() -> str:
    """The `llama-operator` console script of the running Python environment."""
    beside = Path(sys.executable).with_name("llama-operator")
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("llama-operator")
    if found:
        return found
    raise ExecutableMissing(f"no llama-operator executable beside {sys.executable} or on PATH")


async def spawn(argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path) -> asyncio.subprocess.Process:
    """Start a process in a session of its own, output appended to `log_path`."""
    with log_path.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=str(cwd), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGKILL))  # however the sandbox dies


def signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> int | None:
    """SIGTERM, wait `grace` seconds, SIGKILL; then make sure no member of its process group is left. Returns
    the exit status (negative: killed by that signal)."""
    if proc.returncode is None:
        signal_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            signal_group(proc, signal.SIGKILL)
            await proc.wait()
    signal_group(proc, signal.SIGKILL)  # grandchildren that outlived the leader
    return proc.returncode
