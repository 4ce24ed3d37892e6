"""status.models of router-mode LlamaServers: which models each ready pod has loaded, from its GET /models.

Loading and unloading happen inside llama-server (a request names a model, an idle one sleeps, the least
recently used one is stopped for another): no Kubernetes object changes, so no watch event tells the operator.
`ModelStatusPoller` therefore asks the pods themselves, every `LLAMA_OPERATOR_MODEL_STATUS_SECONDS` (10 s):

- it reads the router-mode LlamaServers and their ready pods from what kopf's watches hold (watched.py,
  reconcile/indexes.py: no LIST, the API server sees only the status patches), and sends
  GET http://<podIP>:8080/models to every ready pod — concurrently, at most `CONCURRENCY` at a time, each with
  a `TIMEOUT` (3 s) — over aiohttp, on the event loop, never blocking it. /models answers at once (the router
  keeps the state);
- llama-server started with an API key (spec.apiKeySecretRef) guards /models with it (only /health is public):
  the poller reads that key from the server's Secret (`get secrets`, as the reconcile may; of a comma-separated
  list, as llama-server reads one, the first), keeps it
  `KEY_CACHE_SECONDS` (60 s: a rotated key is used within a minute, and a poll does not GET the Secret each
  time) and sends `Authorization: Bearer <key>`. The key is never logged nor written anywhere; a Secret or key
  that is missing, or a key the pods refuse (401), is one line in each served model's `message` and the states
  stay as they were;
- the LlamaModels of the namespace (from the watch too) give each served model's memory estimate and the
  budget used (builders/router_memory.py; the gateway keeps the budget);
- it patches `status.models`, `status.modelsLoaded`, `status.modelsMemory` and `status.modelsChangedTime` only
  when the answer changed. These fields are the poller's alone: the reconcile leaves them out of its status patch
  (server.MODEL_STATUS_FIELDS), as it leaves the gateway's autoscaling view;
- a pod that does not answer is left out of that round; when no ready pod answers, the last status stays
  (a slow pod is not reported as "everything unloaded"). With no ready pod at all every model is Unloaded;
- the pods run the tenant's `spec.image`, so an answer is untrusted: it is read up to `MAX_ANSWER_BYTES`
  (1 MiB) within the `TIMEOUT`, parsed in a worker thread when it is large (at most `PARSES` at a time, so the
  parsed objects of many pods never pile up), and anything else — too large, not JSON, not a list of model
  entries — is refused: each served model's `message` names the pod and why, in one line, and the states come
  from the pods that answered properly (or stay as they were when none did).

The operator needs to reach the pods on port 8080 (the NetworkPolicy it puts next to each server admits it,
builders/network_policy.py); no RBAC beyond what the reconcile has (watch pods, get secrets, patch
llamaservers/status).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp
from pydantic import ValidationError

from ..api.v1beta1 import LlamaModel, LlamaServer, SecretKeyRef, ServedModelStatus
from ..builders.router_memory import budget_used, quantity, served_estimates
from ..clock import now_rfc3339
from ..contract import first_key
from ..flags.render import SERVER_PORT
from ..kube import LLAMA_SERVERS, KubeError, NotFound
from .context import Context
from .watched import ready_pod_ip

log = logging.getLogger(__name__)

TIMEOUT = 3.0
"""Seconds one pod's /models may take (it answers from memory; a pod that takes longer is skipped)."""
CONCURRENCY = 16
"""Pods asked at the same time, over every server."""
MAX_ANSWER_BYTES = 2**20
"""Largest /models answer read from a pod: a router with a hundred models answers some 100 KiB."""
PARSE_ON_LOOP_BYTES = 64 * 2**10
"""Answers up to this size are parsed on the event loop (well under a millisecond); larger ones in a thread."""
PARSES = 2
"""Large answers parsed at the same time: their parsed objects are several times their size."""
MAX_REFUSED_NAMED = 3
"""Pods named in a refusal message; more are counted."""
KEY_CACHE_SECONDS = 60.0
"""How long a server's API key read from its Secret is used before the Secret is read again (a rotated key is
picked up within this; a missing one is looked for again after it)."""


class Refused(str):
    """Why a pod's /models answer was not used (one line, for status)."""

_STATES = {"loaded": "Loaded", "loading": "Loading", "downloading": "Loading", "downloaded": "Loading",
           "sleeping": "Sleeping", "unloaded": "Unloaded"}
_RANK = ("Loaded", "Loading", "Sleeping", "Failed", "Unloaded")
"""For a model on several pods: the state of the pod furthest along wins; a failure anywhere is in the message."""


def _state(entry: Mapping[str, Any]) -> tuple[str, int | None]:
    status = entry.get("status")
    status = status if isinstance(status, dict) else {}
    value = status.get("value")
    value = value if isinstance(value, str) else "unloaded"
    if value == "unloaded" and status.get("failed"):
        exit_code = status.get("exit_code")
        return "Failed", exit_code if isinstance(exit_code, int) and abs(exit_code) < 2**31 else None
    return _STATES.get(value, "Unloaded"), None


def model_states(answers: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                 served: Iterable[tuple[str, str]]) -> list[ServedModelStatus]:
    """Per served model (name, LlamaModel): its state over the pods' /models answers ((pod, data) pairs)."""
    by_pod = [(pod, {entry["id"]: entry for entry in data if isinstance(entry.get("id"), str)})
              for pod, data in answers]
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


def with_refusals(states: Sequence[ServedModelStatus], refused: Sequence[tuple[str, str]]) -> list[ServedModelStatus]:
    """`states` with a note on each model naming the pods whose answer was refused ((pod, why) pairs)."""
    if not refused:
        return list(states)
    named = "; ".join(f"pod {pod}: {why}" for pod, why in refused[:MAX_REFUSED_NAMED])
    more = f" (and {len(refused) - MAX_REFUSED_NAMED} more)" if len(refused) > MAX_REFUSED_NAMED else ""
    note = f"/models answer not used: {named}{more}"
    return [state.model_copy(update={"message": f"{state.message}; {note}" if state.message else note})
            for state in states]


def last_states(status: Mapping[str, Any], served: Iterable[tuple[str, str]]) -> list[ServedModelStatus]:
    """The states status.models holds for the served models (Unloaded where it holds none), messages dropped."""
    known: dict[str, ServedModelStatus] = {}
    for wire in status.get("models") or []:
        try:
            state = ServedModelStatus.model_validate(wire)
        except ValidationError:
            continue
        known[state.name] = state.model_copy(update={"message": None})
    return [known.get(name) or ServedModelStatus(name=name, model=model, state="Unloaded")
            for name, model in served]


def loaded_summary(states: Sequence[ServedModelStatus]) -> str:
    """`loaded/total` for the printer column."""
    return f"{sum(1 for s in states if s.state == 'Loaded')}/{len(states)}"


def ready_pod_ips(pods: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(pod name, pod IP) of the pods that are Ready and not terminating."""
    return [ready for ready in map(ready_pod_ip, pods) if ready is not None]


def _models_by_key(bodies: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], LlamaModel]:
    """The LlamaModels that parse, by (namespace, name); one that does not has no estimate."""
    out = {}
    for body in bodies:
        try:
            model = LlamaModel.model_validate(body)
        except ValidationError:
            continue
        out[(model.metadata.namespace or "", model.metadata.name)] = model
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
        self._parses = asyncio.Semaphore(PARSES)
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[tuple[str, str, str], tuple[float, str | Refused]] = {}
        """(namespace, Secret, key) -> (until when, the API key or why there is none)."""

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
        """One round over the router-mode servers the watch holds (`ctx.watched`): no LIST of any kind."""
        watched = self.ctx.watched
        bodies = watched.routers()
        models: dict[str, dict[tuple[str, str], LlamaModel]] = {}
        for namespace in {str((body.get("metadata") or {}).get("namespace")) for body in bodies}:
            models[namespace] = _models_by_key(watched.models(namespace))
        outcomes = await asyncio.gather(
            *(self.poll_server(body, models.get(str((body.get("metadata") or {}).get("namespace"))))
              for body in bodies), return_exceptions=True)
        for body, outcome in zip(bodies, outcomes, strict=True):
            if isinstance(outcome, Exception):  # one server's trouble is not the others'
                meta = body.get("metadata") or {}
                log.warning("Reading the models of LlamaServer %s/%s failed, will retry: %s",
                            meta.get("namespace"), meta.get("name"), outcome)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def poll_server(self, body: Mapping[str, Any],
                          models: Mapping[tuple[str, str], LlamaModel] | None = None) -> None:
        """Read one server's pods and patch its status.models when the answer changed; `models` are the
        LlamaModels by (namespace, name), for each model's memory estimate."""
        meta = body.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        status = body.get("status") or {}
        try:
            server = LlamaServer.model_validate({**body, "status": {}})
        except ValidationError:
            return  # the reconcile reports why; nothing to read
        if server.spec.models is None:
            if status.get("models") is not None:  # was router mode: clear what no longer applies
                await self._patch(namespace, name, {"models": None, "modelsLoaded": None, "modelsMemory": None,
                                                    "modelsChangedTime": None})
            return
        served = [(entry.served_name, entry.model_ref.name) for entry in server.spec.models]
        targets = self.ctx.watched.ready_pods(namespace, name)
        key: str | Refused | None = None
        if targets and server.spec.api_key_secret_ref is not None:
            key = await self._api_key(namespace, server.spec.api_key_secret_ref)
        if isinstance(key, Refused):  # no pod can be asked: the states stay as they were, with the reason
            results: list[tuple[str, list[dict[str, Any]] | Refused | None]] = []
            states = [s.model_copy(update={"message": f"/models not read: {key}"})
                      for s in last_states(status, served)]
        else:
            results = list(zip([pod for pod, _ in targets],
                               await asyncio.gather(*(self._models(ip, key) for _, ip in targets)), strict=True))
        answers = [(pod, data) for pod, data in results if isinstance(data, list)]
        refused = [(pod, str(data)) for pod, data in results if isinstance(data, Refused)]
        if targets and not answers and not refused and not isinstance(key, Refused):
            return  # no ready pod answered this round: keep the last status rather than guess
        if not isinstance(key, Refused):
            # Only refusals: what the pods hold is unknown, so the states stay as they were, with the reason.
            states = with_refusals(model_states(answers, served) if answers or not targets else
                                   last_states(status, served), refused)
        mine = {model_name: m for (ns, model_name), m in (models or {}).items() if ns == namespace}
        estimates = served_estimates(server, mine)
        states = [s.model_copy(update={"estimate": quantity(estimates[s.name]) if s.name in estimates else None})
                  for s in states]
        # Like the states: from the pods that answered, none loaded without a ready pod, else as it was.
        memory = budget_used(server, answers, estimates) if answers or not targets else status.get("modelsMemory")
        wire = [s.to_wire() for s in states]
        if (wire == status.get("models") and status.get("modelsLoaded") == loaded_summary(states)
                and status.get("modelsMemory") == memory):
            return
        await self._patch(namespace, name, {"models": wire, "modelsLoaded": loaded_summary(states),
                                            "modelsMemory": memory, "modelsChangedTime": now_rfc3339()})
        log.info("LlamaServer %s/%s models: %s", namespace, name,
                 ", ".join(f"{s.name} {s.state}" for s in states))

    async def _patch(self, namespace: str, name: str, fields: dict[str, Any]) -> None:
        await self.ctx.kube.patch_status(LLAMA_SERVERS, namespace, name, fields)

    async def _api_key(self, namespace: str, ref: SecretKeyRef) -> str | Refused:
        """The server's API key from its Secret (spec.apiKeySecretRef), kept KEY_CACHE_SECONDS; `Refused` (one
        line naming the Secret and key, never a value) when it cannot be read or used."""
        cache_key = (namespace, ref.name, ref.key)
        cached = self._keys.get(cache_key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        where = f"Secret {namespace}/{ref.name}, key {ref.key!r} (spec.apiKeySecretRef)"
        value: str | Refused
        try:
            value = await self.ctx.kube.read_secret_key(namespace, ref.name, ref.key)
        except NotFound:
            value = Refused(f"the server's API key is not there: {where} is missing")
        except (ValueError, KubeError) as exc:  # not base64/UTF-8; forbidden, unavailable
            value = Refused(f"the server's API key could not be read from {where}: {type(exc).__name__}")
        if isinstance(value, str) and not isinstance(value, Refused):
            value = first_key(value) if not any(c in value for c in "\r\n\0") else ""
            if not value:
                value = Refused(f"the server's API key in {where} is empty or holds a line break: no HTTP header "
                                f"can carry it")
        if isinstance(value, Refused):
            log.debug("LlamaServer in %s: %s", namespace, value)
        self._keys[cache_key] = (time.monotonic() + KEY_CACHE_SECONDS, value)
        return value

    async def _models(self, ip: str, key: str | None = None) -> list[dict[str, Any]] | Refused | None:
        """The pod's /models list; None when it does not answer in time (logged at debug level); `Refused` when
        its answer is too large or not a model list (the pod runs the tenant's image), or when it wants an API
        key (401) that the server's spec does not give or that it refuses. `key`: the server's API key, sent as
        `Authorization: Bearer`."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        headers = {"Authorization": f"Bearer {key}"} if key else None
        async with self._limit:
            url = _url(ip, self.port)
            try:
                async with self._session.get(url, headers=headers) as response:
                    if response.status == 401:
                        log.debug("GET %s: HTTP 401", url)
                        return Refused("HTTP 401: the pod refused the API key of spec.apiKeySecretRef" if key else
                                       "HTTP 401: the pod wants an API key, and the spec has no apiKeySecretRef")
                    if response.status != 200:
                        log.debug("GET %s: HTTP %d", url, response.status)
                        return None
                    body = await _read_capped(response, MAX_ANSWER_BYTES)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                log.debug("GET %s: %s", url, exc or type(exc).__name__)
                return None
        if body is None:
            log.debug("GET %s: answer larger than %d bytes, not read", url, MAX_ANSWER_BYTES)
            return Refused(f"larger than {MAX_ANSWER_BYTES // 2**20} MiB")
        if len(body) <= PARSE_ON_LOOP_BYTES:
            return _model_list(body)
        async with self._parses:
            return await asyncio.to_thread(_model_list, body)


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None as soon as it proves longer than `limit` (declared or received): never more is read."""
    if response.content_length is not None and response.content_length > limit:
        return None
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _model_list(body: bytes) -> list[dict[str, Any]] | Refused:
    """The `data` list of a /models answer, keeping only its JSON objects; Refused when it is not one."""
    try:
        data = json.loads(body).get("data")
    except (ValueError, RecursionError, AttributeError):  # not JSON, nested too deep, not an object
        return Refused("not a model list (not a JSON object)")
    if not isinstance(data, list):
        return Refused("not a model list (no data array)")
    return [entry for entry in data if isinstance(entry, dict)]
