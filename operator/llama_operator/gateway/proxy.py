"""The OpenAI-compatible HTTP front (aiohttp server); upstream.py is the client to the replicas.

- `GET /v1/models` lists every LlamaServer the gateway can reach in OpenAI's list format, scaled-to-zero ones
  included (`owned_by` is the namespace; `state`, `replicas`, `ready_replicas`, `aliases` are extra fields that
  OpenAI clients ignore); `GET /v1/models/{model}` one of them.
- `POST /v1/...` (chat/completions, completions, embeddings, rerank, messages, responses, their input_tokens
  and count_tokens, ...) and llama.cpp's own inference paths outside /v1 (NATIVE_PATHS): the body is read within
  bounds (body.py: JSON only, size, a memory budget for all bodies, a deadline), its `model` read by a bounded
  scan (scan.py; on the event loop up to INLINE_SCAN_BYTES, else in a worker thread, SCAN_THREADS at once) and
  routed (routing.py); the body is forwarded byte for byte (but for the `lora` field a request for a LoRA adapter,
  `<model>:<adapter>`, gets: adapters.py), the response streamed back chunk by chunk as it arrives (SSE
  included), never buffered. An unknown model is 404 in OpenAI's error format naming the model and
  the known ones; a body that cannot be routed is a one-line 400. Errors name LlamaServers, never pod addresses.
- No ready replica: the request is held (hold.py) while the autoscaler scales the server up; on timeout 503 with
  Retry-After. Then upstream.py sends it to a ready replica and streams the answer back.
- The client going away cancels the handler (aiohttp handler_cancellation), which closes the upstream
  connection: llama-server notices and stops generating.
- API keys: the gateway holds none and reads no Secret. The client's Authorization (or X-Api-Key) header goes to
  the replica unchanged and the replica's 401 comes back unchanged. For a LlamaServer with apiKeySecretRef a
  request without any key is answered 401 by the gateway itself, so an anonymous client cannot wake a server
  from zero that would refuse it anyway. The gateway's own calls to a replica made for a request (router mode: the
  load before it, the memory budget's unloads, the kept prompt caches' slot saves and restores: room.py) carry
  the client's same Authorization or X-Api-Key, since llama-server guards those paths with the key too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import web
from yarl import URL

from . import metrics
from .adapters import with_adapter, with_base
from .answers import model_object, openai_error, unknown_model
from .body import Body, BodyBudget, BodyReader, Refused
from .endpoints import EndpointTable
from .hold import HoldQueue, QueueFull
from .routing import Route, RoutingTable
from .scan import BadBody, affinity_payload, scan
from .traffic import Traffic
from .upstream import CLIENT_GONE, UPSTREAM_BROKE, Upstreams

log = logging.getLogger(__name__)
T = TypeVar("T")

INLINE_SCAN_BYTES = 64 << 10
"""Bodies up to this size are scanned on the event loop (a few ms at worst); larger ones in a worker thread."""
SCAN_THREADS = 2
"""Large bodies scanned at once: the scan is CPU, and the GIL makes more threads no faster."""
_MODEL_LABEL = web.RequestKey("model", str)

NATIVE_PATHS = ("/completion", "/completions", "/chat/completions", "/chat/completions/input_tokens", "/infill",
                "/embedding", "/embeddings", "/rerank", "/reranking", "/responses", "/responses/input_tokens",
                "/tokenize", "/detokenize", "/apply-template")
"""llama-server's inference paths outside /v1, routed by `model` like /v1 (llama.vim's /infill, native /completion
clients). An allow-list, never a wildcard: llama-server's other paths (/props, /slots, /lora-adapters,
/models/load) change or show one replica's state and are not the tenant's to call through a shared gateway."""


def forwarded_path(path: str) -> bool:
    """Whether a request for `path` (decoded, dot segments resolved: what the replica is sent) is one the gateway
    forwards by `model`: under /v1/, or one of NATIVE_PATHS."""
    return (path.startswith("/v1/") and len(path) > 4) or path in NATIVE_PATHS


def has_api_key(headers: Mapping[str, str]) -> bool:
    authorization = headers.get("Authorization", "")
    return bool(authorization.partition(" ")[2].strip()) or bool(headers.get("X-Api-Key", "").strip())


class Proxy:
    """The request path: route, hold, balance, forward, stream."""

    def __init__(self, routes: RoutingTable, endpoints: EndpointTable, traffic: Traffic, hold: HoldQueue, *,
                 kick: Callable[[], None] = lambda: None, max_request_bytes: int = 32 << 20,
                 max_buffered_bytes: int = 256 << 20, body_timeout: float = 60.0, connect_timeout: float = 5.0,
                 retry_after: int = 5) -> None:
        self.routes = routes
        self.endpoints = endpoints
        self.traffic = traffic
        self.hold = hold
        self.kick = kick
        self.max_request_bytes = max_request_bytes
        self.bodies = BodyReader(max_bytes=max_request_bytes, budget=BodyBudget(max_buffered_bytes),
                                 timeout=body_timeout, retry_after=retry_after)
        self._scan_slots = asyncio.Semaphore(SCAN_THREADS)
        self.retry_after = retry_after
        self.upstreams = Upstreams(endpoints, connect_timeout=connect_timeout, retry_after=retry_after)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_request_bytes)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/{tail:.+}", self.handle)
        for path in NATIVE_PATHS:
            app.router.add_post(path, self.handle)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _: web.Application) -> None:
        await self.upstreams.open()

    async def _close(self, _: web.Application) -> None:
        await self.upstreams.close()

    # -- models --------------------------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            model_object(route, name, len(self.endpoints.ready(*route.service))) for route in self.routes.routes()
            for name in self.routes.public_names(route)]})

    async def get_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        resolution = self.routes.resolve(model)
        if resolution.route is None:
            return self._unknown(model, resolution.candidates)
        ready = len(self.endpoints.ready(*resolution.route.service))
        return web.json_response(model_object(resolution.route, self.routes.listed_name(resolution.route, model),
                                              ready))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def not_found(self, request: web.Request) -> web.Response:
        return openai_error(404, f"{request.method} {request.path} is not served by this gateway (OpenAI API "
                            "under /v1: POST /v1/chat/completions, /v1/completions, /v1/embeddings ..., "
                            "GET /v1/models; llama.cpp's POST /completion, /infill, /tokenize ...)", code="not_found")

    def _unknown(self, model: str, candidates: Sequence[Route]) -> web.Response:
        return unknown_model(model, candidates, self.routes.known_names())

    # -- requests ------------------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        code = "500"
        try:
            response, _ = await self._handle(request, started)
            code = str(response.status)
            if request.get(CLIENT_GONE):
                code = "499"  # the client went away; nginx's code for it
            elif request.get(UPSTREAM_BROKE):
                code = "502"
            return response
        except asyncio.CancelledError:
            code = "499"
            raise
        finally:
            label = request.get(_MODEL_LABEL, "unknown")
            metrics.REQUESTS.labels(label, code).inc()
            if label != "unknown":
                metrics.REQUEST_DURATION.labels(label).observe(time.monotonic() - started)

    async def _handle(self, request: web.Request, started: float) -> tuple[web.StreamResponse, str]:
        if not forwarded_path(URL("http://replica" + request.path_qs).path):
            # aiohttp's router matched the path as sent, and the replica is sent it with its dot segments resolved
            # (`/v1/../slots` becomes `/slots`): what is forwarded must itself be on the allow-list.
            return await self.not_found(request), "unknown"
        try:
            body = await self.bodies.read(request)
        except Refused as refused:
            response = openai_error(refused.status, refused.message, code=refused.code, headers=refused.headers,
                                    type="server_error" if refused.status >= 500 else "invalid_request_error")
            response.force_close()  # aiohttp reads what is left of the body, at most its lingering_time, then closes
            if refused.close and request.transport is not None:
                await response.prepare(request)
                await response.write_eof()
                request.transport.close()  # a client too slow to send a body gets no lingering time either
            return response, "unknown"
        try:
            return await self._route(request, body, started)
        finally:
            body.release()

    async def _off_loop(self, walk: Callable[..., T], data: bytearray, *args: Any) -> T:
        """`walk(data, *args)`: on the event loop for a small body, else in a worker thread (SCAN_THREADS at once)."""
        if len(data) <= INLINE_SCAN_BYTES:
            return walk(data, *args)
        async with self._scan_slots:
            work = asyncio.ensure_future(asyncio.to_thread(walk, data, *args))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # The client left, but a thread cannot be stopped: keep its slot, and the body's share of the
                # budget, until it ends (else clients that leave at once would pile up scans and buffers).
                await asyncio.wait([work])
                raise

    async def _route(self, request: web.Request, body: Body, started: float) -> tuple[web.StreamResponse, str]:
        try:
            summary = await self._off_loop(scan, body.data)
        except BadBody as exc:
            return openai_error(400, str(exc), code=exc.code, param=exc.param), "unknown"
        model = summary.model
        resolution = self.routes.resolve(model)
        route = resolution.route
        if route is None:
            return self._unknown(model, resolution.candidates), "unknown"
        key = route.key
        request[_MODEL_LABEL] = key
        if route.api_key_required and not has_api_key(request.headers):
            return openai_error(401, f"LlamaServer {key} requires an API key: send Authorization: Bearer <key>.",
                                code="invalid_api_key"), key
        try:
            affinity = (await self._off_loop(affinity_payload, body.data, summary, route.routing.prefix_characters)
                        if route.routing.strategy == "PrefixAffinity" else {})
            chosen = route.adapter(model)
            if chosen is not None:  # after affinity_payload: the insertion moves the offsets it reads
                with_adapter(body.data, summary, chosen)
            elif route.adapters:
                with_base(body.data, summary)
        except BadBody as exc:
            return openai_error(400, str(exc), code=exc.code, param=exc.param), key
        if not self.endpoints.ready(*route.service):
            refused = await self._hold(route)
            if refused is not None:
                return refused, key
        self.traffic.start(key)
        try:
            return await self.upstreams.forward(request, route, summary, affinity, body, started), key
        finally:
            self.traffic.finish(key)

    async def _hold(self, route: Route) -> web.Response | None:
        """Wait for a ready replica; None when one is there, else the 503 to answer."""
        key = route.key
        if route.replicas == 0 and route.scaling is None:
            return openai_error(503, f"LlamaServer {key} is scaled to zero and has no spec.scaling to wake it: "
                                f"scale it up (kubectl -n {route.namespace} scale lserver {route.name} --replicas 1).",
                                type="server_error", code="model_scaled_to_zero")
        retry = {"Retry-After": str(self.retry_after)}
        held = time.monotonic()
        self.traffic.hold(key)
        self.kick()
        outcome = "timeout"
        try:
            if await self.hold.hold(key, lambda: bool(self.endpoints.ready(*route.service))):
                outcome = "ready"
                return None
            return openai_error(503, f"The model '{route.model_name}' ({key}) has no ready replica after "
                                f"{self.hold.timeout:g}s; it is starting, retry later.", type="server_error",
                                code="model_not_ready", headers=retry)
        except QueueFull:
            outcome = "full"
            return openai_error(503, f"{self.hold.limit} requests already wait for the model '{route.model_name}' "
                                f"({key}) to start; retry later.", type="server_error", code="model_not_ready",
                                headers=retry)
        finally:
            self.traffic.release(key)
            metrics.HOLD_SECONDS.labels(key, outcome).observe(time.monotonic() - held)
