"""status.models of router-mode LlamaServers: which models each ready pod has loaded, from its GET /models.

Loading and unloading happen inside llama-server (a request names a model, an idle one sleeps, the least
recently used one is stopped for another): no Kubernetes object changes, so no watch event tells the operator.
`ModelStatusPoller` therefore asks the pods themselves, every `LLAMA_OPERATOR_MODEL_STATUS_SECONDS` (10 s):

- it lists the LlamaServers (one list per watched namespace per round) and, for each router-mode one, its pods
  (one list each), and sends GET http://<podIP>:8080/models to every ready pod — concurrently, at most
  `CONCURRENCY` at a time, each with a `TIMEOUT` (3 s) — over aiohttp, on the event loop, never blocking it.
  /models is public in llama-server (no API key needed), and answers at once (the router keeps the state);
- it patches `status.models`, `status.modelsLoaded` and `status.modelsChangedTime` only when the answer
  changed. These fields are the poller's alone: the reconcile leaves them out of its status patch
  (server.MODEL_STATUS_FIELDS), as it leaves the gateway's autoscaling view;
- a pod that does not answer is left out of that round; when no ready pod answers, the last status stays
  (a slow pod is not reported as "everything unloaded"). With no ready pod at all every model is Unloaded.

The operator needs to reach the pods on port 8080 (a NetworkPolicy that isolates the llama-server pods must let
the operator's pods in); no RBAC beyond what the reconcile has (list pods, patch llamaservers/status).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp
from pydantic import ValidationError

from ..api.v1alpha1 import LlamaServer, ServedModelStatus
from ..builders.objects import label_selector, selector_labels
from ..flags.render import SERVER_PORT
from ..kube import LLAMA_SERVERS, PODS
from .conditions import now_rfc3339
from .context import Context

log = logging.getLogger(__name__)

TIMEOUT = 3.0
"""Seconds one pod's /models may take (it answers from memory; a pod that takes longer is skipped)."""
CONCURRENCY = 16
"""Pods asked at the same time, over every server."""

_STATES = {"loaded": "Loaded", "loading": "Loading", "downloading": "Loading", "downloaded": "Loading",
           "sleeping": "Sleeping", "unloaded": "Unloaded"}
_RANK = ("Loaded", "Loading", "Sleeping", "Failed", "Unloaded")
"""For a model on several pods: the state of the pod furthest along wins; a failure anywhere is in the message."""


def _state(entry: Mapping[str, Any]) -> tuple[str, int | None]:
    status = entry.get("status") or {}
    value = str(status.get("value") or "unloaded")
    if value == "unloaded" and status.get("failed"):
        return "Failed", status.get("exit_code")
    return _STATES.get(value, "Unloaded"), None


def model_states(answers: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                 served: Iterable[tuple[str, str]]) -> list[ServedModelStatus]:
    """Per served model (name, LlamaModel): its state over the pods' /models answers ((pod, data) pairs)."""
    by_pod = [(pod, {str(entry.get("id")): entry for entry in data}) for pod, data in answers]
    out = []
    for name, model in served:
        states = []
        failures = []
        for pod, entries in by_pod:
            entry = entries.get(name)
            if entry is None:
                continue
            state, exit_code = _state(entry)
            states.append(state)
            if state == "Failed":
                failures.append(f"{pod} (exit code {exit_code})")
        state = min(states, key=_RANK.index) if states else "Unloaded"
        message = f"failed to load on {', '.join(failures)}; the next request tries again" if failures else None
        out.append(ServedModelStatus(name=name, model=model, state=state,  # type: ignore[arg-type]
                                     loaded_replicas=states.count("Loaded"), message=message))
    return out


def loaded_summary(states: Sequence[ServedModelStatus]) -> str:
    """`loaded/total` for the printer column."""
    return f"{sum(1 for s in states if s.state == 'Loaded')}/{len(states)}"


def ready_pod_ips(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(pod name, pod IP) of the pods that are Ready and not terminating."""
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and status.get("podIP") and not meta.get("deletionTimestamp"):
            out.append((str(meta.get("name")), str(status["podIP"])))
    return out


def _url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}/models"


class ModelStatusPoller:
    """Keeps status.models of every router-mode LlamaServer current (see the module docstring)."""

    def __init__(self, ctx: Context, *, timeout: float = TIMEOUT, concurrency: int = CONCURRENCY,
                 port: int = SERVER_PORT) -> None:
        self.ctx = ctx
        self.timeout = timeout
        self.port = port
        self._limit = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def run_forever(self, interval: float) -> None:
        try:
            while True:
                try:
                    await self.poll_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("Reading the models of router-mode servers failed, will retry: %s", exc)
                await asyncio.sleep(interval)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def poll_once(self) -> None:
        namespaces: tuple[str | None, ...] = self.ctx.settings.namespaces or (None,)
        for namespace in namespaces:
            bodies = await self.ctx.kube.list(LLAMA_SERVERS, namespace)
            await asyncio.gather(*(self.poll_server(body) for body in bodies))

    async def poll_server(self, body: Mapping[str, Any]) -> None:
        """Read one server's pods and patch its status.models when the answer changed."""
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        status = body.get("status") or {}
        try:
            server = LlamaServer.model_validate({**body, "status": {}})
        except ValidationError:
            return  # the reconcile reports why; nothing to read
        if server.spec.models is None:
            if status.get("models") is not None:  # was router mode: clear what no longer applies
                await self._patch(namespace, name, {"models": None, "modelsLoaded": None,
                                                    "modelsChangedTime": None})
            return
        served = [(entry.served_name, entry.model_ref.name) for entry in server.spec.models]
        pods = await self.ctx.kube.list(PODS, namespace, label_selector=label_selector(selector_labels(name)))
        targets = ready_pod_ips(pods)
        answers = [(pod, data) for (pod, _), data in
                   zip(targets, await asyncio.gather(*(self._models(ip) for _, ip in targets)), strict=True)
                   if data is not None]
        if targets and not answers:
            return  # no ready pod answered this round: keep the last status rather than guess
        states = model_states(answers, served)
        wire = [s.to_wire() for s in states]
        if wire == status.get("models") and status.get("modelsLoaded") == loaded_summary(states):
            return
        await self._patch(namespace, name, {"models": wire, "modelsLoaded": loaded_summary(states),
                                            "modelsChangedTime": now_rfc3339()})
        log.info("LlamaServer %s/%s models: %s", namespace, name,
                 ", ".join(f"{s.name} {s.state}" for s in states))

    async def _patch(self, namespace: str, name: str, fields: dict[str, Any]) -> None:
        await self.ctx.kube.patch_status(LLAMA_SERVERS, namespace, name, fields)

    async def _models(self, ip: str) -> list[dict[str, Any]] | None:
        """The pod's /models list, or None when it does not answer in time (logged at debug level)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        async with self._limit:
            url = _url(ip, self.port)
            try:
                async with self._session.get(url) as response:
                    if response.status != 200:
                        log.debug("GET %s: HTTP %d", url, response.status)
                        return None
                    data = (await response.json(content_type=None)).get("data")
                    return list(data) if isinstance(data, list) else None
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                log.debug("GET %s: %s", url, exc or type(exc).__name__)
                return None
