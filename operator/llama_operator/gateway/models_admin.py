"""The admin API of router-mode servers, on the gateway's admin port: load or unload one model on every ready
replica of its LlamaServer, the way a lone llama-server offers `/models/load` and `/models/unload` for one process.

    POST /admin/models/<model>/load      Authorization: Bearer <token>
    POST /admin/models/<model>/unload

Off unless the gateway is given `--admin-token-file` (chart `gateway.adminTokenSecretRef`): without a token the
paths do not exist (404). The token is compared in constant time and never logged or echoed. `<model>` is a
served model name of a router-mode LlamaServer (spec.models); whole servers scale with `kubectl scale`.
Every ready replica is called at once (room.py: a load with a memory budget makes room first, as a request would;
an unload is refused while requests through this gateway replica are in flight on the model; for a server with
spec.promptCache.persist an unload saves the model's slots first and a load restores them). The answer names
the server and counts replicas, never their addresses: 200 when all did it, 409 when the model was busy on some,
401 when all refused the server's key, 502 when some failed, 503 with no ready replica.

A server with an API key (spec.apiKeySecretRef) guards /models, /models/load|unload and /slots with it, and the
gateway holds no key: the caller gives the server's key in `X-Upstream-Authorization` (`Bearer <key>`, sent to
the replicas as their Authorization; never logged). Without it the call is answered 401, in one line saying so.

    POST /admin/models/<model>/load      Authorization: Bearer <token>
                                         X-Upstream-Authorization: Bearer <the server's API key>
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from aiohttp import web

from .answers import openai_error
from .endpoints import EndpointTable
from .room import Auth, RoomError
from .routing import Route, RoutingTable
from .upstream import Upstreams

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096
ACTIONS = ("load", "unload")
UPSTREAM_AUTHORIZATION = "X-Upstream-Authorization"
"""The header in which the admin caller gives a server's API key (spec.apiKeySecretRef), for the replicas."""


def read_token(path: str) -> bytes:
    """The admin token from its file (a mounted Secret key), surrounding whitespace stripped; ValueError when
    it is missing, empty or larger than MAX_TOKEN_BYTES."""
    try:
        with open(path, "rb") as file:
            token = file.read(MAX_TOKEN_BYTES + 1).strip()
    except OSError as exc:
        raise ValueError(f"--admin-token-file {path}: {exc.strerror}") from None
    if not token or len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"--admin-token-file {path}: want a token of 1 to {MAX_TOKEN_BYTES} bytes")
    return token


class ModelsAdmin:
    def __init__(self, routes: RoutingTable, endpoints: EndpointTable, upstreams: Upstreams, token: bytes) -> None:
        self.routes = routes
        self.endpoints = endpoints
        self.upstreams = upstreams
        self._token = token

    def register(self, app: web.Application) -> None:
        app.router.add_post("/admin/models/{model}/{action}", self.handle)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token)

    async def handle(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return openai_error(401, "The admin API needs Authorization: Bearer <the gateway's admin token>.",
                                code="invalid_api_key")
        model, action = request.match_info["model"], request.match_info["action"]
        if action not in ACTIONS:
            return openai_error(404, f"POST /admin/models/<model>/{action[:40]}: the actions are load and unload.",
                                code="not_found")
        resolution = self.routes.resolve(model)
        route = resolution.route
        if route is None:
            names = ", ".join(sorted(r.key for r in resolution.candidates)) or "none"
            return openai_error(404 if not resolution.candidates else 400,
                                f"No single LlamaServer serves the model '{model[:200]}' (candidates: {names}).",
                                code="model_not_found")
        if model not in route.models:
            return openai_error(400, f"'{model[:200]}' is not a model of a router-mode LlamaServer (spec.models): "
                                f"load and unload apply to those; scale whole servers with kubectl scale.",
                                code="not_a_router_model")
        upstream_key = request.headers.get(UPSTREAM_AUTHORIZATION, "").strip()
        if route.api_key_required and not upstream_key.partition(" ")[2].strip():
            return openai_error(401, f"LlamaServer {route.key} needs its API key (spec.apiKeySecretRef) for "
                                f"/models/{action}: send it as {UPSTREAM_AUTHORIZATION}: Bearer <key>.",
                                code="invalid_api_key")
        auth = {"Authorization": upstream_key} if upstream_key else None
        urls = [endpoint.url for endpoint in self.endpoints.ready(*route.service)]
        if not urls:
            return openai_error(503, f"LlamaServer {route.key} has no ready replica.", code="model_not_ready")
        outcomes = await asyncio.gather(*(self._one(action, url, route, model, auth) for url in urls))
        failed = [(index, error) for index, error in enumerate(outcomes) if error is not None]
        log.info("admin %s of %s on LlamaServer %s: %d of %d replicas done", action, model, route.key,
                 len(urls) - len(failed), len(urls))
        status = (200 if not failed else 409 if all(error.status == 409 for _, error in failed)
                  else 401 if len(failed) == len(urls) and all(error.status == 401 for _, error in failed) else 502)
        return web.json_response({
            "model": model, "server": route.key, "action": action, "replicas": len(urls),
            "done": len(urls) - len(failed),
            "failed": [f"replica {index + 1} of {len(urls)}: {error}" for index, error in failed]}, status=status)

    async def _one(self, action: str, url: str, route: Route, model: str, auth: Auth) -> RoomError | None:
        memory = self.upstreams.memory
        try:
            if action == "load":
                await memory.load(self.upstreams.session, url, model, route.memory_budget, dict(route.estimates),
                                  slots=route.keeps_slots, max_loaded=route.max_loaded, auth=auth)
            else:
                await memory.unload(self.upstreams.session, url, model, slots=route.keeps_slots, auth=auth)
        except RoomError as exc:
            log.warning("admin %s of %s on replica %s: %s", action, model, url, exc)
            return exc
        return None
