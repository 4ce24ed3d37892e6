"""The sandbox kubelet's pod lifecycle: one pod's containers as local processes, from admission to stop.

Per pod (`PodRuntime`): a network namespace with the pod's IP (network.py); its volumes become directories
(volumes.py); the init containers run one after another to completion, then the main containers start
(containers.py: restarts, backoff, termination messages, logs), each probed as specified (probes.py); the
phase follows (Succeeded or Failed once every container ended for good) and the status goes through the API's
`pods/status` (pod.py).

Stopping a pod sends SIGTERM to every container's process group, waits the grace period, then SIGKILLs
(processes.py), and removes the pod's network namespace.

Deviations from a real kubelet (docs/sandbox.md): no images (images.py maps them to local executables) and
no root filesystem of their own, so volume paths in arguments and environment are rewritten (command.py;
except under /run, which is a private tmpfs with real bind mounts); resource limits, security contexts and
read-only mounts are not enforced.

The modules depend one way: processes, pod <- volumes <- command <- probes <- containers <- kubelet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from .command import ContainerCommands
from .containers import ContainerRunner
from .pod import NodeContext, Pod
from .probes import Prober
from .processes import terminate
from .volumes import PodVolumes

log = logging.getLogger("llama_operator.sandbox")


class PodRuntime(Pod):
    """Runs one pod until it is stopped (deleted from the API, or the sandbox shuts down)."""

    def __init__(self, pod: dict[str, Any], node: NodeContext, on_change: Callable[[], None]) -> None:
        super().__init__(pod, node, on_change)
        self.volumes = PodVolumes(self)
        commands = ContainerCommands(self, self.volumes)
        self.containers = ContainerRunner(self, commands, Prober(self, commands))

    def start(self) -> None:
        self.admitted = asyncio.get_running_loop().time()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tasks = [asyncio.create_task(self.write_status(), name=f"status {self.name}"),
                      asyncio.create_task(self._run(), name=f"pod {self.name}")]
        self.changed()

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM every container, wait the grace period, SIGKILL; then end the pod's tasks and network."""
        if self.stopping:
            await self.done.wait()
            return
        self.stopping = True
        grace = self.grace if grace is None else grace
        running = [s for s in self.init_statuses + self.statuses if s.proc is not None]
        for status in running:
            self.event("Normal", "Killing", f"Stopping container {status.name}", status.name)
        await asyncio.gather(*(terminate(s.proc, grace) for s in running if s.proc is not None))
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.node.network.remove_pod(self.uid)
        log.info("Stopped pod %s/%s", self.namespace, self.name)
        self.done.set()
        self._on_change()

    async def _run(self) -> None:
        try:
            self.address = await self.node.network.add_pod(self.uid)
            self.changed()
            while True:
                if await self.volumes.prepare():
                    break
                await asyncio.sleep(2)  # the API may have the missing Secret/PVC binding later
            for status in self.init_statuses:
                if not await self.containers.run(status, init=True):
                    self.failed = True
                    self.changed()
                    return
            self.initialized = True
            self.changed()
            results = await asyncio.gather(*(self.containers.run(s, init=False) for s in self.statuses))
            if not self.stopping:
                codes = [s.state.get("terminated", {}).get("exitCode", 1) for s in self.statuses]
                self.succeeded = all(results) and all(code == 0 for code in codes)
                self.failed = not self.succeeded
                self.changed()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s/%s: the sandbox kubelet failed", self.namespace, self.name)
