"""The gateway's admin API of router-mode servers (gateway/models_admin.py): load and unload one model on every
ready replica, behind a bearer token, off without one; against two fake router replicas (llama-server's /models
endpoints) and the gateway's own apps in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llama_operator.gateway.app import Gateway, GatewayConfig
from llama_operator.gateway.models_admin import read_token
from tests.fake_router import FakeRouter, serve
from tests.unit.test_router_budget import ESTIMATES, MiB

TOKEN = b"s3cret-admin-token"
HEADERS = {"Authorization": f"Bearer {TOKEN.decode()}"}


async def _gateway(token: bytes | None, urls: list[str], budget: str | None = None) -> tuple[Gateway, str]:
    gateway = Gateway(GatewayConfig(listen="127.0.0.1:0", admin="127.0.0.1:0", autoscale=False, admin_token=token),
                      None)
    spec: dict[str, Any] = {"models": [{"modelRef": {"name": n}} for n in ESTIMATES]}
    if budget:
        spec["resources"] = {"limits": {"memory": budget}}
    gateway.routes.upsert({"metadata": {"name": "fleet", "namespace": "default"}, "spec": spec, "status": {
        "models": [{"name": n, "model": n, "state": "Unloaded", "estimate": f"{size // MiB}Mi"}
                   for n, size in ESTIMATES.items()]}})
    gateway.routes.upsert({"metadata": {"name": "solo", "namespace": "default"}, "spec": {"modelRef": {"name": "q"}}})
    for index, url in enumerate(urls):
        gateway.endpoints.upsert({"metadata": {"namespace": "default", "name": f"fleet-{index}",
                                               "labels": {"kubernetes.io/service-name": "fleet"}},
                                  "ports": [{"name": "http", "port": int(url.rsplit(":", 1)[1])}],
                                  "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
    await gateway.start()
    return gateway, f"http://127.0.0.1:{gateway.admin_port}"


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[list[FakeRouter], list[str]]]:
    fakes = [FakeRouter({"a"}), FakeRouter({"a", "b"})]
    started = [await serve(fake) for fake in fakes]
    yield fakes, [url for _, url in started]
    for runner, _ in started:
        await runner.cleanup()


async def test_load_and_unload_reach_every_ready_replica(replicas: tuple[list[FakeRouter], list[str]]) -> None:
    fakes, urls = replicas
    gateway, admin = await _gateway(TOKEN, urls)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(f"{admin}/admin/models/b/load", headers=HEADERS) as answer:
                assert answer.status == 200, await answer.text()
                assert await answer.json() == {"model": "b", "server": "default/fleet", "action": "load",
                                               "replicas": 2, "done": 2, "failed": []}
            assert fakes[0].calls == ["load b"] and fakes[1].calls == []  # already loaded there
            async with client.post(f"{admin}/admin/models/a/unload", headers=HEADERS) as answer:
                assert answer.status == 200, await answer.text()
            assert all(fake.loaded == {"b"} for fake in fakes)
    finally:
        await gateway.stop()


async def test_with_a_memory_budget_a_load_makes_room_first(replicas: tuple[list[FakeRouter], list[str]]) -> None:
    fakes, urls = replicas
    gateway, admin = await _gateway(TOKEN, urls[1:], budget="70Mi")
    try:
        async with aiohttp.ClientSession() as client, \
                client.post(f"{admin}/admin/models/big/load", headers=HEADERS) as answer:
            assert answer.status == 200, await answer.text()
        assert fakes[1].calls[-1] == "load big" and fakes[1].loaded == {"big"}
    finally:
        await gateway.stop()


@pytest.mark.parametrize(("path", "headers", "status", "says"), [
    ("/admin/models/b/load", {}, 401, "needs Authorization: Bearer"),
    ("/admin/models/b/load", {"Authorization": "Bearer wrong"}, 401, "needs Authorization: Bearer"),
    ("/admin/models/b/load", {"Authorization": f"Basic {TOKEN.decode()}"}, 401, "needs Authorization"),
    ("/admin/models/b/pin", HEADERS, 404, "the actions are load and unload"),
    ("/admin/models/gamma/load", HEADERS, 404, "No single LlamaServer serves the model 'gamma'"),
    ("/admin/models/q/load", HEADERS, 400, "not a model of a router-mode LlamaServer"),
])
async def test_what_the_admin_api_refuses(replicas: tuple[list[FakeRouter], list[str]], path: str,
                                          headers: dict[str, str], status: int, says: str) -> None:
    fakes, urls = replicas
    gateway, admin = await _gateway(TOKEN, urls)
    try:
        async with aiohttp.ClientSession() as client, client.post(admin + path, headers=headers) as answer:
            assert answer.status == status
            text = await answer.text()
            assert says in text and TOKEN.decode() not in text
        assert all(fake.calls == [] for fake in fakes)
    finally:
        await gateway.stop()


async def test_no_token_no_admin_api(replicas: tuple[list[FakeRouter], list[str]]) -> None:
    _, urls = replicas
    gateway, admin = await _gateway(None, urls)
    try:
        async with aiohttp.ClientSession() as client, \
                client.post(f"{admin}/admin/models/b/load", headers=HEADERS) as answer:
            assert answer.status == 404
    finally:
        await gateway.stop()


async def test_a_busy_model_is_not_unloaded(replicas: tuple[list[FakeRouter], list[str]]) -> None:
    fakes, urls = replicas
    gateway, admin = await _gateway(TOKEN, urls)
    try:
        gateway.proxy.upstreams.memory._mark(urls[1], "a").in_flight = 1  # a request through this gateway
        async with aiohttp.ClientSession() as client, \
                client.post(f"{admin}/admin/models/a/unload", headers=HEADERS) as answer:
            body = await answer.json()
        assert answer.status == 409 and body["done"] == 1
        number = [e.url for e in gateway.endpoints.ready("default", "fleet")].index(urls[1]) + 1
        assert body["failed"] == [f"replica {number} of 2: 1 request(s) through this gateway are in flight on it; "
                                  "retry"]
        assert fakes[0].loaded == set() and fakes[1].loaded == {"a", "b"}
    finally:
        await gateway.stop()


async def test_a_replica_that_does_not_answer_is_a_502_naming_no_address() -> None:
    fake = FakeRouter({"a"})
    runner, url = await serve(fake)
    await runner.cleanup()  # gone: connections are refused
    gateway, admin = await _gateway(TOKEN, [url])
    try:
        async with aiohttp.ClientSession() as client, \
                client.post(f"{admin}/admin/models/b/load", headers=HEADERS) as answer:
            body = await answer.json()
        assert answer.status == 502 and body["failed"][0].startswith("replica 1 of 1: the replica did not answer")
        assert "127.0.0.1" not in str(body)
    finally:
        await gateway.stop()


@pytest.mark.parametrize("content", [b"", b"  \n", b"x" * 5000])
def test_a_token_file_that_holds_no_usable_token_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="want a token of 1 to 4096 bytes"):
        read_token(str(path))
    with pytest.raises(ValueError, match="No such file"):
        read_token(str(tmp_path / "missing"))
    path.write_bytes(TOKEN + b"\n")
    assert read_token(str(path)) == TOKEN


def test_the_token_is_not_in_the_configs_repr() -> None:
    assert TOKEN.decode() not in repr(GatewayConfig(admin_token=TOKEN))
