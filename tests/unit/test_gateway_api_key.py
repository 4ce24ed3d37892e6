"""A router-mode server with an API key (spec.apiKeySecretRef): llama-server then guards /models,
/models/load|unload, /props and /slots with it (only /health is public; measured: tests/runtime/
test_router_api_key.py). The gateway holds no key: its own calls made for a request (the load before it, the
memory budget's evictions, the kept prompt caches' save and restore) carry the client's Authorization or
X-Api-Key, and the admin API's load and unload the key its caller gives in X-Upstream-Authorization. Against fake
router replicas that want a key (tests/fake_router.py's, behind a key check)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llama_operator.gateway.models_admin import UPSTREAM_AUTHORIZATION
from llama_operator.gateway.room import MemoryKeeper, RoomError, auth_headers
from tests.fake_router import SlotRouter, serve
from tests.unit.test_gateway_models_admin import HEADERS, TOKEN, _gateway
from tests.unit.test_router_budget import ESTIMATES, MiB

KEY = "server-key"


class KeyedRouter(SlotRouter):
    """The fake router, started with --api-key: every path but /health wants the key (Bearer or X-Api-Key)."""

    def __init__(self, loaded: set[str]) -> None:
        super().__init__(loaded)
        self.refused: list[str] = []

    @web.middleware
    async def check(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ") or request.headers.get("X-Api-Key")
        if request.path != "/health" and given != KEY:
            self.refused.append(f"{request.method} {request.path}")
            return web.json_response({"error": {"message": "Invalid API Key", "code": 401}}, status=401)
        return await handler(request)


@pytest.fixture
async def replica() -> AsyncIterator[tuple[KeyedRouter, str]]:
    fake = KeyedRouter({"a"})
    runner, url = await serve(fake, middlewares=[fake.check])
    yield fake, url
    await runner.cleanup()


def _keyed(*, persist: bool = True, budget: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"models": [{"modelRef": {"name": n}} for n in ESTIMATES],
                            "apiKeySecretRef": {"name": "keys", "key": "fleet"}}
    if persist:
        spec["promptCache"] = {"persist": True}
    if budget:
        spec["resources"] = {"limits": {"memory": budget}}
    return {"metadata": {"name": "fleet", "namespace": "default"}, "spec": spec, "status": {
        "models": [{"name": n, "model": n, "state": "Unloaded", "estimate": f"{size // MiB}Mi"}
                   for n, size in ESTIMATES.items()]}}


def test_the_key_headers_of_a_request_are_the_ones_llama_server_reads() -> None:
    assert auth_headers({"Authorization": "Bearer k", "X-Api-Key": "k2", "Cookie": "c"}) == \
        {"Authorization": "Bearer k", "X-Api-Key": "k2"}
    assert auth_headers({"Content-Type": "application/json"}) == {}


@pytest.mark.parametrize("header", [{"Authorization": f"Bearer {KEY}"}, {"X-Api-Key": KEY}])
async def test_a_request_loads_and_restores_with_the_clients_own_key(
        replica: tuple[KeyedRouter, str], header: dict[str, str]) -> None:
    fake, url = replica
    fake.files = {"b-0.slot"}
    gateway, _ = await _gateway(TOKEN, [url])
    gateway.routes.upsert(_keyed())
    try:
        async with aiohttp.ClientSession() as client:
            api = f"http://127.0.0.1:{gateway.api_port}"
            async with client.post(f"{api}/v1/chat/completions", json={"model": "b", "messages": []},
                                   headers=header) as answer:
                assert answer.status == 200, await answer.text()
    finally:
        await gateway.stop()
    assert fake.calls == ["load b", "restore b 0", "restore b 1"]
    assert fake.refused == []


async def test_a_wrong_key_is_answered_401_and_the_replica_stays_in_use(replica: tuple[KeyedRouter, str]) -> None:
    fake, url = replica
    gateway, _ = await _gateway(TOKEN, [url])
    gateway.routes.upsert(_keyed())
    try:
        async with aiohttp.ClientSession() as client:
            api = f"http://127.0.0.1:{gateway.api_port}"
            async with client.post(f"{api}/v1/chat/completions", json={"model": "b", "messages": []},
                                   headers={"Authorization": "Bearer wrong"}) as answer:
                assert answer.status == 401
                error = (await answer.json())["error"]
            assert error["code"] == "invalid_api_key" and "needs the server's API key" in error["message"]
            assert "\n" not in error["message"] and "127.0.0.1" not in error["message"]
            assert fake.refused == ["GET /models"] and fake.calls == []
            async with client.post(f"{api}/v1/chat/completions", json={"model": "b", "messages": []},
                                   headers={"Authorization": f"Bearer {KEY}"}) as answer:
                assert answer.status == 200, await answer.text()  # not ejected for a client's wrong key
    finally:
        await gateway.stop()


async def test_a_budget_eviction_saves_unloads_loads_and_restores_with_the_key(
        replica: tuple[KeyedRouter, str]) -> None:
    fake, url = replica
    fake.loaded = {"big"}
    keeper = MemoryKeeper(wait_seconds=2)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(RoomError) as refused:  # without the key: the replica's 401, not a failed replica
            await keeper.admit(session, url, "a", 70 * MiB, ESTIMATES, slots=True)
        keeper.done(url, "a")
        assert refused.value.status == 401 and not refused.value.replica_failed
        fake.refused.clear()
        await keeper.admit(session, url, "a", 70 * MiB, ESTIMATES, slots=True, auth={"Authorization": f"Bearer {KEY}"})
        keeper.done(url, "a")
    assert fake.calls == ["save big 0", "save big 1", "unload big", "load a", "restore a 0", "restore a 1"]
    assert fake.refused == []


async def test_the_admin_api_passes_on_the_key_its_caller_gives(replica: tuple[KeyedRouter, str]) -> None:
    fake, url = replica
    gateway, admin = await _gateway(TOKEN, [url])
    gateway.routes.upsert(_keyed(budget="100Mi"))
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{admin}/admin/models/a/unload", headers=HEADERS) as answer:
                assert answer.status == 401
                message = (await answer.json())["error"]["message"]
            assert message == ("LlamaServer default/fleet needs its API key (spec.apiKeySecretRef) for "
                               "/models/unload: send it as X-Upstream-Authorization: Bearer <key>.")
            assert fake.refused == [] and fake.calls == []  # the replica was not called
            wrong = {**HEADERS, UPSTREAM_AUTHORIZATION: "Bearer wrong"}
            async with client.post(f"{admin}/admin/models/a/unload", headers=wrong) as answer:
                assert answer.status == 401
                assert "needs the server's API key" in (await answer.json())["failed"][0]
            keyed = {**HEADERS, UPSTREAM_AUTHORIZATION: f"Bearer {KEY}"}
            fake.refused.clear()
            for action in ("unload", "load"):
                async with client.post(f"{admin}/admin/models/a/{action}", headers=keyed) as answer:
                    assert answer.status == 200, await answer.text()
            assert fake.calls == ["save a 0", "save a 1", "unload a", "load a", "restore a 0", "restore a 1"]
            assert fake.refused == []
    finally:
        await gateway.stop()
