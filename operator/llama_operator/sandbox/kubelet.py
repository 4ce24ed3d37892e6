"""The sandbox kubelet's container runtime: one pod's containers as local processes, and the pod's status.

Per pod (`PodRuntime`): a network namespace with the pod's IP (network.py); volumes become directories
(emptyDir, hostPath, PVC → its PersistentVolume's directory, secret, configMap, downwardAPI and projected
volumes, whose service-account tokens come from the TokenRequest API and are renewed before they expire);
the init containers run one after another to completion, then the main containers start; startup, readiness
and liveness probes run as specified (httpGet, tcpSocket, exec) against the pod IP; crashed containers restart
with the kubelet's backoff (immediately, then 10 s doubling to 5 min, reset after 10 min of running);
termination messages come from the container's termination message file or, with `FallbackToLogsOnError`,
from the tail of its log. Status (`initContainerStatuses`/`containerStatuses` with running/terminated/waiting,
`lastState`, `ready`, `started`, `restartCount`, conditions, phase, podIP, hostIP) goes through the API's
`pods/status`; events (Pulled, Created, Started, Killing, Unhealthy, BackOff, Failed) like a kubelet's.

Each container's output goes to `<container>.log` in the pod directory (the previous instance's to
`<container>.previous.log`): what `kubectl logs [--previous]` serves (logs.py).

Stopping a pod sends SIGTERM to every container's process group, waits the grace period, then SIGKILLs.
Each container is its own process group; every process also gets PR_SET_PDEATHSIG=SIGKILL, so even a
SIGKILLed sandbox leaves nothing behind.

Deviations from a real kubelet (docs/sandbox.md): no images (images.py maps them to local executables) and
no root filesystem of their own, so volume paths in arguments and environment are rewritten (except under
/run, which is a private tmpfs with real bind mounts); resource limits, security contexts and read-only
mounts are not enforced.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..clock import now_rfc3339
from ..controlplane.cluster import die_with_parent
from .client import Api, ApiError, resource_path
from .images import ImageError, ImageTable, LocalImage, PathMap
from .network import PodAddress, PodNetwork, enter_pod, under_run

log = logging.getLogger("llama_operator.sandbox")

NODE_NAME = "sandbox"
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET = 600.0
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_MESSAGE = 4096
FALLBACK_LINES = 80
FALLBACK_BYTES = 2048
TOKEN_REFRESH_FRACTION = 0.8
# Environment a container inherits from the node: enough to find shared libraries. Nothing else leaks in (a
# stray LLAMA_ARG_* or HF_TOKEN would change behaviour); proxies are the node's own (network.py).
PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "LD_LIBRARY_PATH")


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


def write_atomic(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """The kubelet's atomic volume update: files live in a timestamped directory that `..data` points to,
    each visible name is a symlink through `..data`, and one rename swaps all of them at once."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..{datetime.datetime.now(datetime.UTC).strftime('%Y_%m_%d_%H_%M_%S.%f')}"
    stamp.mkdir()
    for name, (data, mode) in files.items():
        target = stamp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)
    link = directory / "..data_tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(stamp.name)
    old = (directory / "..data").resolve() if (directory / "..data").is_symlink() else None
    os.replace(link, directory / "..data")
    for name in files:
        top = name.split("/", 1)[0]
        visible = directory / top
        if not visible.is_symlink():
            visible.symlink_to(f"..data/{top}")
    if old is not None and old.exists() and old != stamp.resolve():
        for path in sorted(old.rglob("*"), reverse=True):
            path.unlink() if not path.is_dir() else path.rmdir()
        old.rmdir()


class ConfigError(Exception):
    """The container cannot be configured yet (a missing Secret/ConfigMap): CreateContainerConfigError."""


@dataclass
class NodeContext:
    """What every pod on the node shares: the API (as the node), images, directories, network, egress."""

    api: Api
    images: ImageTable
    state_dir: Path
    network: PodNetwork
    node_ip: str
    api_port: int
    proxy_url: str
    record_event: Callable[[dict[str, Any], str, str, str, str | None], None]
    probe_session: aiohttp.ClientSession


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
        self.instance = 0
        self.exited = asyncio.Event()

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

    def __init__(self, pod: dict[str, Any], node: NodeContext, on_change: Callable[[], None]) -> None:
        meta = pod["metadata"]
        self.pod = pod
        self.namespace: str = meta.get("namespace") or "default"
        self.name: str = meta["name"]
        self.uid: str = meta.get("uid") or ""
        self.spec: dict[str, Any] = pod.get("spec") or {}
        self.node = node
        self.api = node.api
        self.dir = node.state_dir / "pods" / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self._on_change = on_change
        self.init_statuses = [ContainerStatus(c) for c in self.spec.get("initContainers") or []]
        self.statuses = [ContainerStatus(c) for c in self.spec.get("containers") or []]
        self.address: PodAddress | None = None
        self.initialized = False
        self.failed = False
        self.succeeded = False
        self.stopping = False
        self.start_time = now_rfc3339()
        self.volumes: dict[str, Path] = {}
        self._transitions: dict[str, tuple[str, str]] = {}
        self._dirty = asyncio.Event()
        self._written: dict[str, Any] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.done = asyncio.Event()

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self.initialized and bool(self.statuses) and all(s.ready for s in self.statuses)

    @property
    def ip(self) -> str:
        return self.address.ip if self.address else ""

    def container(self, name: str) -> ContainerStatus | None:
        return next((s for s in self.init_statuses + self.statuses if s.name == name), None)

    def log_path(self, container: str, *, previous: bool = False) -> Path:
        return self.dir / (f"{container}.previous.log" if previous else f"{container}.log")

    @property
    def grace(self) -> float:
        value = self.spec.get("terminationGracePeriodSeconds")
        return float(30 if value is None else value)

    def start(self) -> None:
        self._admitted = asyncio.get_running_loop().time()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tasks = [asyncio.create_task(self._status_writer(), name=f"status {self.name}"),
                       asyncio.create_task(self._run(), name=f"pod {self.name}")]
        self._changed()

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM every container, wait the grace period, SIGKILL; then end the pod's tasks and network."""
        if self.stopping:
            await self.done.wait()
            return
        self.stopping = True
        grace = self.grace if grace is None else grace
        running = [s for s in self.init_statuses + self.statuses if s.proc is not None]
        for status in running:
            self._event("Normal", "Killing", f"Stopping container {status.name}", status.name)
        await asyncio.gather(*(terminate(s.proc, grace) for s in running if s.proc is not None))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.node.network.remove_pod(self.uid)
        log.info("Stopped pod %s/%s", self.namespace, self.name)
        self.done.set()
        self._on_change()

    def _changed(self) -> None:
        self._dirty.set()
        self._on_change()

    def _event(self, kind: str, reason: str, message: str, container: str | None = None) -> None:
        self.node.record_event(self.pod, kind, reason, message, container)

    async def _run(self) -> None:
        try:
            self.address = await self.node.network.add_pod(self.uid)
            self._changed()
            while True:
                if await self._prepare_volumes():
                    break
                await asyncio.sleep(2)  # the API may have the missing Secret/PVC binding later
            for status in self.init_statuses:
                if not await self._run_container(status, init=True):
                    self.failed = True
                    self._changed()
                    return
            self.initialized = True
            self._changed()
            results = await asyncio.gather(*(self._run_container(s, init=False) for s in self.statuses))
            if not self.stopping:
                codes = [s.state.get("terminated", {}).get("exitCode", 1) for s in self.statuses]
                self.succeeded = all(results) and all(code == 0 for code in codes)
                self.failed = not self.succeeded
                self._changed()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s/%s: the sandbox kubelet failed", self.namespace, self.name)

    # ------------------------------------------------------------------------------------------ volumes

    async def _prepare_volumes(self) -> bool:
        """Make every volume's directory; False (after a FailedMount event) when one cannot be made yet."""
        try:
            for volume in self.spec.get("volumes") or []:
                name = volume["name"]
                if "hostPath" in volume:
                    path = self.node.state_dir / "hostpath" / volume["hostPath"]["path"].lstrip("/")
                elif "persistentVolumeClaim" in volume:
                    path = await self._claim_directory(volume["persistentVolumeClaim"]["claimName"])
                else:  # emptyDir, and the pod-local directory of secret/configMap/projected/downwardAPI files
                    path = self.dir / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                self.volumes[name] = path
                if any(k in volume for k in ("secret", "configMap", "projected", "downwardAPI")):
                    await self._project(volume, path)
            return True
        except (ConfigError, ApiError, aiohttp.ClientError) as exc:
            self._event("Warning", "FailedMount", f"MountVolume.SetUp failed: {exc}")
            return False

    async def _claim_directory(self, claim: str) -> Path:
        pvc = await self._read("persistentvolumeclaims", claim)
        if pvc is None:
            raise ConfigError(f'persistentvolumeclaim "{claim}" not found')
        volume_name = (pvc.get("spec") or {}).get("volumeName")
        pv = await self.api.get(resource_path("v1", "persistentvolumes", None, volume_name)) if volume_name else None
        if pv is None:
            raise ConfigError(f'persistentvolumeclaim "{claim}" is not bound')
        spec = pv.get("spec") or {}
        path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
        if not path:
            raise ConfigError(f"persistentvolume {volume_name} is neither hostPath nor local")
        return Path(path)

    async def _project(self, volume: dict[str, Any], path: Path) -> None:
        files: dict[str, tuple[bytes, int]] = {}
        if "secret" in volume:
            source = volume["secret"]
            await self._add_keys(files, "secrets", source.get("secretName", ""), source,
                                 int(source.get("defaultMode", 0o644)))
        elif "configMap" in volume:
            source = volume["configMap"]
            await self._add_keys(files, "configmaps", source.get("name", ""), source,
                                 int(source.get("defaultMode", 0o644)))
        elif "downwardAPI" in volume:
            source = volume["downwardAPI"]
            self._add_downward(files, source.get("items") or [], int(source.get("defaultMode", 0o644)))
        else:
            projected = volume["projected"]
            mode = int(projected.get("defaultMode", 0o644))
            refresh: list[tuple[dict[str, Any], float]] = []
            for source in projected.get("sources") or []:
                if "secret" in source:
                    await self._add_keys(files, "secrets", source["secret"].get("name", ""), source["secret"], mode)
                elif "configMap" in source:
                    await self._add_keys(files, "configmaps", source["configMap"].get("name", ""),
                                         source["configMap"], mode)
                elif "downwardAPI" in source:
                    self._add_downward(files, source["downwardAPI"].get("items") or [], mode)
                elif "serviceAccountToken" in source:
                    token_source = source["serviceAccountToken"]
                    token, ttl = await self._token(token_source)
                    files[token_source["path"]] = (token.encode(), 0o600 if mode == 0o644 else mode)
                    refresh.append((token_source, ttl))
            if refresh:
                self._tasks.append(asyncio.create_task(self._renew_tokens(volume, path, files, refresh),
                                                       name=f"tokens {self.name}"))
        write_atomic(path, files)

    async def _add_keys(self, files: dict[str, tuple[bytes, int]], plural: str, name: str, source: dict[str, Any],
                        mode: int) -> None:
        obj = await self._read(plural, name)
        kind = "secret" if plural == "secrets" else "configmap"
        if obj is None:
            if source.get("optional"):
                return
            raise ConfigError(f'{kind} "{name}" not found')
        if plural == "secrets":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        else:
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] in data:
                files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
            elif not source.get("optional"):
                raise ConfigError(f'configmap references non-existent config key: {item["key"]}')

    def _add_downward(self, files: dict[str, tuple[bytes, int]], items: list[dict[str, Any]], mode: int) -> None:
        for item in items:
            if "fieldRef" in item:
                files[item["path"]] = (self._field(item["fieldRef"].get("fieldPath", "")).encode(),
                                       int(item.get("mode", mode)))

    async def _token(self, source: dict[str, Any]) -> tuple[str, float]:
        account = self.spec.get("serviceAccountName") or "default"
        spec: dict[str, Any] = {"expirationSeconds": int(source.get("expirationSeconds") or 3600),
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name,
                                                   "uid": self.uid}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        review = await self.api.create(
            resource_path("v1", "serviceaccounts", self.namespace, account, "token"),
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        status = review.get("status") or {}
        expires = datetime.datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00"))
        ttl = (expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        return status["token"], ttl

    async def _renew_tokens(self, volume: dict[str, Any], path: Path, files: dict[str, tuple[bytes, int]],
                            tokens: list[tuple[dict[str, Any], float]]) -> None:
        """Like the kubelet: a fresh token once 80% of the old one's lifetime has passed."""
        while True:
            await asyncio.sleep(max(5.0, min(ttl for _, ttl in tokens) * TOKEN_REFRESH_FRACTION))
            try:
                renewed = []
                for source, _ in tokens:
                    token, ttl = await self._token(source)
                    files[source["path"]] = (token.encode(), files[source["path"]][1])
                    renewed.append((source, ttl))
                tokens = renewed
                write_atomic(path, files)
            except (ApiError, aiohttp.ClientError, KeyError) as exc:
                log.warning("pod %s/%s: renewing the token of volume %s: %s", self.namespace, self.name,
                            volume["name"], exc)
                tokens = [(source, 20.0) for source, _ in tokens]

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
        raw = (obj.get("data") or {}).get(ref["key"])
        value = (base64.b64decode(raw).decode() if raw is not None else None) if plural == "secrets" else raw
        if value is None and not ref.get("optional"):
            raise ConfigError(f'couldn\'t find key {ref["key"]} in {kind.capitalize()} {self.namespace}/{ref["name"]}')
        return value

    def _field(self, path: str) -> str:
        meta = self.pod.get("metadata") or {}
        simple = {"metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
                  "spec.nodeName": NODE_NAME, "spec.serviceAccountName": self.spec.get("serviceAccountName", ""),
                  "status.podIP": self.ip, "status.hostIP": self.node.node_ip, "status.podIPs": self.ip,
                  "status.hostIPs": self.node.node_ip}
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            values = meta.get(path.split(".")[1]) or {}
            return "\n".join(f"{k}={json.dumps(str(v))}" for k, v in sorted(values.items()))
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

    def _node_env(self) -> dict[str, str]:
        """What the node gives every container: the `kubernetes` Service variables (pointing at the node's
        forwarder to the API server) and the node's egress proxy."""
        host, port = self.node.node_ip, str(self.node.api_port)
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        env.update({
            "HOSTNAME": self.name,
            "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp", f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
        })
        no_proxy = ",".join([host, self.node.network.cidr, ".svc", ".cluster.local"])
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = self.node.proxy_url
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        return env

    def _mounts(self, container: dict[str, Any], termination_file: Path) -> tuple[PathMap, dict[str, str]]:
        """(rewriting of container paths, real bind mounts under /run)."""
        mounts: dict[str, str] = {}
        run_mounts: dict[str, str] = {}
        for mount in container.get("volumeMounts") or []:
            host = self.volumes.get(mount["name"])
            if host is None:
                continue
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            run_path = under_run(mount["mountPath"])
            if run_path is not None:
                run_mounts[run_path] = str(host)
            else:
                mounts[mount["mountPath"]] = str(host)
        mounts[container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH] = str(termination_file)
        return PathMap(mounts), run_mounts

    async def _command(self, container: dict[str, Any], termination_file: Path
                       ) -> tuple[list[str], dict[str, str], LocalImage, dict[str, str]]:
        image = self.node.images.resolve(container.get("image", ""))
        paths, run_mounts = self._mounts(container, termination_file)
        user_env = await self._environment(container)
        env = self._node_env()
        env.update({k: v.format(termination_log=termination_file) for k, v in image.env.items()})
        env.update({k: paths.rewrite(v) for k, v in user_env.items()})
        command = [paths.rewrite(expand(a, user_env)) for a in container.get("command") or []]
        args = [paths.rewrite(expand(a, user_env)) for a in container.get("args") or []]
        return image.command(command or None, args), env, image, run_mounts

    # ------------------------------------------------------------------------------------------ containers

    async def _run_container(self, status: ContainerStatus, *, init: bool) -> bool:
        """Run (and restart, per restartPolicy) one container. True once a run ended as the pod wants it to
        (init containers: exit 0); False when the pod failed or is stopping."""
        container = status.spec
        policy = self.spec.get("restartPolicy") or "Always"
        crashes = 0
        termination_file = self.dir / f"{status.name}.termination-log"
        image = container.get("image", "")
        while not self.stopping:
            try:
                argv, env, _, run_mounts = await self._command(container, termination_file)
            except ImageError as exc:
                status.state = {"waiting": {"reason": "ErrImagePull", "message": str(exc)}}
                self._event("Warning", "Failed", f'Failed to pull image "{image}": {exc}', status.name)
                self._changed()
                await asyncio.sleep(BACKOFF_INITIAL)
                continue
            except ConfigError as exc:
                status.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
                self._event("Warning", "Failed", f"Error: {exc}", status.name)
                self._changed()
                await asyncio.sleep(2)
                continue
            except (ApiError, aiohttp.ClientError) as exc:
                log.warning("pod %s/%s: %s", self.namespace, self.name, exc)
                await asyncio.sleep(2)
                continue
            if status.instance == 0:
                self._event("Normal", "Pulled", f'Container image "{image}" already present on machine '
                            f"(the sandbox runs {argv[0]})", status.name)
            termination_file.write_bytes(b"")
            log_path = self.log_path(status.name)
            if status.instance > 0 and log_path.exists():
                os.replace(log_path, self.log_path(status.name, previous=True))
            log_path.write_bytes(b"")
            started = time.monotonic()
            try:
                assert self.address is not None
                proc = await spawn(argv, env=env, cwd=self.dir, log_path=log_path,
                                   pod=(self.address.netns, run_mounts))
            except OSError as exc:
                status.state = {"waiting": {"reason": "RunContainerError", "message": str(exc)}}
                self._event("Warning", "Failed", f"Error: {exc}", status.name)
                self._changed()
                await asyncio.sleep(BACKOFF_INITIAL)
                continue
            status.instance += 1
            status.exited.clear()
            status.proc = proc
            status.container_id = f"sandbox://{proc.pid}"
            status.state = {"running": {"startedAt": now_rfc3339()}}
            status.started = init  # main containers are started once their startup probe passes
            log.info("Started container %s in pod %s/%s (pid %d)", status.name, self.namespace, self.name, proc.pid)
            self._event("Normal", "Created", f"Created container: {status.name}", status.name)
            self._event("Normal", "Started", f"Started container {status.name}", status.name)
            self._changed()
            probes = None if init else asyncio.create_task(self._probe(status, proc))
            code = exit_code(await proc.wait())
            _signal_group(proc, signal.SIGKILL)  # anything the container left running
            status.exited.set()
            if probes is not None:
                probes.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probes
            if self.stopping:
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
                self._changed()
                return True
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                status.state = {"terminated": terminated}
                self._changed()
                return code == 0
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
                    f"back-off {int(delay)}s restarting failed container={status.name} pod={self.name}"
                    f"_{self.namespace}({self.uid})")}}
                self._event("Warning", "BackOff", "Back-off restarting failed container "
                            f"{status.name} in pod {self.name}_{self.namespace}({self.uid})", status.name)
                self._changed()
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

    # ------------------------------------------------------------------------------------------ probes

    async def _probe(self, status: ContainerStatus, proc: asyncio.subprocess.Process) -> None:
        container = status.spec
        startup = container.get("startupProbe")
        if startup is not None and not await self._probe_until(startup, status, "Startup"):
            log.info("Startup probe of %s in pod %s/%s failed; restarting it", status.name, self.namespace, self.name)
            self._event("Normal", "Killing", f"Container {status.name} failed startup probe, will be restarted",
                        status.name)
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

    async def _probe_verdicts(self, probe: dict[str, Any], status: ContainerStatus, kind: str
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
                await asyncio.sleep(period - (loop.time() - self._admitted) % period)
                if loop.time() - container_started < initial:
                    continue
            passed, detail = await self._check(probe, status.spec)
            if passed:
                ok, fail = ok + 1, 0
            else:
                ok, fail = 0, fail + 1
                if fail == need_fail:
                    self._event("Warning", "Unhealthy", f"{kind} probe failed: {detail}", status.name)
            yield True if ok >= need_ok else False if fail >= need_fail else None
            if not aligned:
                await asyncio.sleep(period)

    async def _probe_until(self, probe: dict[str, Any], status: ContainerStatus, kind: str) -> bool:
        async for verdict in self._probe_verdicts(probe, status, kind):
            if verdict is not None:
                return verdict
        raise AssertionError("unreachable: probing never ends by itself")

    async def _readiness(self, probe: dict[str, Any], status: ContainerStatus) -> None:
        async for verdict in self._probe_verdicts(probe, status, "Readiness"):
            if verdict is not None and verdict != status.ready:
                status.ready = verdict
                self._changed()

    async def _liveness(self, probe: dict[str, Any], status: ContainerStatus,
                        proc: asyncio.subprocess.Process) -> None:
        period = float(probe.get("periodSeconds") or 10)
        need_fail = int(probe.get("failureThreshold") or 3)
        fail = 0
        detail = ""
        while fail < need_fail:
            await asyncio.sleep(period)  # the first tick: the startup probe has just answered
            passed, detail = await self._check(probe, status.spec)
            fail = 0 if passed else fail + 1
        log.info("Liveness probe of %s in pod %s/%s failed; restarting it", status.name, self.namespace, self.name)
        self._event("Warning", "Unhealthy", f"Liveness probe failed: {detail}", status.name)
        self._event("Normal", "Killing", f"Container {status.name} failed liveness probe, will be restarted",
                    status.name)
        await terminate(proc, self._probe_grace(probe))

    def _resolve_port(self, port: Any, container: dict[str, Any]) -> int:
        if isinstance(port, str) and not port.isdigit():
            for item in container.get("ports") or []:
                if item.get("name") == port:
                    return int(item["containerPort"])
            raise ValueError(f"no port named {port}")
        return int(port)

    async def _check(self, probe: dict[str, Any], container: dict[str, Any]) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in probe:
                get = probe["httpGet"]
                host = get.get("host") or self.ip
                url = f"{get.get('scheme', 'HTTP').lower()}://{host}:{self._resolve_port(get['port'], container)}" \
                      f"{get.get('path', '/')}"
                headers = {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
                async with self.node.probe_session.get(url, headers=headers, ssl=False, allow_redirects=False,
                                                       timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                    ok = 200 <= response.status < 400
                    return ok, f"HTTP probe failed with statuscode: {response.status}"
            if "tcpSocket" in probe:
                port = self._resolve_port(probe["tcpSocket"]["port"], container)
                _, writer = await asyncio.wait_for(asyncio.open_connection(self.ip, port), timeout)
                writer.close()
                return True, ""
            if "exec" in probe:
                termination_file = self.dir / f"{container['name']}.probe-termination-log"
                argv, env, _, run_mounts = await self._command(
                    {**container, "command": probe["exec"]["command"], "args": []}, termination_file)
                assert self.address is not None
                proc = await spawn(argv, env=env, cwd=self.dir, log_path=self.dir / "probes.log",
                                   pod=(self.address.netns, run_mounts))
                try:
                    code = await asyncio.wait_for(proc.wait(), timeout)
                    return code == 0, f"command {probe['exec']['command']} exited with {code}"
                except TimeoutError:
                    await terminate(proc, 0)
                    return False, f"command timed out after {timeout:g}s"
        except (aiohttp.ClientError, OSError, TimeoutError, ImageError, ConfigError, ApiError, ValueError) as exc:
            return False, str(exc) or type(exc).__name__
        log.warning("pod %s/%s: unsupported probe %s; treating it as passing", self.namespace, self.name,
                    sorted(probe))
        return True, ""

    # ------------------------------------------------------------------------------------------ status

    def _condition(self, kind: str, value: bool) -> dict[str, Any]:
        text = "True" if value else "False"
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != text:
            previous = self._transitions[kind] = (text, now_rfc3339())
        return {"type": kind, "status": text, "lastProbeTime": None, "lastTransitionTime": previous[1]}

    def to_status(self) -> dict[str, Any]:
        running = any("running" in s.state for s in self.statuses)
        if self.failed:
            phase = "Failed"
        elif self.succeeded:
            phase = "Succeeded"
        elif self.initialized and running:
            phase = "Running"
        else:
            phase = "Pending"
        status: dict[str, Any] = {
            "phase": phase, "hostIP": self.node.node_ip, "hostIPs": [{"ip": self.node.node_ip}],
            "startTime": self.start_time,
            "conditions": [self._condition("PodReadyToStartContainers", self.address is not None),
                           self._condition("Initialized", self.initialized),
                           self._condition("Ready", self.ready),
                           self._condition("ContainersReady", self.ready),
                           self._condition("PodScheduled", True)],
            "initContainerStatuses": [s.to_wire() for s in self.init_statuses],
            "containerStatuses": [s.to_wire() for s in self.statuses],
        }
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        return status

    async def _status_writer(self) -> None:
        path = resource_path("v1", "pods", self.namespace, self.name, "status")
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            status = self.to_status()
            if status != self._written and not self.stopping:  # a stopping pod is being deleted
                try:
                    await self.api.patch(path, {"metadata": {"uid": self.uid}, "status": status})
                    self._written = status
                except (ApiError, aiohttp.ClientError) as exc:
                    log.warning("pod %s/%s: writing status: %s", self.namespace, self.name, exc)
                    self._dirty.set()
                    await asyncio.sleep(1)
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one write
