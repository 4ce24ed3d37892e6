"""The sandbox kubelet's probes: startup, readiness and liveness, as specified (httpGet, tcpSocket, exec), against
the pod's IP.

A failed startup or liveness probe stops the container (SIGTERM, the probe's or the pod's grace period,
SIGKILL) for its restart loop (containers.py) to restart it; readiness sets the container's `ready`. Failures
are Unhealthy events, restarts Killing events, like a kubelet's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from .client import ApiError
from .command import ContainerCommands
from .images import ImageError
from .pod import ConfigError, ContainerStatus, Pod
from .processes import spawn, terminate

log = logging.getLogger("llama_operator.sandbox")


class Prober:
    """Probes the containers of one pod."""

    def __init__(self, pod: Pod, commands: ContainerCommands) -> None:
        self.pod = pod
        self.commands = commands

    async def run(self, status: ContainerStatus, proc: asyncio.subprocess.Process) -> None:
        """Probe a started container until it exits (or a startup/liveness probe made it exit)."""
        pod = self.pod
        container = status.spec
        startup = container.get("startupProbe")
        if startup is not None and not await self._until(startup, status, "Startup"):
            log.info("Startup probe of %s in pod %s/%s failed; restarting it", status.name, pod.namespace, pod.name)
            pod.event("Normal", "Killing", f"Container {status.name} failed startup probe, will be restarted",
                      status.name)
            await terminate(proc, self._grace(startup))
            return
        status.started = True
        pod.changed()
        tasks = []
        readiness = container.get("readinessProbe")
        if readiness is None:
            status.ready = True
            pod.changed()
        else:
            tasks.append(asyncio.create_task(self._readiness(readiness, status)))
        liveness = container.get("livenessProbe")
        if liveness is not None:
            tasks.append(asyncio.create_task(self._liveness(liveness, status, proc)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    def _grace(self, probe: dict[str, Any]) -> float:
        value = probe.get("terminationGracePeriodSeconds")
        return float(value) if value is not None else self.pod.grace

    async def _verdicts(self, probe: dict[str, Any], status: ContainerStatus, kind: str
                        ) -> AsyncIterator[bool | None]:
        """Run a probe on its schedule; after each check yield True once successThreshold checks in a row passed,
        False once failureThreshold checks in a row failed, else None (no verdict yet).

        The schedule is the kubelet's: a startup probe ticks every periodSeconds from the moment the pod was
        admitted (its probe worker exists before the container runs), skipping ticks within
        initialDelaySeconds of the container's start; a readiness probe runs at once when the container has
        started (the kubelet triggers it manually then) and every periodSeconds after that."""
        loop = asyncio.get_running_loop()
        period = float(probe.get("periodSeconds") or 10)
        initial = float(probe.get("initialDelaySeconds") or 0)
        need_ok, need_fail = int(probe.get("successThreshold") or 1), int(probe.get("failureThreshold") or 3)
        container_started = loop.time()
        aligned = kind == "Startup"
        if not aligned:
            await asyncio.sleep(initial)
        ok = fail = 0
        while True:
            if aligned:
                await asyncio.sleep(period - (loop.time() - self.pod.admitted) % period)
                if loop.time() - container_started < initial:
                    continue
            passed, detail = await self._check(probe, status.spec)
            if passed:
                ok, fail = ok + 1, 0
            else:
                ok, fail = 0, fail + 1
                if fail == need_fail:
                    self.pod.event("Warning", "Unhealthy", f"{kind} probe failed: {detail}", status.name)
            yield True if ok >= need_ok else False if fail >= need_fail else None
            if not aligned:
                await asyncio.sleep(period)

    async def _until(self, probe: dict[str, Any], status: ContainerStatus, kind: str) -> bool:
        async for verdict in self._verdicts(probe, status, kind):
            if verdict is not None:
                return verdict
        raise AssertionError("unreachable: probing never ends by itself")

    async def _readiness(self, probe: dict[str, Any], status: ContainerStatus) -> None:
        async for verdict in self._verdicts(probe, status, "Readiness"):
            if verdict is not None and verdict != status.ready:
                status.ready = verdict
                self.pod.changed()

    async def _liveness(self, probe: dict[str, Any], status: ContainerStatus,
                        proc: asyncio.subprocess.Process) -> None:
        pod = self.pod
        period = float(probe.get("periodSeconds") or 10)
        need_fail = int(probe.get("failureThreshold") or 3)
        fail = 0
        detail = ""
        while fail < need_fail:
            await asyncio.sleep(period)  # the first tick: the startup probe has just answered
            passed, detail = await self._check(probe, status.spec)
            fail = 0 if passed else fail + 1
        log.info("Liveness probe of %s in pod %s/%s failed; restarting it", status.name, pod.namespace, pod.name)
        pod.event("Warning", "Unhealthy", f"Liveness probe failed: {detail}", status.name)
        pod.event("Normal", "Killing", f"Container {status.name} failed liveness probe, will be restarted",
                  status.name)
        await terminate(proc, self._grace(probe))

    @staticmethod
    def _resolve_port(port: Any, container: dict[str, Any]) -> int:
        if isinstance(port, str) and not port.isdigit():
            for item in container.get("ports") or []:
                if item.get("name") == port:
                    return int(item["containerPort"])
            raise ValueError(f"no port named {port}")
        return int(port)

    async def _check(self, probe: dict[str, Any], container: dict[str, Any]) -> tuple[bool, str]:
        pod = self.pod
        timeout = float(probe.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                host = get.get("host") or pod.ip
                url = f"{get.get('scheme', 'HTTP').lower()}://{host}:{self._resolve_port(get['port'], container)}" \
                      f"{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                async with pod.node.probe_session.get(url, headers=headers, ssl=False, allow_redirects=False,
                                                      timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                    ok = 200 <= response.status < 400
                    return ok, f"HTTP probe failed with statuscode: {response.status}"
            if "tcpSocket" in probe:
                port = self._resolve_port(probe["tcpSocket"]["port"], container)
                _, writer = await asyncio.wait_for(asyncio.open_connection(pod.ip, port), timeout)
                writer.close()
                return True, ""
            if "exec" in probe:
                termination_file = pod.dir / f"{container['name']}.probe-termination-log"
                argv, env, _, run_mounts = await self.commands.command(
                    {**container, "command": probe["exec"]["command"], "args": []}, termination_file)
                assert pod.address is not None
                proc = await spawn(argv, env=env, cwd=pod.dir, log_path=pod.dir / "probes.log",
                                   pod=(pod.address.netns, run_mounts))
                try:
                    code = await asyncio.wait_for(proc.wait(), timeout)
                    return code == 0, f"command {probe['exec']['command']} exited with {code}"
                except TimeoutError:
                    await terminate(proc, 0)
                    return False, f"command timed out after {timeout:g}s"
        except (aiohttp.ClientError, OSError, TimeoutError, ImageError, ConfigError, ApiError, ValueError) as exc:
            return False, str(exc) or type(exc).__name__
        log.warning("pod %s/%s: unsupported probe %s; treating it as passing", pod.namespace, pod.name,
                    sorted(probe))
        return True, ""
