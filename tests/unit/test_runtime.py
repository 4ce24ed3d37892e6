"""reconcile.runtime.Runtime: the resync and the retry policy survive and schedule whatever one object does;
the resync runs objects concurrently (bounded), each reconcile under a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from llama_operator.config import Settings
from llama_operator.errors import InvalidSpec, RetryPolicy
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS, Forbidden, Invalid, Unavailable
from llama_operator.reconcile import runtime as runtime_module
from llama_operator.reconcile.context import Context
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube
from tests.watch_cache import watched_over


def _context(kube: FakeKube) -> Context:
    return Context(kube=kube, settings=Settings(), record_event=Events(), watched=watched_over(kube))  # type: ignore[arg-type]


def _runtime(kube: FakeKube) -> runtime_module.Runtime:
    return runtime_module.Runtime(_context(kube))


async def _until(predicate: Any) -> None:
    async with asyncio.timeout(2.0):
        while not predicate():  # noqa: ASYNC110 - polling what another task changes is the point
            await asyncio.sleep(0.005)


async def test_resync_survives_any_exception_of_a_single_object(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    for name in ("a", "b"):
        kube.put(LLAMA_SERVERS, server_body(name))
    ran: list[str] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        ran.append(body["metadata"]["name"])
        if body["metadata"]["name"] == "a":
            raise ValueError("a bug in a builder")

    monkeypatch.setattr(runtime_module, "reconcile_server", reconcile)
    runtime = _runtime(kube)
    task = asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, 0.01))
    try:
        await _until(lambda: ran.count("b") >= 3)
        assert not task.done()
        assert ran.count("a") >= 2  # the failing object is tried again on every round, not dropped
    finally:
        task.cancel()
        runtime.close()


async def test_resync_takes_its_objects_from_the_watch_and_never_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, server_body("a"))
    kube.fail("list", None, lambda: AssertionError("the resync listed"))  # any LIST would fail the round
    ran: list[str] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        ran.append(body["metadata"]["name"])

    monkeypatch.setattr(runtime_module, "reconcile_server", reconcile)
    runtime = _runtime(kube)
    task = asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, 0.01))
    try:
        await _until(lambda: ran.count("a") >= 2)
        kube.put(LLAMA_SERVERS, server_body("b"))  # a watch event: the next round has it
        await _until(lambda: "b" in ran)
        del kube.objects[("llamaservers", "default", "a")]  # gone from the watch: no longer reconciled
        await asyncio.sleep(0.05)
        seen = len(ran)
        await _until(lambda: ran.count("b") >= 3)
        assert "a" not in ran[seen:] and not task.done()
        assert kube.count("list") == 0
    finally:
        task.cancel()
        runtime.close()


async def test_resync_survives_an_index_that_fails_to_read(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, server_body("a"))
    runtime = _runtime(kube)
    reads = [0]
    real_keys = runtime.ctx.watched.keys

    def keys(kind_plural: str) -> list[tuple[str, str]]:
        reads[0] += 1
        if reads[0] <= 2:
            raise RuntimeError("an index changed size during iteration")
        return real_keys(kind_plural)

    monkeypatch.setattr(runtime.ctx.watched, "keys", keys)
    ran: list[str] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        ran.append(body["metadata"]["name"])

    monkeypatch.setattr(runtime_module, "reconcile_server", reconcile)
    task = asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, 0.01))
    try:
        await _until(lambda: "a" in ran)  # the rounds after the failing reads reconcile as before
        assert reads[0] >= 3 and not task.done()
    finally:
        task.cancel()
        runtime.close()


FAST = RetryPolicy(base=0.02, cap=0.08, forbidden=0.05)


async def test_transient_failures_are_retried_with_backoff_until_they_succeed(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, server_body("a"))
    failures = [Unavailable("GET deployments: 503", status=503)] * 3
    ran: list[float] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        ran.append(asyncio.get_running_loop().time())
        if failures:
            raise failures.pop()

    monkeypatch.setattr(runtime_module, "reconcile_server", reconcile)
    runtime = runtime_module.Runtime(_context(kube),
                               policy=FAST)
    try:
        verdict = await runtime.reconcile_server("default", "a")
        assert not verdict.ok and verdict.reason == "Unavailable" and verdict.retry_in is not None
        await _until(lambda: len(ran) == 4)  # three failures, then the success: no event needed
        gaps = [b - a for a, b in zip(ran, ran[1:], strict=False)]
        assert gaps[0] >= 0.01 and gaps[2] >= 0.04  # 0.01-0.02, 0.02-0.04, 0.04-0.08: it grows
        await asyncio.sleep(0.2)
        assert len(ran) == 4 and runtime._retries == {} and runtime._attempts == {}  # success ends the retries
    finally:
        runtime.close()


@pytest.mark.parametrize(("error", "retried"), [
    (lambda: InvalidSpec("spec.x: bad"), False),
    (lambda: Invalid("PATCH deployments: invalid", status=422), False),
    (lambda: Forbidden("PATCH deployments: forbidden", status=403, permission="patch deployments.apps"), True),
    (lambda: RuntimeError("a bug"), True),
])
async def test_retry_by_error_class(monkeypatch: pytest.MonkeyPatch, error: Any, retried: bool) -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, server_body("a"))
    ran: list[str] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        ran.append("run")
        raise error()

    monkeypatch.setattr(runtime_module, "reconcile_server", reconcile)
    runtime = runtime_module.Runtime(_context(kube),
                               policy=FAST)
    try:
        await runtime.reconcile_server("default", "a")
        await asyncio.sleep(0.15)
        assert (len(ran) > 1) == retried
        status = kube.objects[("llamaservers", "default", "a")]["status"]
        assert status["phase"] == ("Pending" if retried else "Failed")
        assert ("not retried until the spec changes" in status["message"]) == (not retried)
    finally:
        runtime.close()


async def test_an_unreadable_object_is_retried_without_a_status(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, server_body("a"))
    kube.fail("get", "a", lambda: Unavailable("GET: connection refused"))
    runtime = _runtime(kube)
    runtime.policy = FAST
    try:
        verdict = await runtime.reconcile_server("default", "a")
        assert not verdict.ok and verdict.retry_in is not None
        await _until(lambda: kube.count("get") >= 3)
        kube.fail_on.clear()
        await _until(lambda: "status" in kube.objects[("llamaservers", "default", "a")])
    finally:
        runtime.close()


async def test_one_model_that_never_answers_delays_no_other(monkeypatch: pytest.MonkeyPatch) -> None:
    # A source that never answers (a drip-feeding host) must not stall the periodic re-resolution of the others.
    kube = FakeKube()
    for name in ("a-slow", "b", "c"):  # the slow one is listed first
        kube.put(LLAMA_MODELS, model_body(name))
    ran: list[str] = []
    never = asyncio.Event()

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        if body["metadata"]["name"] == "a-slow":
            await never.wait()
        ran.append(body["metadata"]["name"])

    monkeypatch.setattr(runtime_module, "reconcile_model", reconcile)
    runtime = _runtime(kube)
    task = asyncio.create_task(runtime.resync_forever(LLAMA_MODELS, 0.01))
    try:
        await _until(lambda: ran.count("b") >= 1 and ran.count("c") >= 1)
        assert "a-slow" not in ran and not task.done()
    finally:
        task.cancel()
        runtime.close()


async def test_a_reconcile_past_its_deadline_is_cut_reported_and_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("slow"))
    started: list[float] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        started.append(asyncio.get_running_loop().time())
        await asyncio.Event().wait()

    monkeypatch.setattr(runtime_module, "reconcile_model", reconcile)
    runtime = runtime_module.Runtime(_context(kube),
                                     policy=FAST, deadline=0.05)
    try:
        verdict = await runtime.reconcile_model("default", "slow")
        assert not verdict.ok and verdict.reason == "DeadlineExceeded" and verdict.retry_in is not None
        assert "took longer than 0.05s" in verdict.message
        status = kube.objects[("llamamodels", "default", "slow")]["status"]
        assert "took longer than" in status["message"] and "\n" not in status["message"]
        await _until(lambda: len(started) >= 2)  # retried with backoff, like any transient failure
    finally:
        runtime.close()


async def test_resync_runs_at_most_its_bound_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    for index in range(12):
        kube.put(LLAMA_SERVERS, server_body(f"s{index}"))
    running: list[int] = [0, 0]  # now, most at once
    done: list[str] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        running[0] += 1
        running[1] = max(running[1], running[0])
        await asyncio.sleep(0.02)
        running[0] -= 1
        done.append(body["metadata"]["name"])

    monkeypatch.setattr(runtime_module, "reconcile_server", reconcile)
    runtime = runtime_module.Runtime(_context(kube),
                                     resync_concurrency=4)
    task = asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, 0.01))
    try:
        await _until(lambda: len(done) >= 12)
        assert running[1] == 4
    finally:
        task.cancel()
        runtime.close()


async def test_server_reconciles_from_any_trigger_run_at_most_their_bound_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of events (an operator start over thousands of servers) holds a bounded number of reconciles."""
    kube = FakeKube()
    for index in range(10):
        kube.put(LLAMA_SERVERS, server_body(f"s{index}"))
    running: list[int] = [0, 0]  # now, most at once

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        running[0] += 1
        running[1] = max(running[1], running[0])
        await asyncio.sleep(0.02)
        running[0] -= 1

    monkeypatch.setattr(runtime_module, "reconcile_server", reconcile)
    runtime = runtime_module.Runtime(_context(kube), server_concurrency=3)
    try:
        verdicts = await asyncio.gather(*(runtime.reconcile_server("default", f"s{i}") for i in range(10)))
        assert all(v.ok for v in verdicts) and running[1] == 3
    finally:
        runtime.close()
