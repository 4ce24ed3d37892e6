"""Fake replicas of a router-mode llama-server for the gateway's unit tests (the memory budget, the kept prompt
caches, the admin API, the API key), served on loopback by aiohttp. What they answer follows the real router's
endpoints, measured against the pinned llama-server in tests/runtime/test_router_budget.py and
test_router_prompt_cache.py.

- `FakeRouter(loaded)`: /models with each model's state, /models/load and /models/unload (instant, `calls`
  records them), and a chat completion that echoes the model.
- `SlotRouter(loaded)`: the same with the slot API (/props, /slots/{id}?action=save|restore): two slots per
  model; a file exists once saved.
- `serve(fake, middlewares=())` -> (runner, url): the fake on a free port; `runner.cleanup()` stops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web


class FakeRouter:
    def __init__(self, loaded: set[str]) -> None:
        self.loaded = set(loaded)
        self.calls: list[str] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/models", self.models)
        app.router.add_post("/models/{action}", self.action)
        app.router.add_post("/v1/chat/completions", self.chat)

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": n, "status": {"value": "loaded" if n in self.loaded else "unloaded"}}
                for n in ("big", "a", "b")]
        return web.json_response({"data": data})

    async def chat(self, request: web.Request) -> web.Response:
        return web.json_response({"model": (await request.json())["model"]})

    async def action(self, request: web.Request) -> web.Response:
        name = (await request.json())["model"]
        action = request.match_info["action"]
        self.calls.append(f"{action} {name}")
        (self.loaded.add if action == "load" else self.loaded.discard)(name)
        return web.json_response({"success": True})


class SlotRouter(FakeRouter):
    def __init__(self, loaded: set[str]) -> None:
        super().__init__(loaded)
        self.files: set[str] = set()
        self.queries: list[str] = []

    def add_routes(self, app: web.Application) -> None:
        super().add_routes(app)
        app.router.add_get("/props", self.props)
        app.router.add_post("/slots/{slot}", self.slots)

    async def props(self, request: web.Request) -> web.Response:
        if request.query.get("model") not in self.loaded:
            return web.json_response({"error": {"message": "model is not loaded"}}, status=400)
        return web.json_response({"total_slots": 2})

    async def slots(self, request: web.Request) -> web.Response:
        body = await request.json()
        action, slot, model = request.query["action"], request.match_info["slot"], body["model"]
        self.queries.append(request.query_string)
        self.calls.append(f"{action} {model} {slot}")
        if model not in self.loaded:
            return web.json_response({"error": {"message": "model is not loaded"}}, status=400)
        if action == "save":
            self.files.add(body["filename"])
            return web.json_response({"n_saved": 100})
        if body["filename"] not in self.files:
            return web.json_response({"error": {"message": "failed to open file"}}, status=400)
        return web.json_response({"n_restored": 100})


async def serve(fake: FakeRouter, middlewares: Sequence[Any] = ()) -> tuple[web.AppRunner, str]:
    app = web.Application(middlewares=list(middlewares))
    fake.add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
