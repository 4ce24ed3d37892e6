"""The kept prompt caches of router-mode servers in the gateway (gateway/room.py): before the gateway unloads a
model (the memory budget's eviction, the admin API's unload) it saves that model's slots on that replica, after it
loads one (a budgeted request, the admin API's load) it restores them, each slot from its own file; only for
servers with spec.promptCache.persist; a save never loads a model (autoload=false), and a slot without a file is
skipped without failing the load. Against fake router replicas (tests/unit/test_router_budget.py's, with /props
and /slots)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from llama_operator.gateway.room import MemoryKeeper, slot_file
from llama_operator.gateway.routing import route_from
from tests.fake_router import SlotRouter, serve
from tests.unit.test_gateway_models_admin import HEADERS, TOKEN, _gateway
from tests.unit.test_router_budget import ESTIMATES, MiB


@pytest.fixture
async def replica() -> AsyncIterator[tuple[SlotRouter, str]]:
    fake = SlotRouter({"a"})
    runner, url = await serve(fake)
    yield fake, url
    await runner.cleanup()


def _server(persist: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"models": [{"modelRef": {"name": n}} for n in ESTIMATES]}
    if persist:
        spec["promptCache"] = {"persist": True}
    return {"metadata": {"name": "fleet", "namespace": "default"}, "spec": spec}


def test_the_route_keeps_slots_only_for_router_servers_that_persist() -> None:
    assert route_from(_server(True)).keeps_slots
    assert not route_from(_server(False)).keeps_slots
    one = {"metadata": {"name": "solo", "namespace": "default"},
           "spec": {"modelRef": {"name": "q"}, "promptCache": {"persist": True}}}
    assert not route_from(one).keeps_slots  # one model: the drain sidecar keeps them (at pod stop and start)
    keyed = _server(True)
    keyed["spec"]["apiKeySecretRef"] = {"name": "keys", "key": "fleet"}
    assert route_from(keyed).keeps_slots  # the gateway's /models and /slots calls carry the requester's key


async def test_admin_unload_saves_first_and_load_restores_after(replica: tuple[SlotRouter, str]) -> None:
    fake, url = replica
    gateway, admin = await _gateway(TOKEN, [url])
    gateway.routes.upsert(_server(True))
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{admin}/admin/models/a/unload", headers=HEADERS) as answer:
                assert answer.status == 200, await answer.text()
            assert fake.calls == ["save a 0", "save a 1", "unload a"]
            assert fake.files == {slot_file("a", 0), slot_file("a", 1)} == {"a-0.slot", "a-1.slot"}
            fake.calls.clear()
            async with client.post(f"{admin}/admin/models/a/load", headers=HEADERS) as answer:
                assert answer.status == 200, await answer.text()
            assert fake.calls == ["load a", "restore a 0", "restore a 1"]
            fake.calls.clear()
            # b was never saved: its restores find no file, are skipped, and the load still succeeds.
            async with client.post(f"{admin}/admin/models/b/load", headers=HEADERS) as answer:
                assert answer.status == 200, await answer.text()
            assert fake.calls == ["load b", "restore b 0", "restore b 1"]
            assert all("autoload=false" in query for query in fake.queries)  # a slot call never loads a model
    finally:
        await gateway.stop()


async def test_without_persist_nothing_is_saved_or_restored(replica: tuple[SlotRouter, str]) -> None:
    fake, url = replica
    gateway, admin = await _gateway(TOKEN, [url])  # the same server without promptCache
    try:
        async with aiohttp.ClientSession() as client:
            for action in ("unload", "load"):
                async with client.post(f"{admin}/admin/models/a/{action}", headers=HEADERS) as answer:
                    assert answer.status == 200, await answer.text()
        assert fake.calls == ["unload a", "load a"]
    finally:
        await gateway.stop()


async def test_a_budget_eviction_saves_the_evicted_and_restores_the_loaded(
        replica: tuple[SlotRouter, str]) -> None:
    fake, url = replica
    fake.loaded = {"big"}
    fake.files = {"a-1.slot"}  # saved at an earlier unload
    keeper = MemoryKeeper(wait_seconds=2)
    async with aiohttp.ClientSession() as session:
        await keeper.admit(session, url, "a", 70 * MiB, ESTIMATES, slots=True)
        keeper.done(url, "a")
        assert fake.calls == ["save big 0", "save big 1", "unload big", "load a", "restore a 0", "restore a 1"]
        fake.calls.clear()
        await keeper.admit(session, url, "a", 70 * MiB, ESTIMATES, slots=True)  # loaded: nothing restored over it
        keeper.done(url, "a")
        assert fake.calls == []
        await keeper.admit(session, url, "big", 70 * MiB, ESTIMATES)  # slots=False: the plain eviction
        keeper.done(url, "big")
        assert fake.calls == ["unload a", "load big"]


async def test_a_replica_that_does_not_tell_its_slots_is_not_called(replica: tuple[SlotRouter, str]) -> None:
    fake, url = replica
    async with aiohttp.ClientSession() as session:
        outcome = await MemoryKeeper().save_slots(session, url, "b")  # not loaded: /props answers 400
    assert "no slots saved" in outcome and fake.calls == []


async def test_a_request_for_an_unloaded_model_is_loaded_by_the_gateway_and_restored(
        replica: tuple[SlotRouter, str]) -> None:
    """No memory budget: without the kept caches the request would go as it is and llama-server would load the
    model on it, cold; with them the gateway loads it and restores its slots before the request goes."""
    fake, url = replica
    fake.files = {"b-0.slot"}
    gateway, _ = await _gateway(TOKEN, [url])
    gateway.routes.upsert(_server(True))
    try:
        async with aiohttp.ClientSession() as client:
            api = f"http://127.0.0.1:{gateway.api_port}"
            async with client.post(f"{api}/v1/chat/completions", json={"model": "b", "messages": []}) as answer:
                assert answer.status == 200, await answer.text()
            assert fake.calls == ["load b", "restore b 0", "restore b 1"]
            fake.calls.clear()
            async with client.post(f"{api}/v1/chat/completions", json={"model": "b", "messages": []}) as answer:
                assert answer.status == 200, await answer.text()
            assert fake.calls == []  # loaded: the request goes at once
            gateway.routes.upsert(_server(False))
            async with client.post(f"{api}/v1/chat/completions", json={"model": "big", "messages": []}) as answer:
                assert answer.status == 200, await answer.text()
            assert fake.calls == []  # without the kept caches the gateway loads nothing (the fake loads nothing)
    finally:
        await gateway.stop()


async def test_at_the_count_limit_the_gateway_saves_and_unloads_the_least_recently_used_idle_model(
        replica: tuple[SlotRouter, str]) -> None:
    fake, url = replica
    fake.loaded = {"a", "b"}
    keeper = MemoryKeeper(wait_seconds=2)
    async with aiohttp.ClientSession() as session:
        for name in ("b", "a"):  # b used first, then a: b is the least recently used
            await keeper.admit(session, url, name, 0, {}, slots=True, max_loaded=2)
            keeper.done(url, name)
        await keeper.admit(session, url, "a", 0, {}, slots=True, max_loaded=2)  # a busy now
        fake.calls.clear()
        await keeper.admit(session, url, "big", 0, {}, slots=True, max_loaded=2)
        assert fake.calls == ["save b 0", "save b 1", "unload b", "load big", "restore big 0", "restore big 1"]
        assert fake.loaded == {"a", "big"}
