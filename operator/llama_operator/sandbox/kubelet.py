"""The sandbox kubelet: runs one pod's containers as local processes and writes the pod's status.

Per pod (`PodRuntime`): volumes become directories, the init containers run one after another to
completion, then the main containers start; startup, readiness and liveness probes run as specified
(httpGet, tcpSocket, exec); crashed containers restart with the kubelet's backoff (immediately, then 10 s
doubling to 5 min, reset after 10 min of running); termination messages come from the container's
termination message file or, with `FallbackToLogsOnError`, from the tail of its log. Status
(`initContainerStatuses`/`containerStatuses` with running/terminated/waiting, `lastState`, `ready`,
`restartCount`, pod conditions and phase) is written through the API's status subresource.

Stopping a pod sends SIGTERM to every container's process group, waits the pod's grace period, then
SIGKILLs. Each container is its own process group (its children die with it); on Linux every process also
gets PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed sandbox leaves nothing behind.

Deviations from a real kubelet (docs/sandbox.md): once a startup probe succeeds, readiness is probed at
once rather than at its next period tick; resource limits, security contexts and read-only mounts are not
enforced; every pod's IP is 127.0.0.1 (ports are remapped, see images.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import datetime
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from .client import Api, ApiError, resource_path
from .images import ImageError, ImageTable, LocalImage, PathMap, rewrite_listen

log = logging.getLogger("llama_operator.sandbox")

NODE_NAME = "sandbox"
POD_IP = "127.0.0.1"
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET = 600.0
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_MESSAGE = 4096
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
# Environment a container inherits from the node: enough to find shared libraries and reach the network
# the way the host does. Nothing else leaks in (a stray LLAMA_ARG_* or HF_TOKEN would change behaviour).
PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
                   "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "LD_LIBRARY_PATH")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((POD_IP, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the sandbox dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def spawn(argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path) -> asyncio.subprocess.Process:
    """Start a process in a session of its own, output appended to `log_path`."""
    with log_path.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=str(cwd), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True, preexec_fn=_die_with_parent)


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM, wait `grace` seconds, SIGKILL; then make sure no member of its process group is left."""
    if proc.returncode is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace)
        except TimeoutError:
            _signal_group(proc, signal.SIGKILL)
            await proc.wait()
    _signal_group(proc, signal.SIGKILL)  # grandchildren that outlived the leader
    return exit_code(proc.returncode)


def exit_code(returncode: int | None) -> int:
    """A container's exit code: 128 + signal for a process killed by a signal (137 for SIGKILL)."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables expand, `$$` escapes, unknown references stay."""
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR.sub(sub, value)


class ConfigError(Exception):
    """The container cannot be configured yet (a missing Secret/ConfigMap): CreateContainerConfigError."""


class ContainerStatus:
    """One container's status as the kubelet reports it."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.state: dict[str, Any] = {"waiting": {"reason": "PodInitializing"}}
        self.last_state: dict[str, Any] = {}
        self.restart_count = 0
        self.ready = False
        self.started = False
        self.container_id = ""
        self.proc: asyncio.subprocess.Process | None = None

    def to_wire(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name, "image": self.spec.get("image", ""), "imageID": self.spec.get("image", ""),
            "ready": self.ready, "started": self.started, "restartCount": self.restart_count,
            "state": self.state, "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


class PodRuntime:
    """Runs one pod until it is stopped (deleted from the API, or the sandbox shuts down)."""

    def __init__(self, pod: dict[str, Any], *, api: Api, images: ImageTable, state_dir: Path,
                 on_change: Callable[[], None]) -> None:
        meta = pod["metadata"]
        self.pod = pod
        self.namespace: str = meta.get("namespace") or "default"
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid") or ""
        self.labels: dict[str, str] = dict(meta.get("labels") or {})
        self.spec: dict[str, Any] = pod.get("spec") or {}
        self.api = api
        self.images = images
        self.state_dir = state_dir
        self.dir = state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self._on_change = on_change
        self.init_statuses = [ContainerStatus(c) for c in self.spec.get("initContainers") or []]
        self.statuses = [ContainerStatus(c) for c in self.spec.get("containers") or []]
        for status in self.statuses:
            status.state = {"waiting": {"reason": "PodInitializing"}}
        # Network identity: containerPort → pod-private host port; port name → containerPort.
        self.ports: dict[int, int] = {}
        self.port_names: dict[str, int] = {}
        for container in self.spec.get("containers") or []:
            for port in container.get("ports") or []:
                self.ports[int(port["containerPort"])] = free_port()
                if port.get("name"):
                    self.port_names[port["name"]] = int(port["containerPort"])
        self.initialized = False
        self.failed = False
        self.stopping = False
        self.start_time = now()
        self.volumes: dict[str, Path] = {}
        self._dirty = asyncio.Event()
        self._written: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self.initialized and bool(self.statuses) and all(s.ready for s in self.statuses)

    @property
    def grace(self) -> float:
        value = self.spec.get("terminationGracePeriodSeconds")
        return float(30 if value is None else value)

    def start(self) -> None:
        self._writer = asyncio.create_task(self._status_writer(), name=f"status {self.name}")
        self._task = asyncio.create_task(self._run(), name=f"pod {self.name}")
        self._changed()

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM every container, wait the grace period, SIGKILL; then end the pod's tasks."""
        if self.stopping:
            await self.done.wait()
            return
        self.stopping = True
        grace = self.grace if grace is None else grace
        procs = [s.proc for s in self.init_statuses + self.statuses if s.proc is not None]
        await asyncio.gather(*(terminate(p, grace) for p in procs))
        for task in (self._task, self._writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        log.info("Stopped pod %s/%s", self.namespace, self.name)
        self.done.set()
        self._on_change()

    def _changed(self) -> None:
        self._dirty.set()
        self._on_change()

    async def _run(self) -> None:
        try:
            await self._prepare_volumes()
            for status in self.init_statuses:
                if not await self._run_container(status, init=True):
                    self.failed = True
                    self._changed()
                    return
            self.initialized = True
            self._changed()
            await asyncio.gather(*(self._run_container(s, init=False) for s in self.statuses))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s/%s: the sandbox kubelet failed", self.namespace, self.name)

    # ------------------------------------------------------------------------------------------ volumes

    async def _prepare_volumes(self) -> None:
        for volume in self.spec.get("volumes") or []:
            name = volume["name"]
            if "hostPath" in volume:
                path = self.state_dir / "hostpath" / volume["hostPath"]["path"].lstrip("/")
            elif "persistentVolumeClaim" in volume:
                path = self.state_dir / "pvc" / self.namespace / volume["persistentVolumeClaim"]["claimName"]
            else:  # emptyDir, and the pod-local directory for secret/configMap contents
                path = self.dir / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            if "secret" in volume or "configMap" in volume:
                await self._project(volume, path)
            self.volumes[name] = path

    async def _project(self, volume: dict[str, Any], path: Path) -> None:
        if "secret" in volume:
            source, data = volume["secret"], await self._read("secrets", volume["secret"].get("secretName", ""))
            decoded = {k: base64.b64decode(v) for k, v in ((data or {}).get("data") or {}).items()}
        else:
            source, data = volume["configMap"], await self._read("configmaps", volume["configMap"].get("name", ""))
            decoded = {k: v.encode() for k, v in ((data or {}).get("data") or {}).items()}
        items = source.get("items") or [{"key": k, "path": k} for k in decoded]
        for item in items:
            if item["key"] in decoded:
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(decoded[item["key"]])

    async def _read(self, plural: str, name: str) -> dict[str, Any] | None:
        return await self.api.get(resource_path("v1", plural, self.namespace, name))

    # ------------------------------------------------------------------------------------------ environment

    async def _secret_value(self, plural: str, ref: dict[str, Any]) -> str | None:
        obj = await self._read(plural, ref.get("name", ""))
        kind = "secret" if plural == "secrets" else "configmap"
        if obj is None:
            if ref.get("optional"):
                return None
            raise ConfigError(f'{kind} "{ref.get("name")}" not found')
        if plural == "secrets":
            raw = (obj.get("data") or {}).get(ref["key"])
            value = base64.b64decode(raw).decode() if raw is not None else (obj.get("stringData") or {}).get(ref["key"])
        else:
            value = (obj.get("data") or {}).get(ref["key"])
        if value is None and not ref.get("optional"):
            raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind.capitalize()} {self.namespace}/{ref["name"]}')
        return value

    def _field(self, path: str) -> str:
        meta = self.pod.get("metadata") or {}
        simple = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                  "spec.nodeName": NODE_NAME, "spec.serviceAccountName": self.spec.get("serviceAccountName", ""),
                  "status.podIP": POD_IP, "status.hostIP": POD_IP, "status.podIPs": POD_IP}
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        return ""

    async def _environment(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for plural, key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
                if key not in source:
                    continue
                ref = source[key]
                obj = await self._read(plural, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'{plural[:-1]} "{ref.get("name")}" not found')
                for name, value in (obj.get("data") or {}).items():
                    env[prefix + name] = base64.b64decode(value).decode() if plural == "secrets" else value
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = expand(str(item.get("value", "")), env)
                continue
            source = item["valueFrom"]
            value: str | None = ""
            if "secretKeyRef" in source:
                value = await self._secret_value("secrets", source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = await self._secret_value("configmaps", source["configMapKeyRef"])
            elif "fieldRef" in source:
                value = self._field(source["fieldRef"].get("fieldPath", ""))
            if value is not None:
                env[item["name"]] = value
        return env

    def _path_map(self, container: dict[str, Any], termination_file: Path) -> PathMap:
        mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            host = self.volumes.get(mount["name"])
            if host is None:
                continue
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = str(host)
        mounts[container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH] = str(termination_file)
        return PathMap(mounts)

    async def _command(self, container: dict[str, Any], termination_file: Path
                       ) -> tuple[list[str], dict[str, str], LocalImage]:
        image = self.images.resolve(container.get("image", ""))
        paths = self._path_map(container, termination_file)
        user_env = await self._environment(container)
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env["HOSTNAME"] = self.name
        env.update({k: v.format(termination_log=termination_file) for k, v in image.env.items()})
        env.update({k: paths.rewrite(v) for k, v in user_env.items()})
        command = [paths.rewrite(expand(a, user_env)) for a in container.get("command") or []]
        args = [paths.rewrite(expand(a, user_env)) for a in container.get("args") or []]
        argv = image.command(command or None, args)
        ports = {p: h for p, h in self.ports.items()
                 if any(int(cp["containerPort"]) == p for cp in container.get("ports") or [])}
        return rewrite_listen(argv, env, image, ports), env, image

    # ------------------------------------------------------------------------------------------ containers

    async def _run_container(self, status: ContainerStatus, *, init: bool) -> bool:
        """Run (and restart, per restartPolicy) one container. Init containers: True once one run succeeded."""
        container = status.spec
        policy = self.spec.get("restartPolicy") or "Always"
        crashes = 0
        log_path = self.dir / f"{status.name}.log"
        termination_file = self.dir / f"{status.name}.termination-log"
        while not self.stopping:
            try:
                argv, env, _ = await self._command(container, termination_file)
            except ImageError as exc:
                status.state = {"waiting": {"reason": "ErrImagePull", "message": str(exc)}}
                self._changed()
                await asyncio.sleep(BACKOFF_INITIAL)
                continue
            except ConfigError as exc:
                status.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                self._changed()
                await asyncio.sleep(2)
                continue
            except (ApiError, aiohttp.ClientError) as exc:
                log.warning("pod %s/%s: %s", self.namespace, self.name, exc)
                await asyncio.sleep(2)
                continue
            termination_file.write_bytes(b"")
            offset = log_path.stat().st_size if log_path.exists() else 0
            started = time.monotonic()
            try:
                proc = await spawn(argv, env=env, cwd=self.dir, log_path=log_path)
            except OSError as exc:
                status.state = {"waiting": {"reason": "RunContainerError", "message": str(exc)}}
                self._changed()
                await asyncio.sleep(BACKOFF_INITIAL)
                continue
            status.proc = proc
            status.container_id = f"sandbox://{proc.pid}"
            status.state = {"running": {"startedAt": now()}}
            status.started = init  # main containers are started once their startup probe passes
            log.info("Started container %s in pod %s/%s (pid %d)", status.name, self.namespace, self.name, proc.pid)
            self._changed()
            probes = None if init else asyncio.create_task(self._probe(status, proc))
            code = exit_code(await proc.wait())
            _signal_group(proc, signal.SIGKILL)  # anything the container left running
            if probes is not None:
                probes.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probes
            if self.stopping:
                return False
            terminated = {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": status.state.get("running", {}).get("startedAt", now()), "finishedAt": now(),
                "containerID": status.container_id,
            }
            message = self._termination_message(container, termination_file, log_path, offset, code)
            if message:
                terminated["message"] = message
            status.ready = False
            status.started = False
            status.proc = None
            if init and code == 0:
                status.state = {"terminated": terminated}
                self._changed()
                return True
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                status.state = {"terminated": terminated}
                self._changed()
                return False
            log.info("Container %s in pod %s/%s exited with code %d; restarting", status.name, self.namespace,
                     self.name, code)
            status.last_state = {"terminated": terminated}
            if time.monotonic() - started > BACKOFF_RESET:
                crashes = 0
            delay = 0.0 if crashes == 0 else min(BACKOFF_INITIAL * 2 ** (crashes - 1), BACKOFF_MAX)
            crashes += 1
            status.restart_count += 1
            if delay:
                status.state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                    f"back-off {int(delay)}s restarting failed container={status.name} pod={self.name}")}}
                self._changed()
                await asyncio.sleep(delay)
        return False

    @staticmethod
    def _termination_message(container: dict[str, Any], termination_file: Path, log_path: Path, offset: int,
                             code: int) -> str:
        with contextlib.suppress(OSError):
            text = termination_file.read_bytes()[:MAX_MESSAGE].decode(errors="replace")
            if text.strip():
                return text
        if code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError), log_path.open("rb") as handle:
                handle.seek(offset)
                lines = handle.read().decode(errors="replace").splitlines()[-FALLBACK_LINES:]
                return "\n".join(lines)[-FALLBACK_BYTES:]
        return ""

    # ------------------------------------------------------------------------------------------ probes

    async def _probe(self, status: ContainerStatus, proc: asyncio.subprocess.Process) -> None:
        container = status.spec
        startup = container.get("startupProbe")
        if startup is not None and not await self._probe_until(startup, status):
            log.info("Startup probe of %s in pod %s/%s failed; restarting it", status.name, self.namespace, self.name)
            await terminate(proc, self._probe_grace(startup))
            return
        status.started = True
        self._changed()
        tasks = []
        readiness = container.get("readinessProbe")
        if readiness is None:
            status.ready = True
            self._changed()
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

    def _probe_grace(self, probe: dict[str, Any]) -> float:
        value = probe.get("terminationGracePeriodSeconds")
        return float(value) if value is not None else self.grace

    async def _probe_verdicts(self, probe: dict[str, Any], status: ContainerStatus) -> AsyncIterator[bool | None]:
        """Run a probe on its schedule; after each check yield True once successThreshold checks in a row passed,
        False once failureThreshold checks in a row failed, else None (no verdict yet)."""
        await asyncio.sleep(float(probe.get("initialDelaySeconds") or 0))
        period = float(probe.get("periodSeconds") or 10)
        need_ok, need_fail = int(probe.get("successThreshold") or 1), int(probe.get("failureThreshold") or 3)
        ok = fail = 0
        while True:
            if await self._check(probe, status.spec):
                ok, fail = ok + 1, 0
            else:
                ok, fail = 0, fail + 1
            yield True if ok >= need_ok else False if fail >= need_fail else None
            await asyncio.sleep(period)

    async def _probe_until(self, probe: dict[str, Any], status: ContainerStatus) -> bool:
        """Probe until successThreshold successes in a row (True) or failureThreshold failures in a row (False)."""
        async for verdict in self._probe_verdicts(probe, status):
            if verdict is not None:
                return verdict
        raise AssertionError("unreachable: probing never ends by itself")

    async def _readiness(self, probe: dict[str, Any], status: ContainerStatus) -> None:
        async for verdict in self._probe_verdicts(probe, status):
            if verdict is not None and verdict != status.ready:
                status.ready = verdict
                self._changed()

    async def _liveness(self, probe: dict[str, Any], status: ContainerStatus,
                        proc: asyncio.subprocess.Process) -> None:
        period = float(probe.get("periodSeconds") or 10)
        need_fail = int(probe.get("failureThreshold") or 3)
        fail = 0
        while fail < need_fail:
            await asyncio.sleep(period)  # the first tick: the startup probe has just answered
            fail = 0 if await self._check(probe, status.spec) else fail + 1
        log.info("Liveness probe of %s in pod %s/%s failed; restarting it", status.name, self.namespace, self.name)
        await terminate(proc, self._probe_grace(probe))

    def _resolve_port(self, port: Any) -> int:
        container_port = self.port_names.get(port, 0) if isinstance(port, str) and not port.isdigit() else int(port)
        return self.ports.get(container_port, container_port)

    async def _check(self, probe: dict[str, Any], container: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                url = f"{get.get('scheme', 'HTTP').lower()}://{POD_IP}:{self._resolve_port(get['port'])}" \
                      f"{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                async with self.api.session.get(url, headers=headers, ssl=False, allow_redirects=False,
                                                timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                port = self._resolve_port(probe["tcpSocket"]["port"])
                _, writer = await asyncio.wait_for(asyncio.open_connection(POD_IP, port), timeout)
                writer.close()
                return True
            if "exec" in probe:
                termination_file = self.dir / f"{container['name']}.probe-termination-log"
                argv, env, _ = await self._command({**container, "command": probe["exec"]["command"],
                                                    "args": []}, termination_file)
                proc = await spawn(argv, env=env, cwd=self.dir, log_path=self.dir / "probes.log")
                try:
                    return await asyncio.wait_for(proc.wait(), timeout) == 0
                except TimeoutError:
                    await terminate(proc, 0)
                    return False
        except (aiohttp.ClientError, OSError, TimeoutError, ImageError, ConfigError, ApiError):
            return False
        log.warning("pod %s/%s: unsupported probe %s; treating it as passing", self.namespace, self.name,
                    sorted(probe))
        return True

    # ------------------------------------------------------------------------------------------ status

    def to_status(self) -> dict[str, Any]:
        running = any("running" in s.state for s in self.statuses)
        if self.failed:
            phase = "Failed"
        elif self.initialized and running:
            phase = "Running"
        else:
            phase = "Pending"
        ready = "True" if self.ready else "False"

        def cond(kind: str, value: str) -> dict[str, Any]:
            return {"type": kind, "status": value, "lastProbeTime": None}

        return {
            "phase": phase,
            "hostIP": POD_IP, "podIP": POD_IP, "podIPs": [{"ip": POD_IP}], "startTime": self.start_time,
            "conditions": [cond("PodScheduled", "True"), cond("Initialized", "True" if self.initialized else "False"),
                           cond("ContainersReady", ready), cond("Ready", ready)],
            "initContainerStatuses": [s.to_wire() for s in self.init_statuses],
            "containerStatuses": [s.to_wire() for s in self.statuses],
        }

    async def _status_writer(self) -> None:
        path = resource_path("v1", "pods", self.namespace, self.name, "status")
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            status = self.to_status()
            if status != self._written and not self.stopping:  # a stopping pod is being deleted
                try:
                    await self.api.patch(path, {"status": status})
                    self._written = status
                except (ApiError, aiohttp.ClientError) as exc:
                    log.warning("pod %s/%s: writing status: %s", self.namespace, self.name, exc)
                    self._dirty.set()
                    await asyncio.sleep(1)
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one write
