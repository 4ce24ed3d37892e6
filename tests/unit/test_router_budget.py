"""Memory-budgeted router mode, the pure parts: which idle models the gateway unloads (gateway/budget.py), each
model's estimate and the budget used (builders/router_memory.py), and the gateway's reading of them (routing.py)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llama_operator.api.v1beta1 import LlamaModel, LlamaServer, LlamaServerSpec
from llama_operator.builders.router_memory import budget_used, memory_budget, served_estimates
from llama_operator.config import Settings
from llama_operator.fit import estimate_server, model_info
from llama_operator.gateway import room as room_io
from llama_operator.gateway.budget import Resident, Room, make_room
from llama_operator.gateway.endpoints import EndpointTable
from llama_operator.gateway.hold import HoldQueue
from llama_operator.gateway.proxy import Proxy
from llama_operator.gateway.room import MemoryKeeper, RoomError, resident_states
from llama_operator.gateway.routing import RoutingTable, route_from
from llama_operator.gateway.traffic import Traffic
from llama_operator.gguf import FileByteSource, read_header
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.fits import fits_condition
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body
from tests.fake_router import FakeRouter, serve
from tests.fakekube import Events, FakeKube
from tests.tiny_gguf import write_tiny_llama

MiB = 1 << 20


def test_nothing_is_unloaded_while_the_new_model_fits() -> None:
    assert make_room([Resident("a", 300 * MiB)], 1024 * MiB, "b", 700 * MiB) == Room()


def test_least_recently_used_idle_models_go_first_until_it_fits() -> None:
    resident = [Resident("old", 200 * MiB, last_used=1), Resident("newer", 200 * MiB, last_used=5),
                Resident("newest", 200 * MiB, last_used=9)]
    assert make_room(resident, 800 * MiB, "big", 400 * MiB).unload == ("old",)
    assert make_room(resident, 800 * MiB, "big", 600 * MiB).unload == ("old", "newer")


def test_a_busy_model_is_never_unloaded() -> None:
    resident = [Resident("busy", 200 * MiB, last_used=1, in_flight=2), Resident("idle", 200 * MiB, last_used=5)]
    assert make_room(resident, 800 * MiB, "big", 500 * MiB) == Room(unload=("idle",))
    short = make_room(resident, 800 * MiB, "big", 700 * MiB)
    assert short == Room(unload=("idle",), busy=("busy",)) and not short.fits


def test_a_model_already_loaded_needs_no_room() -> None:
    assert make_room([Resident("a", 900 * MiB), Resident("b", 900 * MiB)], 1024 * MiB, "a", 900 * MiB) == Room()


def test_a_model_larger_than_the_budget_is_refused_with_the_numbers() -> None:
    room = make_room([], 1024 * MiB, "huge", 1536 * MiB)
    assert room.refused == ("model huge needs an estimated 1.50 GiB, more than the server's memory budget of "
                            "1.00 GiB even with no other model loaded") and not room.fits


def test_the_sum_never_passes_the_budget_where_a_count_limit_would() -> None:
    """The issue's case: a 4B model and two 270M ones, a budget for the big one or the two small ones."""
    sizes = {"4b": 3000 * MiB, "270m-a": 600 * MiB, "270m-b": 600 * MiB}
    budget = 3300 * MiB
    loaded: dict[str, float] = {}
    for clock, model in enumerate(["4b", "270m-a", "270m-b", "4b", "270m-a", "270m-b", "4b"], start=1):
        room = make_room([Resident(n, sizes[n], t) for n, t in loaded.items()], budget, model, sizes[model])
        assert room.fits
        for name in room.unload:
            del loaded[name]
        loaded[model] = clock
        assert sum(sizes[n] for n in loaded) <= budget


# ------------------------------------------------------------ estimates and the budget (builders/router_memory.py)


def _tiny_model(tmp_path: Path, name: str, vocab: int | None = None) -> LlamaModel:
    path = write_tiny_llama(tmp_path / f"{name}.gguf", vocab_size=vocab)
    gguf = model_info(asyncio.run(read_header(FileByteSource(path)))).to_wire()
    return LlamaModel.model_validate(model_body(name, status={"phase": "Ready", "gguf": gguf}))


def _server(**spec: Any) -> LlamaServer:
    return LlamaServer.model_validate({"metadata": {"name": "fleet", "namespace": "default"}, "spec": {
        "models": [{"modelRef": {"name": "big"}, "contextSize": 256},
                   {"modelRef": {"name": "small"}, "alias": "s", "contextSize": 256},
                   {"modelRef": {"name": "small"}, "alias": "s-long", "contextSize": 4096},
                   {"modelRef": {"name": "volume-only"}}], **spec}})


def test_each_served_model_gets_the_single_model_estimate_of_its_own_settings(tmp_path: Path) -> None:
    models = {"big": _tiny_model(tmp_path, "big", 50000), "small": _tiny_model(tmp_path, "small")}
    models["volume-only"] = LlamaModel.model_validate(model_body("volume-only", status={"phase": "Ready"}))
    estimates = served_estimates(_server(), models)
    assert set(estimates) == {"big", "s", "s-long"}  # no header, no estimate
    single = LlamaServerSpec.model_validate({"modelRef": {"name": "small"}, "contextSize": 4096})
    fit = estimate_server(single, models["small"].status.gguf)  # type: ignore[union-attr]
    assert fit is not None and estimates["s-long"] == fit.host.total
    assert estimates["big"] > estimates["s-long"] > estimates["s"]


def test_the_budget_is_the_memory_limit_and_used_is_the_fullest_pod() -> None:
    assert memory_budget(_server()) is None
    server = _server(resources={"limits": {"memory": "1Gi"}})
    assert memory_budget(server) == 1024 * MiB
    estimates = {"big": 600 * MiB, "s": 100 * MiB + 1, "s-long": 300 * MiB}
    pod_a = [{"id": "big", "status": {"value": "loaded"}}, {"id": "s", "status": {"value": "loading"}}]
    pod_b = [{"id": "s-long", "status": {"value": "loaded"}}, {"id": "big", "status": {"value": "unloaded"}}]
    assert budget_used(server, [("a", pod_a), ("b", pod_b)], estimates) == "701Mi/1024Mi"  # rounded up per model
    assert budget_used(_server(), [("a", pod_a)], estimates) is None


# ------------------------------------------------------------------------ the gateway's view (gateway/routing.py)


def test_the_route_reads_the_budget_and_the_estimates_and_drops_what_does_not_parse() -> None:
    body = {"metadata": {"name": "fleet", "namespace": "default"}, "spec": _server(
        resources={"limits": {"memory": "512Mi"}}).spec.to_wire(), "status": {"models": [
            {"name": "big", "estimate": "300Mi"}, {"name": "s", "estimate": "1e999999999"}, {"name": "s-long"},
            {"name": "volume-only", "estimate": "lots"}, "junk"]}}
    route = route_from(body)
    assert route is not None and route.memory_budget == 512 * MiB
    assert route.estimates == (("big", 300 * MiB),)
    body["spec"].pop("resources")
    route = route_from(body)
    assert route is not None and route.memory_budget is None


# ------------------------------------------------------------------ the I/O on a replica (gateway/room.py)




ESTIMATES = {"big": 60 * MiB, "a": 20 * MiB, "b": 20 * MiB}


async def test_the_keeper_unloads_idle_models_and_waits_for_busy_ones() -> None:
    fake = FakeRouter({"a", "b"})
    runner, url = await serve(fake)
    keeper = MemoryKeeper(wait_seconds=0.5)
    try:
        async with aiohttp.ClientSession() as session:
            await keeper.admit(session, url, "a", 70 * MiB, ESTIMATES)  # loaded: goes at once, now busy
            assert fake.calls == []
            await keeper.admit(session, url, "b", 70 * MiB, ESTIMATES)
            keeper.done(url, "b")
            with pytest.raises(RoomError, match="model big does not fit beside the busy models a") as busy:
                await keeper.admit(session, url, "big", 70 * MiB, ESTIMATES)
            keeper.done(url, "big")
            # Nothing is unloaded for a model that would not fit anyway.
            assert busy.value.status == 503 and fake.calls == [] and fake.loaded == {"a", "b"}
            keeper.done(url, "a")
            await keeper.admit(session, url, "big", 70 * MiB, ESTIMATES)
            keeper.done(url, "big")
            assert fake.calls == ["unload b", "unload a", "load big"] and fake.loaded == {"big"}  # b used longest ago
            await keeper.admit(session, url, "unknown", 70 * MiB, ESTIMATES)  # no estimate: not checked
            assert fake.calls[-1] == "load big"
    finally:
        await runner.cleanup()


async def test_a_replica_answer_that_is_not_a_model_list_is_a_503() -> None:
    with pytest.raises(RoomError, match="not a model list") as refused:
        resident_states(b'{"data": [{"id": "a"}]}')
    assert refused.value.status == 503
    assert resident_states(b'{"data": [{"id": "a", "status": {"value": "loading"}}, '
                           b'{"id": "b", "status": {"value": "sleeping"}}]}') == {"a": "loading"}


async def test_a_replica_that_does_not_answer_models_is_skipped_for_another() -> None:
    """Through the gateway's proxy: the budget's GET /models to a dead replica is a failure before answering,
    like a refused connection, so the request goes to the other replica (which makes room and answers)."""
    fake = FakeRouter({"a", "b"})
    runner, url = await serve(fake)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]  # closed when the block ends: connections are refused
    routes, endpoints = RoutingTable(), EndpointTable()
    routes.upsert({"metadata": {"name": "fleet", "namespace": "default"}, "spec": {
        "models": [{"modelRef": {"name": n}} for n in ESTIMATES], "resources": {"limits": {"memory": "70Mi"}}},
        "status": {"models": [{"name": n, "model": n, "state": "Unloaded", "estimate": f"{size // MiB}Mi"}
                              for n, size in ESTIMATES.items()]}})
    for index, port in enumerate((dead, int(url.rsplit(":", 1)[1]))):
        endpoints.upsert({"metadata": {"namespace": "default", "name": f"fleet-{index}",
                                       "labels": {"kubernetes.io/service-name": "fleet"}},
                          "ports": [{"name": "http", "port": port}],
                          "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
    proxy = Proxy(routes, endpoints, Traffic(), HoldQueue(timeout=1.0, limit=2), kick=lambda: None,
                  connect_timeout=1.0)
    gateway = web.AppRunner(proxy.app())
    await gateway.setup()
    site = web.TCPSite(gateway, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(2):  # one of the two picks the dead replica first
                async with client.post(f"{base}/v1/chat/completions", json={
                        "model": "big", "messages": [{"role": "user", "content": "hi"}]}) as answer:
                    assert answer.status == 200, await answer.text()
        assert fake.calls == ["unload a", "unload b", "load big"] and fake.loaded == {"big"}
    finally:
        await gateway.cleanup()
        await runner.cleanup()


# ------------------------------------------------------------------- the Fits condition in router mode


def test_router_fits_says_whether_each_model_fits_the_budget_alone() -> None:
    estimates = {"big": 600 * MiB, "s": 100 * MiB, "s-long": 300 * MiB}
    unknown = fits_condition(_server(), None, None, estimates=estimates, generation=1)
    assert (unknown.status, unknown.reason) == ("Unknown", "NoEstimate")
    assert "set resources.limits.memory to make it the budget of the loaded models" in unknown.message
    fits = fits_condition(_server(resources={"limits": {"memory": "1Gi"}}), None, None, estimates=estimates,
                          generation=1)
    assert (fits.status, fits.reason) == ("True", "Fits")
    assert fits.message == ("each model fits resources.limits.memory 1.00 GiB alone (the largest: big, 600.0 MiB); "
                            "the gateway unloads idle models to keep the loaded ones within it; no estimate for "
                            "volume-only (no GGUF memory shape): only maxLoaded bounds it")
    small = fits_condition(_server(resources={"limits": {"memory": "512Mi"}}), None, None, estimates=estimates,
                           generation=1)
    assert (small.status, small.reason) == ("False", "ModelLargerThanBudget")
    assert small.message == ("big needs an estimated 600.0 MiB: more than resources.limits.memory 512.0 MiB, the "
                             "budget of the loaded models, even alone (the gateway refuses its requests): raise the "
                             "limit to at least 600Mi")


async def test_the_reconcile_of_a_router_server_checks_each_model_against_the_budget(tmp_path: Path) -> None:
    kube = FakeKube()
    for name, vocab in (("big", 50000), ("small", None)):
        model = (await asyncio.to_thread(_tiny_model, tmp_path, name, vocab)).to_wire()
        model["status"].update(cacheKey=f"{name}-0123456789ab", files=[{"name": f"{name}.gguf"}])
        kube.put(LLAMA_MODELS, model)
    for name in ("volume-only",):
        kube.put(LLAMA_MODELS, model_body(name, status={"phase": "Ready", "cacheKey": f"{name}-0123456789ab",
                                                         "files": [{"name": "m.gguf"}]}))
    body = {**_server(resources={"limits": {"memory": "40Mi"}}).to_wire(), "metadata": {
        "name": "fleet", "namespace": "default", "generation": 1, "uid": "uid-fleet"}}
    kube.put(LLAMA_SERVERS, body)
    await reconcile_server(kube.objects[("llamaservers", "default", "fleet")],
                           Context(kube=kube, settings=Settings(), record_event=Events()))
    fits = {c["type"]: c for c in kube.objects[("llamaservers", "default", "fleet")]["status"]["conditions"]}["Fits"]
    assert (fits["status"], fits["reason"]) == ("False", "ModelLargerThanBudget")
    assert fits["message"].startswith("big needs an estimated 5") and "40.0 MiB" in fits["message"]


async def test_the_keeper_forgets_idle_replicas_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica addresses come and go with pods: the record of (replica, model) uses stays bounded, and a request
    in flight is never forgotten (its model could be unloaded under it)."""
    monkeypatch.setattr(room_io, "MAX_TRACKED", 8)
    keeper = MemoryKeeper()
    async with aiohttp.ClientSession() as session:
        await keeper.admit(session, "http://busy", "m", 1, {})  # no estimate: nothing asked of the replica
        for index in range(100):
            await keeper.admit(session, f"http://10.0.0.{index}", "m", 1, {})
            keeper.done(f"http://10.0.0.{index}", "m")
    assert len(keeper._use) <= 8 and keeper._use[("http://busy", "m")].in_flight == 1
