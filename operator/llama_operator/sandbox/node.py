"""The sandbox node: the controllers a cluster would run for the operator's objects, on one local machine.

- Deployment controller (ReplicaSet-less): pods `<deployment>-<template hash>-<suffix>` with the template's
  labels plus `pod-template-hash`, owned by the Deployment (so deleting it garbage-collects them). A changed
  template rolls: `RollingUpdate` honours maxSurge/maxUnavailable (new pods Ready before old ones go);
  `Recreate` deletes the old pods and creates new ones only after their processes are gone. Writes
  Deployment status (replicas, updatedReplicas, readyReplicas, availableReplicas, unavailableReplicas,
  observedGeneration, conditions).
- Scheduler + kubelet: every pod runs here (`spec.nodeName` is set to `sandbox` on the pods it creates); a
  pod that disappears from the API is stopped gracefully (see kubelet.py).
- PV controller: PersistentVolumeClaims are bound at once to a directory under the state directory.
- Endpoints controller + kube-proxy: for every Service, an Endpoints object listing the ready pods
  (127.0.0.1 and each pod's host port), and a TCP proxy on a local port per Service port.

Everything is level-triggered: informers (list + watch) wake one reconcile pass that converges all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .client import Api, ApiError, Informer, resource_path
from .images import ImageTable
from .kubelet import NODE_NAME, POD_IP, PodRuntime
from .proxy import ServiceProxy

log = logging.getLogger("llama_operator.sandbox")

TEMPLATE_HASH = "pod-template-hash"


def template_hash(template: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    alphabet = "bcdfghjkmnpqrstvwxz2456789"  # the apimachinery "safe" alphabet: no vowels, no look-alikes
    return "".join(alphabet[int(digest[i:i + 2], 16) % len(alphabet)] for i in range(0, 20, 2))


def _suffix() -> str:
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _scaled(value: Any, replicas: int, *, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        exact = replicas * int(value[:-1]) / 100
        return int(-(-exact // 1)) if round_up else int(exact)
    return int(value)


class Node:
    """The local node and controllers; `run()` until cancelled, then `shutdown()`."""

    def __init__(self, api: Api, *, state_dir: Path, images: ImageTable, service_port_base: int,
                 on_service: Callable[[str, int, int], None] | None = None) -> None:
        self.api = api
        self.state_dir = state_dir
        self.images = images
        self.service_port_base = service_port_base
        self.on_service = on_service
        self._wake = asyncio.Event()
        self.deployments = Informer(api, "apps/v1", "deployments", self.wake)
        self.pods = Informer(api, "v1", "pods", self.wake)
        self.services = Informer(api, "v1", "services", self.wake)
        self.claims = Informer(api, "v1", "persistentvolumeclaims", self.wake)
        self.runtimes: dict[str, PodRuntime] = {}
        self.proxies: dict[tuple[str, str, int], ServiceProxy] = {}
        self._endpoints_written: dict[tuple[str, str], Any] = {}
        self._status_written: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        informers = (self.deployments, self.pods, self.services, self.claims)
        self._tasks = [asyncio.create_task(i.run(), name=f"informer {i.plural}") for i in informers]
        await asyncio.gather(*(i.synced.wait() for i in informers))
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=30)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.reconcile()
            except (ApiError, aiohttp.ClientError) as exc:
                log.warning("sandbox node: %s; retrying", exc)
                await asyncio.sleep(1)
                self.wake()

    async def reconcile(self) -> None:
        await self._bind_claims()
        for deployment in self.deployments.values():
            await self._sync_deployment(deployment)
        self._sync_kubelet()
        await self._sync_services()

    async def shutdown(self) -> None:
        """Stop every pod (SIGTERM, grace period, SIGKILL), every proxy and the informers."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(runtime.stop() for runtime in list(self.runtimes.values())))
        for proxy in self.proxies.values():
            await proxy.close()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------------------------------ PVs

    async def _bind_claims(self) -> None:
        for claim in self.claims.values():
            if (claim.get("status") or {}).get("phase") == "Bound":
                continue
            spec = claim.get("spec") or {}
            meta = claim["metadata"]
            status = {"phase": "Bound", "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                      "capacity": {"storage": spec.get("resources", {}).get("requests", {}).get("storage", "1Gi")}}
            (self.state_dir / "pvc" / meta["namespace"] / meta["name"]).mkdir(parents=True, exist_ok=True)
            written = await self.api.patch(resource_path("v1", "persistentvolumeclaims", meta["namespace"],
                                                         meta["name"], "status"), {"status": status})
            if written:
                self.claims.put(written)
                log.info("Bound PersistentVolumeClaim %s/%s", meta["namespace"], meta["name"])

    # ------------------------------------------------------------------------------------------ Deployments

    async def _sync_deployment(self, deployment: dict[str, Any]) -> None:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        if meta.get("deletionTimestamp"):
            return
        namespace, uid = meta["namespace"], meta["uid"]
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        current = template_hash(template)
        pods = [p for p in self.pods.values() if p["metadata"].get("namespace") == namespace and _owned_by(p, uid)]
        new = [p for p in pods if p["metadata"].get("labels", {}).get(TEMPLATE_HASH) == current]
        old = [p for p in pods if p not in new]
        strategy = spec.get("strategy") or {}

        if strategy.get("type") == "Recreate":
            if old:
                for pod in old:
                    await self._delete_pod(pod)
            elif not self._old_processes_running(uid, current):
                await self._scale(deployment, new, replicas, current)
        else:
            rolling = strategy.get("rollingUpdate") or {}
            surge = _scaled(rolling.get("maxSurge", "25%"), replicas, round_up=True)
            unavailable = _scaled(rolling.get("maxUnavailable", "25%"), replicas, round_up=False)
            if surge == 0 and unavailable == 0:
                unavailable = 1  # as the API server enforces
            if not old:
                await self._scale(deployment, new, replicas, current)
            else:
                # Surge new pods up to replicas + maxSurge in total.
                room = min(replicas + surge - len(pods), replicas - len(new))
                for _ in range(max(0, room)):
                    new.append(await self._create_pod(deployment, current))
                # Unready old pods never count towards availability: they can go at once.
                for pod in [p for p in old if not _pod_ready(p)]:
                    await self._delete_pod(pod)
                    old.remove(pod)
                ready = sum(_pod_ready(p) for p in new) + len(old)
                removable = ready - (replicas - unavailable)
                for pod in old[:max(0, removable)]:
                    await self._delete_pod(pod)
        await self._write_deployment_status(deployment, current)

    def _old_processes_running(self, owner_uid: str, current: str) -> bool:
        return any(_owned_by(r.pod, owner_uid) and r.labels.get(TEMPLATE_HASH) != current
                   for r in self.runtimes.values())

    async def _scale(self, deployment: dict[str, Any], pods: list[dict[str, Any]], replicas: int,
                     current: str) -> None:
        for _ in range(replicas - len(pods)):
            await self._create_pod(deployment, current)
        if len(pods) > replicas:
            # Unready first, then the newest (as the ReplicaSet controller ranks them).
            ranked = sorted(pods, key=lambda p: (_pod_ready(p), p["metadata"].get("creationTimestamp", "")),
                            reverse=False)
            ranked = [p for p in ranked if not _pod_ready(p)] + sorted(
                [p for p in ranked if _pod_ready(p)], key=lambda p: p["metadata"].get("creationTimestamp", ""),
                reverse=True)
            for pod in ranked[:len(pods) - replicas]:
                await self._delete_pod(pod)

    async def _create_pod(self, deployment: dict[str, Any], current: str) -> dict[str, Any]:
        meta = deployment["metadata"]
        template = deployment["spec"]["template"]
        tmeta = template.get("metadata") or {}
        body = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{current}-{_suffix()}", "namespace": meta["namespace"],
                "labels": {**(tmeta.get("labels") or {}), TEMPLATE_HASH: current},
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"],
                                     "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": {**(template.get("spec") or {}), "nodeName": NODE_NAME},
        }
        created = await self.api.create(resource_path("v1", "pods", meta["namespace"]), body)
        self.pods.put(created)
        log.info("Created pod %s/%s", meta["namespace"], created["metadata"]["name"])
        return created

    async def _delete_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        await self.api.delete(resource_path("v1", "pods", meta["namespace"], meta["name"]))
        self.pods.forget(pod)
        log.info("Deleted pod %s/%s", meta["namespace"], meta["name"])

    async def _write_deployment_status(self, deployment: dict[str, Any], current: str) -> None:
        meta = deployment["metadata"]
        replicas = int((deployment.get("spec") or {}).get("replicas", 1))
        pods = [p for p in self.pods.values()
                if p["metadata"].get("namespace") == meta["namespace"] and _owned_by(p, meta["uid"])]
        updated = [p for p in pods if p["metadata"].get("labels", {}).get(TEMPLATE_HASH) == current]
        ready = sum(_pod_ready(p) for p in pods)
        available = ready >= replicas
        complete = available and len(updated) == replicas == len(pods) and all(_pod_ready(p) for p in updated)
        status = {
            "observedGeneration": meta.get("generation"),
            "replicas": len(pods), "updatedReplicas": len(updated), "readyReplicas": ready,
            "availableReplicas": ready, "unavailableReplicas": max(0, replicas - ready),
            "conditions": [
                {"type": "Available", "status": "True" if available else "False",
                 "reason": "MinimumReplicasAvailable" if available else "MinimumReplicasUnavailable"},
                {"type": "Progressing", "status": "True",
                 "reason": "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated"},
            ],
        }
        key = meta["uid"]
        if self._status_written.get(key) == status and deployment.get("status", {}).get("replicas") == len(pods):
            return
        written = await self.api.patch(resource_path("apps/v1", "deployments", meta["namespace"], meta["name"],
                                                     "status"), {"status": status})
        if written:
            self._status_written[key] = status
            self.deployments.put(written)

    # ------------------------------------------------------------------------------------------ kubelet

    def _sync_kubelet(self) -> None:
        live = {p["metadata"]["uid"]: p for p in self.pods.values() if p["metadata"].get("uid")}
        for uid, pod in live.items():
            if uid not in self.runtimes and not pod["metadata"].get("deletionTimestamp"):
                runtime = PodRuntime(pod, api=self.api, images=self.images, state_dir=self.state_dir,
                                     on_change=self.wake)
                self.runtimes[uid] = runtime
                runtime.start()
        for uid, runtime in list(self.runtimes.items()):
            if runtime.done.is_set():
                del self.runtimes[uid]
            elif (uid not in live or live[uid]["metadata"].get("deletionTimestamp")) and not runtime.stopping:
                asyncio.create_task(runtime.stop(), name=f"stop {runtime.name}")

    # ------------------------------------------------------------------------------------------ Services

    def _endpoints(self, service: dict[str, Any], port: dict[str, Any]) -> list[tuple[str, int, str]]:
        """(ip, host port, pod name) of every ready pod behind one Service port."""
        meta = service["metadata"]
        selector = (service.get("spec") or {}).get("selector") or {}
        target = port.get("targetPort", port.get("port"))
        found = []
        for runtime in self.runtimes.values():
            if runtime.namespace != meta["namespace"] or runtime.stopping or not runtime.ready:
                continue
            if not _matches(selector, runtime.labels):
                continue
            container_port = runtime.port_names.get(target) if isinstance(target, str) else int(target)
            if container_port in runtime.ports:
                found.append((POD_IP, runtime.ports[container_port], runtime.name))
        return sorted(found)

    async def _sync_services(self) -> None:
        seen: set[tuple[str, str, int]] = set()
        for service in self.services.values():
            meta = service["metadata"]
            subsets = []
            for port in (service.get("spec") or {}).get("ports") or []:
                key = (meta["namespace"], meta["name"], int(port["port"]))
                seen.add(key)
                proxy = self.proxies.get(key)
                if proxy is None:
                    proxy = ServiceProxy(f"{meta['namespace']}/{meta['name']}:{port['port']}")
                    await proxy.listen(self.service_port_base)
                    self.proxies[key] = proxy
                    if self.on_service is not None:
                        self.on_service(f"{meta['namespace']}/{meta['name']}", int(port["port"]), proxy.port)
                endpoints = self._endpoints(service, port)
                proxy.targets = [(ip, host_port) for ip, host_port, _ in endpoints]
                for ip, host_port, pod in endpoints:
                    subsets.append({
                        "addresses": [{"ip": ip, "nodeName": NODE_NAME,
                                       "targetRef": {"kind": "Pod", "namespace": meta["namespace"], "name": pod}}],
                        "ports": [{"name": port.get("name", ""), "port": host_port,
                                   "protocol": port.get("protocol", "TCP")}],
                    })
            await self._write_endpoints(service, subsets)
        for key in [k for k in self.proxies if k not in seen]:
            await self.proxies.pop(key).close()
        for key in [k for k in self._endpoints_written if (k[0], k[1]) not in {(s[0], s[1]) for s in seen}]:
            self._endpoints_written.pop(key)

    async def _write_endpoints(self, service: dict[str, Any], subsets: list[dict[str, Any]]) -> None:
        meta = service["metadata"]
        key = (meta["namespace"], meta["name"])
        if self._endpoints_written.get(key) == subsets:
            return
        body = {"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "labels": dict(meta.get("labels") or {}),
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                                  "uid": meta["uid"]}]},
                "subsets": subsets}
        path = resource_path("v1", "endpoints", meta["namespace"])
        try:
            try:
                await self.api.create(path, body)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                await self.api.patch(resource_path("v1", "endpoints", meta["namespace"], meta["name"]),
                                     {"subsets": subsets})
        except ApiError as exc:
            if exc.status != 404:  # an API server without Endpoints: the proxies still work
                raise
        self._endpoints_written[key] = subsets
