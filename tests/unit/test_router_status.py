"""status.models of router-mode servers: the poller asks the pods' /models (a local HTTP server stands in for
the pods at 127.0.0.1) and the reconcile of a router-mode server (FakeKube)."""

from __future__ import annotations

import asyncio
import base64
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from llama_operator.config import Settings
from llama_operator.contract import first_key
from llama_operator.fit import model_info
from llama_operator.gguf import FileByteSource, read_header
from llama_operator.kube import CONFIG_MAPS, DEPLOYMENTS, LLAMA_MODELS, LLAMA_SERVERS, PODS, SECRETS, SERVICES
from llama_operator.reconcile import router_status
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.router_status import ModelStatusPoller, loaded_summary, model_states, ready_pod_ips
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body
from tests.fakekube import Events, FakeKube
from tests.tiny_gguf import write_tiny_llama
from tests.watch_cache import watched_over

SERVED = [("alpha", "alpha"), ("bee", "beta"), ("gamma", "gamma")]


def entry(name: str, value: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "status": {"value": value, **extra}}


def test_states_over_pods() -> None:
    pod_a = [entry("alpha", "loaded"), entry("bee", "loading"), entry("gamma", "unloaded", failed=True, exit_code=1)]
    pod_b = [entry("alpha", "loaded"), entry("bee", "sleeping"), entry("gamma", "unloaded")]
    states = model_states([("p-a", pod_a), ("p-b", pod_b)], SERVED)
    assert [(s.name, s.model, s.state, s.loaded_replicas) for s in states] == [
        ("alpha", "alpha", "Loaded", 2), ("bee", "beta", "Loading", 0), ("gamma", "gamma", "Failed", 0)]
    assert states[2].message == "failed to load on p-a (exit code 1); the next request tries again"
    assert loaded_summary(states) == "1/3"
    # A model on no pod (not in any answer, or no pod answered) is Unloaded.
    assert [s.state for s in model_states([], SERVED)] == ["Unloaded"] * 3
    assert [s.state for s in model_states([("p", [entry("bee", "sleeping")])], SERVED)] == \
        ["Unloaded", "Sleeping", "Unloaded"]


def test_only_ready_pods_are_asked() -> None:
    def pod(name: str, ready: str, ip: str | None = "10.0.0.1", deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name}
        if deleting:
            meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}}

    pods = [pod("a", "True"), pod("b", "False"), pod("c", "True", None), pod("d", "True", deleting=True),
            pod("e", "True", "fd00::5")]
    assert ready_pod_ips(pods) == [("a", "10.0.0.1"), ("e", "fd00::5")]


# ---------------------------------------------------------------------------------------------- the poller


class FakePods:
    """/models of the pods (all behind 127.0.0.1): what they answer, settable per test."""

    def __init__(self) -> None:
        self.data: list[dict[str, Any]] = []
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        self.key: str | None = None
        """The API key the pods want (llama-server --api-key: /models is not public then)."""
        self.authorizations: list[str | None] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.authorizations.append(request.headers.get("Authorization"))
        await asyncio.sleep(self.delay)
        if self.key is not None and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "Invalid API Key", "code": 401}}, status=401)
        return web.json_response({"data": self.data, "object": "list"}, status=self.status)


@pytest.fixture
async def pods() -> AsyncIterator[tuple[FakePods, int]]:
    fake = FakePods()
    app = web.Application()
    app.router.add_get("/models", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, port
    await runner.cleanup()


ROUTER_SPEC = {"models": [{"modelRef": {"name": "alpha"}}, {"modelRef": {"name": "beta"}, "alias": "bee"},
                          {"modelRef": {"name": "gamma"}}], "maxLoaded": 2}


def _router_body(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer",
            "metadata": {"name": "fleet", "namespace": "default", "generation": 1, "uid": "uid-fleet"},
            "spec": spec or ROUTER_SPEC}


def _pod(name: str, *, ready: bool = True) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "llama-server",
                                                  "llamacpp.dev/server": "fleet"}},
            "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": str(ready)}]}}


def _setup(port: int, *, timeout: float = 1.0, spec: dict[str, Any] | None = None,
           ) -> tuple[FakeKube, ModelStatusPoller]:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, _router_body(spec))
    ctx = Context(kube=kube, settings=Settings(), record_event=Events(), watched=watched_over(kube))
    return kube, ModelStatusPoller(ctx, port=port, timeout=timeout)


def _status(kube: FakeKube) -> dict[str, Any]:
    return dict(kube.objects[("llamaservers", "default", "fleet")].get("status") or {})


async def test_the_poller_writes_what_the_pods_say_and_only_when_it_changes(pods: tuple[FakePods, int]) -> None:
    fake, port = pods
    kube, poller = _setup(port)
    kube.put(PODS, _pod("fleet-0"))
    kube.put(PODS, _pod("fleet-1", ready=False))  # not asked
    fake.data = [entry("alpha", "loaded"), entry("bee", "loading"), entry("gamma", "unloaded")]
    try:
        await poller.poll_once()
        status = _status(kube)
        assert status["models"] == [
            {"name": "alpha", "model": "alpha", "state": "Loaded", "loadedReplicas": 1},
            {"name": "bee", "model": "beta", "state": "Loading", "loadedReplicas": 0},
            {"name": "gamma", "model": "gamma", "state": "Unloaded", "loadedReplicas": 0}]
        assert status["modelsLoaded"] == "1/3" and status["modelsChangedTime"]
        assert fake.requests == 1
        assert kube.count("list") == 0  # servers, models and pods come from the watch (tests/watch_cache.py)
        writes = kube.count("patch_status")
        await poller.poll_once()
        assert kube.count("patch_status") == writes  # same answer: no write
        fake.data = [entry("alpha", "unloaded"), entry("bee", "loaded"), entry("gamma", "loaded")]
        await poller.poll_once()
        assert [m["state"] for m in _status(kube)["models"]] == ["Unloaded", "Loaded", "Loaded"]
        assert _status(kube)["modelsLoaded"] == "2/3"
    finally:
        await poller.close()


async def test_pods_that_do_not_answer_keep_the_last_status(pods: tuple[FakePods, int]) -> None:
    fake, port = pods
    kube, poller = _setup(port, timeout=0.3)
    kube.put(PODS, _pod("fleet-0"))
    fake.data = [entry("alpha", "loaded")]
    try:
        await poller.poll_once()
        before = _status(kube)["models"]
        fake.status = 503
        await poller.poll_once()
        assert _status(kube)["models"] == before
        fake.status, fake.delay = 200, 2.0  # slower than the timeout: skipped, and the loop is not held up
        started = time.monotonic()
        other = asyncio.create_task(asyncio.sleep(0.05))
        await poller.poll_once()
        assert other.done() and time.monotonic() - started < 1.5
        assert _status(kube)["models"] == before
    finally:
        await poller.close()


async def test_without_ready_pods_every_model_is_unloaded(pods: tuple[FakePods, int]) -> None:
    _, port = pods
    kube, poller = _setup(port)
    await poller.poll_once()
    assert [m["state"] for m in _status(kube)["models"]] == ["Unloaded"] * 3
    assert _status(kube)["modelsLoaded"] == "0/3"


async def test_a_server_that_left_router_mode_loses_its_model_status(pods: tuple[FakePods, int]) -> None:
    _, port = pods
    kube, poller = _setup(port)
    await poller.poll_once()
    kube.edit("llamaservers", "fleet", lambda s: s.update(spec={"modelRef": {"name": "alpha"}}))
    await poller.poll_once()
    assert "models" not in _status(kube) and "modelsLoaded" not in _status(kube)


async def test_the_poller_shows_each_models_estimate_and_the_budget_used(pods: tuple[FakePods, int],
                                                                        tmp_path: Path) -> None:
    """Memory-budgeted router mode (docs/multi-model.md): estimates from the LlamaModels' headers, the budget
    from resources.limits.memory; a model whose LlamaModel has no header (gamma) has no estimate."""
    fake, port = pods
    kube, poller = _setup(port)
    kube.edit("llamaservers", "fleet", lambda s: s["spec"].update(resources={"limits": {"memory": "256Mi"}}))
    for name in ("alpha", "beta"):
        gguf = model_info(await read_header(FileByteSource(write_tiny_llama(tmp_path / f"{name}.gguf")))).to_wire()
        kube.put(LLAMA_MODELS, model_body(name, status={"phase": "Ready", "gguf": gguf}))
    try:
        await poller.poll_once()
        assert _status(kube)["modelsMemory"] == "0Mi/256Mi"  # no ready pod: nothing loaded, like the states
        kube.put(PODS, _pod("fleet-0"))
        fake.data = [entry("alpha", "loaded"), entry("bee", "loading"), entry("gamma", "loaded")]
        await poller.poll_once()
        status = _status(kube)
        estimates = [m.get("estimate") for m in status["models"]]
        assert estimates[0] and estimates[0].endswith("Mi") and estimates[2] is None
        each = int(estimates[0][:-2])
        assert status["modelsMemory"] == f"{2 * each}Mi/256Mi"  # alpha and bee (loading holds memory too)
        fake.data = [entry("alpha", "loaded"), entry("bee", "unloaded")]
        await poller.poll_once()
        assert _status(kube)["modelsMemory"] == f"{each}Mi/256Mi"  # only the budget used changed: written
    finally:
        await poller.close()


# ---------------------------------------------------------------------------------------------- the reconcile

READY = {"phase": "Ready", "files": [{"name": "m.gguf"}]}


async def test_reconcile_applies_preset_deployment_service_and_leaves_model_status_to_the_poller() -> None:
    kube = FakeKube()
    for name in ("alpha", "beta", "gamma"):
        kube.put(LLAMA_MODELS, model_body(name, status={**READY, "cacheKey": f"{name}-0123456789ab"}))
    kube.put(LLAMA_SERVERS, _router_body())
    ctx = Context(kube=kube, settings=Settings(), record_event=Events(), watched=watched_over(kube))
    # What the poller wrote earlier must survive the reconcile's status patch.
    kube.edit("llamaservers", "fleet", lambda s: s.update(status={
        "models": [{"name": "alpha", "model": "alpha", "state": "Loaded", "loadedReplicas": 1}],
        "modelsLoaded": "1/3"}), spec=False)
    status = await reconcile_server(kube.objects[("llamaservers", "default", "fleet")], ctx)
    assert (CONFIG_MAPS.plural, "default", "fleet-models") in kube.objects
    assert (DEPLOYMENTS.plural, "default", "fleet") in kube.objects
    assert (SERVICES.plural, "default", "fleet") in kube.objects
    assert status.model_name == "alpha, bee, gamma"
    assert status.args is not None and status.args[:2] == ["--models-preset", "/run/llama-server/preset/models.ini"]
    stored = _status(kube)
    assert stored["modelsLoaded"] == "1/3" and stored["models"][0]["state"] == "Loaded"
    conditions = {c["type"]: c["status"] for c in stored["conditions"]}
    assert conditions["ModelResolved"] == "True" and conditions["ArgsValid"] == "True"
    # A second reconcile with nothing changed writes nothing.
    kube.calls.clear()
    await reconcile_server(kube.objects[("llamaservers", "default", "fleet")], ctx)
    assert kube.count("apply") == 0 and kube.count("patch_status") == 0


async def test_a_missing_model_keeps_a_router_server_pending_and_says_which() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("alpha", status={**READY, "cacheKey": "alpha-0123456789ab"}))
    kube.put(LLAMA_MODELS, model_body("beta", status={"phase": "Resolving", "message": "HEAD timed out"}))
    kube.put(LLAMA_SERVERS, _router_body())
    ctx = Context(kube=kube, settings=Settings(), record_event=Events(), watched=watched_over(kube))
    status = await reconcile_server(kube.objects[("llamaservers", "default", "fleet")], ctx)
    assert status.phase == "Pending" and status.message == "LlamaModel default/beta is Resolving: HEAD timed out"
    assert (DEPLOYMENTS.plural, "default", "fleet") not in kube.objects


# ---------------------------------------------------------------------------------------------- hostile pods


async def _serve_huge_models(request: web.Request) -> web.StreamResponse:
    """A pod running a tenant's image that answers /models with 114 MiB (no Content-Length: streamed)."""
    response = web.StreamResponse()
    response.content_type = "application/json"
    await response.prepare(request)
    chunk = b"x" * 2**20
    try:
        await response.write(b'{"data": [], "pad": "')
        for _ in range(114):
            await response.write(chunk)
        await response.write(b'"}')
    except (ConnectionResetError, RuntimeError):
        pass  # the operator hung up after its cap: that is the point
    return response


@pytest.fixture
async def huge_pod() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/models", _serve_huge_models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await runner.cleanup()


async def test_an_oversize_models_answer_is_refused_with_bounded_memory_and_said_in_status(huge_pod: int) -> None:
    kube, poller = _setup(huge_pod, timeout=20.0)
    kube.put(PODS, _pod("fleet-0"))
    tracemalloc.start()
    try:
        await poller.poll_once()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await poller.close()
    assert peak < 16 * 2**20, f"reading one pod's /models took {peak / 2**20:.0f} MiB"
    models = _status(kube)["models"]
    assert [m["state"] for m in models] == ["Unloaded"] * 3  # nothing was read: nothing is claimed loaded
    for model in models:
        message = model["message"]
        assert "fleet-0" in message and "larger than 1 MiB" in message and "\n" not in message, message


async def test_a_models_answer_that_is_not_a_model_list_is_said_in_status(pods: tuple[FakePods, int]) -> None:
    fake, port = pods
    kube, poller = _setup(port)
    kube.put(PODS, _pod("fleet-0"))
    fake.data = "not a list"  # type: ignore[assignment]
    try:
        await poller.poll_once()
    finally:
        await poller.close()
    assert all("fleet-0" in m["message"] and "not a model list" in m["message"] for m in _status(kube)["models"])


async def test_odd_model_entries_neither_break_the_round_nor_reach_status(pods: tuple[FakePods, int]) -> None:
    fake, port = pods
    kube, poller = _setup(port)
    kube.put(PODS, _pod("fleet-0"))
    fake.data = [{"id": "alpha", "status": "loaded"}, {"id": ["bee"], "status": {"value": "loaded"}},
                 {"id": "gamma", "status": {"value": "unloaded", "failed": True, "exit_code": "x" * 100_000}}, 7]
    try:
        await poller.poll_once()
    finally:
        await poller.close()
    models = _status(kube)["models"]
    assert [m["state"] for m in models] == ["Unloaded", "Unloaded", "Failed"]
    assert models[2]["message"] == "failed to load on fleet-0 (exit code None); the next request tries again"


# ------------------------------------------------------------------------------ a server with an API key


KEYED_SPEC = {**ROUTER_SPEC, "apiKeySecretRef": {"name": "fleet-key", "key": "api-key"}}


def _secret(value: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fleet-key", "namespace": "default"},
            "data": {"api-key": base64.b64encode(value.encode()).decode()}}


async def test_a_server_with_an_api_key_is_asked_with_it_and_its_secret_read_once_a_minute(
        pods: tuple[FakePods, int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake, port = pods
    kube, poller = _setup(port, spec=KEYED_SPEC)
    kube.put(PODS, _pod("fleet-0"))
    kube.put(SECRETS, _secret("s3cret-key"))
    fake.key = "s3cret-key"
    fake.data = [entry("alpha", "loaded")]
    clock = [1000.0]
    monkeypatch.setattr(router_status.time, "monotonic", lambda: clock[0])
    caplog.set_level("DEBUG")
    try:
        await poller.poll_once()
        assert [m["state"] for m in _status(kube)["models"]] == ["Loaded", "Unloaded", "Unloaded"]
        assert fake.authorizations == ["Bearer s3cret-key"]
        reads = kube.count("get")
        for _ in range(3):  # a poll every few seconds does not read the Secret each time
            clock[0] += 10
            await poller.poll_once()
        assert kube.count("get") == reads
        # The key is rotated: the pods want the new one at once, the poller reads it within KEY_CACHE_SECONDS.
        kube.put(SECRETS, _secret("rotated"))
        fake.key = "rotated"
        fake.data = [entry("alpha", "loaded"), entry("bee", "loaded")]
        await poller.poll_once()
        assert "HTTP 401: the pod refused the API key" in _status(kube)["models"][0]["message"]
        clock[0] += router_status.KEY_CACHE_SECONDS
        await poller.poll_once()
        assert kube.count("get") == reads + 1
        models = _status(kube)["models"]
        assert [m["state"] for m in models] == ["Loaded", "Loaded", "Unloaded"]
        assert all("message" not in m for m in models)
    finally:
        await poller.close()
    assert "s3cret-key" not in caplog.text and "rotated" not in caplog.text
    assert "s3cret" not in str(_status(kube)) and "rotated" not in str(_status(kube))


async def test_a_missing_secret_or_key_is_one_line_in_status_and_the_states_stay(
        pods: tuple[FakePods, int], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, port = pods
    kube, poller = _setup(port, spec=KEYED_SPEC)
    kube.put(PODS, _pod("fleet-0"))
    fake.key = "k"
    clock = [1000.0]
    monkeypatch.setattr(router_status.time, "monotonic", lambda: clock[0])
    try:
        await poller.poll_once()  # no Secret: the pods are not asked
        assert fake.requests == 0
        models = _status(kube)["models"]
        assert [m["state"] for m in models] == ["Unloaded"] * 3
        assert models[0]["message"] == ("/models not read: the server's API key is not there: Secret "
                                        "default/fleet-key, key 'api-key' (spec.apiKeySecretRef) is missing")
        kube.put(SECRETS, {**_secret("k"), "data": {"other": "eA=="}})  # the Secret, without the key
        clock[0] += router_status.KEY_CACHE_SECONDS
        await poller.poll_once()
        assert fake.requests == 0 and "key 'api-key'" in _status(kube)["models"][0]["message"]
        kube.put(SECRETS, _secret("k\n"))  # a line break: no header can carry it
        clock[0] += router_status.KEY_CACHE_SECONDS
        await poller.poll_once()
        assert "line break" in _status(kube)["models"][0]["message"] and fake.requests == 0
        kube.put(SECRETS, _secret("k"))
        clock[0] += router_status.KEY_CACHE_SECONDS
        fake.data = [entry("alpha", "loaded")]
        await poller.poll_once()
        models = _status(kube)["models"]
        assert [m["state"] for m in models] == ["Loaded", "Unloaded", "Unloaded"]
        assert all("message" not in m for m in models)
    finally:
        await poller.close()


async def test_pods_that_want_a_key_the_spec_does_not_give_are_said_in_status(pods: tuple[FakePods, int]) -> None:
    fake, port = pods
    kube, poller = _setup(port)
    kube.put(PODS, _pod("fleet-0"))
    fake.key = "k"  # started with a key that the spec does not name
    try:
        await poller.poll_once()
    finally:
        await poller.close()
    assert fake.authorizations == [None]
    assert all("pod fleet-0: HTTP 401: the pod wants an API key, and the spec has no apiKeySecretRef" in m["message"]
               for m in _status(kube)["models"])


def test_of_several_keys_the_first_is_sent() -> None:
    """llama-server reads --api-key (LLAMA_API_KEY) as a comma-separated list (common/arg.cpp parse_csv_row)."""
    assert first_key("k1") == "k1"
    assert first_key("k1,k2") == "k1"
    assert first_key(",k2") == "k2"
    assert first_key('"a,b",c') == "a,b"
    assert first_key(",") == ""
