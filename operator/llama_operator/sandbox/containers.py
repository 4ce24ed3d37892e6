"""One sandbox container's life: start its process, wait for it to exit, record how it ended, restart it as
the pod's restartPolicy says.

Crashed containers restart with the kubelet's backoff (immediately, then 10 s doubling to 5 min, reset after
10 min of running). Termination messages come from the container's termination message file or, with
`FallbackToLogsOnError`, from the tail of its log. Each instance's output goes to `<container>.log` in the pod
directory, the previous instance's to `<container>.previous.log`: what `kubectl logs [--previous]` serves
(logs.py). Events: Pulled, Created, Started, BackOff, Failed, like a kubelet's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from ..clock import now_rfc3339
from .client import ApiError
from .command import ContainerCommands
from .images import ImageError
from .pod import ConfigError, ContainerStatus, Pod
from .probes import Prober
from .processes import exit_code, signal_group, spawn

log = logging.getLogger("llama_operator.sandbox")

BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET = 600.0
MAX_MESSAGE = 4096
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048


class ContainerRunner:
    """Runs the containers of one pod, one `run()` per container."""

    def __init__(self, pod: Pod, commands: ContainerCommands, prober: Prober) -> None:
        self.pod = pod
        self.commands = commands
        self.prober = prober

    async def run(self, status: ContainerStatus, *, init: bool) -> bool:
        """Run (and restart, per restartPolicy) one container. True once a run ended as the pod wants it to
        (init containers: exit 0); False when the pod failed or is stopping."""
        pod = self.pod
        container = status.spec
        policy = pod.spec.get("restartPolicy") or "Always"
        crashes = 0
        termination_file = pod.dir / f"{status.name}.termination-log"
        image = container.get("image", "")
        while not pod.stopping:
            try:
                argv, env, _, run_mounts = await self.commands.command(container, termination_file)
            except ImageError as exc:
                status.state = {"waiting": {"reason": "ErrImagePull", "message": str(exc)}}
                pod.event("Warning", "Failed", f'Failed to pull image "{image}": {exc}', status.name)
                pod.changed()
                await asyncio.sleep(BACKOFF_INITIAL)
                continue
            except ConfigError as exc:
                status.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                pod.event("Warning", "Failed", f"Error: {exc}", status.name)
                pod.changed()
                await asyncio.sleep(2)
                continue
            except (ApiError, aiohttp.ClientError) as exc:
                log.warning("pod %s/%s: %s", pod.namespace, pod.name, exc)
                await asyncio.sleep(2)
                continue
            if status.instance == 0:
                pod.event("Normal", "Pulled", f'Container image "{image}" already present on machine '
                          f"(the sandbox runs {argv[0]})", status.name)
            termination_file.write_bytes(b"")
            log_path = pod.log_path(status.name)
            if status.instance > 0 and log_path.exists():
                os.replace(log_path, pod.log_path(status.name, previous=True))
            log_path.write_bytes(b"")
            started = time.monotonic()
            try:
                assert pod.address is not None
                proc = await spawn(argv, env=env, cwd=pod.dir, log_path=log_path,
                                   pod=(pod.address.netns, run_mounts))
            except OSError as exc:
                status.state = {"waiting": {"reason": "RunContainerError", "message": str(exc)}}
                pod.event("Warning", "Failed", f"Error: {exc}", status.name)
                pod.changed()
                await asyncio.sleep(BACKOFF_INITIAL)
                continue
            status.instance += 1
            status.exited.clear()
            status.proc = proc
            status.container_id = f"sandbox://{proc.pid}"
            status.state = {"running": {"startedAt": now_rfc3339()}}
            status.started = init  # main containers are started once their startup probe passes
            log.info("Started container %s in pod %s/%s (pid %d)", status.name, pod.namespace, pod.name, proc.pid)
            pod.event("Normal", "Created", f"Created container: {status.name}", status.name)
            pod.event("Normal", "Started", f"Started container {status.name}", status.name)
            pod.changed()
            probes = None if init else asyncio.create_task(self.prober.run(status, proc))
            code = exit_code(await proc.wait())
            signal_group(proc, signal.SIGKILL)  # anything the container left running
            status.exited.set()
            if probes is not None:
                probes.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probes
            if pod.stopping:
                return False
            terminated = {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": status.state.get("running", {}).get("startedAt", now_rfc3339()),
                "finishedAt": now_rfc3339(),
                "containerID": status.container_id,
            }
            message = self._termination_message(container, termination_file, log_path, code)
            if message:
                terminated["message"] = message
            status.ready = False
            status.started = False
            status.proc = None
            if init and code == 0:
                status.state = {"terminated": terminated}
                pod.changed()
                return True
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                status.state = {"terminated": terminated}
                pod.changed()
                return code == 0
            log.info("Container %s in pod %s/%s exited with code %d; restarting", status.name, pod.namespace,
                     pod.name, code)
            status.last_state = {"terminated": terminated}
            if time.monotonic() - started > BACKOFF_RESET:
                crashes = 0
            delay = 0.0 if crashes == 0 else min(BACKOFF_INITIAL * 2 ** (crashes - 1), BACKOFF_MAX)
            crashes += 1
            status.restart_count += 1
            if delay:
                status.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                    f"back-off {int(delay)}s restarting failed container={status.name} pod={pod.name}"
                    f"_{pod.namespace}({pod.uid})")}}
                pod.event("Warning", "BackOff", "Back-off restarting failed container "
                          f"{status.name} in pod {pod.name}_{pod.namespace}({pod.uid})", status.name)
                pod.changed()
                await asyncio.sleep(delay)
        return False

    @staticmethod
    def _termination_message(container: dict[str, Any], termination_file: Path, log_path: Path, code: int) -> str:
        with contextlib.suppress(OSError):
            text = termination_file.read_bytes()[:MAX_MESSAGE].decode(errors="replace")
            if text.strip():
                return text
        if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError):
                lines = log_path.read_bytes().decode(errors="replace").splitlines()[-FALLBACK_LINES:]
                return "\n".join(lines)[-FALLBACK_BYTES:]
        return ""
