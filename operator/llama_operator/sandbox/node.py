"""The sandbox node's kubelet: the Node object, its heartbeat, events, and the pods bound to it.

`Kubelet` registers the Node `sandbox` (labels, capacity with GPU extended resources, addresses,
daemonEndpoints, nodeInfo, conditions), renews its Lease in `kube-node-lease` every 10 s, runs the pods the
real scheduler binds to it (kubelet.py, one `PodRuntime` each), and finishes their deletion: on a
deletionTimestamp, SIGTERM, the grace period, SIGKILL, then DELETE with grace 0 and the pod's uid as
precondition. It talks to the API server as `system:node:sandbox` (Node authorizer: it may read only the
Secrets, ConfigMaps, PVCs and tokens of its own pods) and posts events like a kubelet.

The node's other parts: its storage provisioner (storage.py), kube-proxy (proxy.py), the log server (logs.py)
and the pod network (network.py). Deployments, ReplicaSets, Endpoints/EndpointSlices, PV binding, garbage
collection and scheduling are done by the real kube-controller-manager and kube-scheduler.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from ..clock import now_rfc3339
from .client import ApiError, Informer, resource_path
from .kubelet import PodRuntime
from .pod import NODE_NAME, NodeContext

log = logging.getLogger("llama_operator.sandbox")

KUBELET_PORT = 10250
LEASE_SECONDS = 40
LEASE_RENEW = 10.0
STATUS_REPORT = 60.0
GPU_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915")
GPU_COUNT = 8
MIN_CPUS = 8


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


def _memory_kib() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def _arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


class Kubelet:
    """Node registration, heartbeat, and the pods bound to this node. `run()` until cancelled, then `shutdown()`."""

    def __init__(self, node: NodeContext, *, kubernetes_version: str, on_pods: Callable[[], None] | None = None
                 ) -> None:
        self.node = node
        self.api = node.api
        self.version = kubernetes_version
        self.on_pods = on_pods
        self._wake = asyncio.Event()
        self.pods = Informer(self.api, "v1", "pods", self.wake, params={"fieldSelector": f"spec.nodeName={NODE_NAME}"})
        self.runtimes: dict[str, PodRuntime] = {}
        self._deleting: set[str] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._events: set[asyncio.Task[Any]] = set()
        self.node_uid = ""
        self._started = now_rfc3339()

    def wake(self) -> None:
        self._wake.set()

    def runtime(self, namespace: str, name: str) -> PodRuntime | None:
        return next((r for r in self.runtimes.values() if r.namespace == namespace and r.name == name), None)

    # ------------------------------------------------------------------------------------------ the Node

    def node_object(self) -> dict[str, Any]:
        arch = _arch()
        disk = shutil.disk_usage(self.node.state_dir)
        # Requests are not enforced here (kubelet.py), so a small machine still advertises MIN_CPUS: the
        # examples (1 CPU per replica) must fit a rolling update's surge pod next to the operator.
        capacity = {"cpu": str(max(os.cpu_count() or 1, MIN_CPUS)), "memory": f"{_memory_kib()}Ki", "pods": "110",
                    "ephemeral-storage": f"{disk.total // 1024}Ki", "hugepages-2Mi": "0",
                    **{gpu: str(GPU_COUNT) for gpu in GPU_RESOURCES}}
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {
                "kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux", "kubernetes.io/arch": arch,
                "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": arch,
                "node.kubernetes.io/instance-type": "llama-operator-sandbox"}},
            "spec": {"podCIDR": self.node.network.cidr, "podCIDRs": [self.node.network.cidr]},
            "status": {"capacity": capacity, "allocatable": dict(capacity), **self.node_status()},
        }

    def node_status(self) -> dict[str, Any]:
        heartbeat = now_rfc3339()

        def cond(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": heartbeat, "lastTransitionTime": self._started}

        return {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory",
                     "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status (llama-operator sandbox)"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.node.node_ip},
                          {"type": "Hostname", "address": NODE_NAME}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
            "nodeInfo": {
                "machineID": _read("/etc/machine-id"), "systemUUID": _read("/etc/machine-id"),
                "bootID": _read("/proc/sys/kernel/random/boot_id"), "kernelVersion": platform.release(),
                "osImage": _os_image(), "containerRuntimeVersion": "llama-operator-sandbox://0.1.0",
                "kubeletVersion": self.version, "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": _arch(),
            },
        }

    async def register(self) -> None:
        self._started = now_rfc3339()
        body = self.node_object()
        try:
            created = await self.api.create(resource_path("v1", "nodes"), body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            created = await self.api.patch(resource_path("v1", "nodes", None, NODE_NAME, "status"),
                                           {"status": body["status"]})
        self.node_uid = (created or {}).get("metadata", {}).get("uid", "")
        log.info("Registered Node %s (%s)", NODE_NAME, self.node.node_ip)
        await self._renew_lease()

    async def _renew_lease(self) -> None:
        path = resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease", NODE_NAME)
        spec = {"holderIdentity": NODE_NAME, "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_rfc3339(micro=True)}
        if await self.api.patch(path, {"spec": spec}) is None:
            await self.api.create(resource_path("coordination.k8s.io/v1", "leases", "kube-node-lease"), {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": NODE_NAME, "namespace": "kube-node-lease", "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME, "uid": self.node_uid}]},
                "spec": spec})

    async def _heartbeat(self) -> None:
        last_status = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(LEASE_RENEW)
            try:
                await self._renew_lease()
                if asyncio.get_running_loop().time() - last_status >= STATUS_REPORT:
                    await self.api.patch(resource_path("v1", "nodes", None, NODE_NAME, "status"),
                                         {"status": self.node_status()})
                    last_status = asyncio.get_running_loop().time()
            except (ApiError, aiohttp.ClientError, OSError) as exc:
                log.warning("node heartbeat: %s", exc)

    # ------------------------------------------------------------------------------------------ events

    def record_event(self, pod: dict[str, Any], kind: str, reason: str, message: str,
                     container: str | None = None) -> None:
        meta = pod["metadata"]
        stamp = now_rfc3339()
        involved = {"apiVersion": "v1", "kind": "Pod", "namespace": meta["namespace"], "name": meta["name"],
                    "uid": meta.get("uid", "")}
        if container is not None:
            section = "initContainers" if any(
                c["name"] == container for c in (pod.get("spec") or {}).get("initContainers") or []) else "containers"
            involved["fieldPath"] = f"spec.{section}{{{container}}}"
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
                "involvedObject": involved, "reason": reason, "message": message, "type": kind,
                "source": {"component": "kubelet", "host": NODE_NAME}, "reportingComponent": "kubelet",
                "reportingInstance": NODE_NAME, "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}

        async def post() -> None:
            with contextlib.suppress(ApiError, aiohttp.ClientError, OSError):
                await self.api.create(resource_path("v1", "events", meta["namespace"]), body)

        task = asyncio.create_task(post())
        self._events.add(task)
        task.add_done_callback(self._events.discard)

    # ------------------------------------------------------------------------------------------ pods

    async def run(self) -> None:
        self._tasks = [asyncio.create_task(self.pods.run(), name="informer pods"),
                       asyncio.create_task(self._heartbeat(), name="node heartbeat")]
        await self.pods.synced.wait()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=30)
            except TimeoutError:
                pass
            self._wake.clear()
            self.sync()

    def sync(self) -> None:
        live = {p["metadata"]["uid"]: p for p in self.pods.values() if p["metadata"].get("uid")}
        for uid, pod in live.items():
            phase = (pod.get("status") or {}).get("phase")
            if pod["metadata"].get("deletionTimestamp"):
                if uid not in self._deleting:
                    self._deleting.add(uid)
                    asyncio.create_task(self._finish_deletion(pod), name=f"delete {pod['metadata']['name']}")
            elif uid not in self.runtimes and phase not in ("Succeeded", "Failed"):
                runtime = PodRuntime(pod, self.node, on_change=self._pod_changed)
                self.runtimes[uid] = runtime
                runtime.start()
        for uid, runtime in list(self.runtimes.items()):
            if uid not in live and not runtime.stopping:  # force-deleted: stop what is left
                asyncio.create_task(runtime.stop(0), name=f"stop {runtime.name}")
            if runtime.done.is_set() and uid not in live:
                del self.runtimes[uid]
                self._deleting.discard(uid)

    def _pod_changed(self) -> None:
        self.wake()
        if self.on_pods is not None:
            self.on_pods()

    async def _finish_deletion(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        runtime = self.runtimes.get(meta["uid"])
        grace = meta.get("deletionGracePeriodSeconds")
        if runtime is not None:
            await runtime.stop(None if grace is None else float(grace))
        try:
            await self.api.delete(resource_path("v1", "pods", meta["namespace"], meta["name"]), {
                "apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": meta["uid"]}})
        except (ApiError, aiohttp.ClientError) as exc:
            if not (isinstance(exc, ApiError) and exc.status == 409):  # already replaced by a new pod
                log.warning("deleting pod %s/%s: %s", meta["namespace"], meta["name"], exc)
                self._deleting.discard(meta["uid"])
        self.wake()

    async def shutdown(self) -> None:
        """Stop every pod (SIGTERM, grace period, SIGKILL) and the informers; the pods stay in the API."""
        await asyncio.gather(*(runtime.stop() for runtime in list(self.runtimes.values())))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
