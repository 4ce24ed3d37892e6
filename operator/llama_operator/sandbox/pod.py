"""The sandbox kubelet's view of one pod: what every part of running it reads and changes, and its status.

`Pod` holds the pod's identity (namespace, name, uid, spec, its directory under the state directory), the
status of each of its containers (`ContainerStatus`), its address and phase flags; the hooks each job calls
(`changed`, `event`); the reads of its own objects (`read`) and of its own fields (`field`: downward API); and
the status a kubelet reports (`initContainerStatuses`/`containerStatuses` with running/terminated/waiting,
`lastState`, `ready`, `started`, `restartCount`, conditions, phase, podIP, hostIP), written through the API's
`pods/status` whenever something changed. What runs the pod (kubelet.py) builds on it; the node's shared
parts (`NodeContext`) are here too, since every pod reads them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..clock import now_rfc3339
from .client import Api, ApiError, resource_path
from .images import ImageTable
from .network import PodAddress, PodNetwork

log = logging.getLogger("llama_operator.sandbox")

NODE_NAME = "sandbox"


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


class Pod:
    """One pod's state on the node, and its status as the API shows it."""

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
        self.admitted = 0.0  # the event loop's time when the pod started: startup probes tick from it
        self._transitions: dict[str, tuple[str, str]] = {}
        self._dirty = asyncio.Event()
        self._written: dict[str, Any] | None = None
        self.tasks: list[asyncio.Task[Any]] = []  # cancelled when the pod stops
        self.done = asyncio.Event()

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

    def changed(self) -> None:
        self._dirty.set()
        self._on_change()

    def event(self, kind: str, reason: str, message: str, container: str | None = None) -> None:
        self.node.record_event(self.pod, kind, reason, message, container)

    async def read(self, plural: str, name: str) -> dict[str, Any] | None:
        return await self.api.get(resource_path("v1", plural, self.namespace, name))

    def field(self, path: str) -> str:
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

    async def write_status(self) -> None:
        """Until cancelled: after each change, the status to `pods/status` (unless it is what was written)."""
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
