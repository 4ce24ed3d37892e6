"""handlers.Runtime: the resync and the retry policy survive and schedule whatever one object does."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from llama_operator import handlers
from llama_operator.config import Settings
from llama_operator.kube import LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from tests.conftest import server_body
from tests.fakekube import Events, FakeKube


def _runtime(kube: FakeKube) -> handlers.Runtime:
    return handlers.Runtime(Context(kube=kube, settings=Settings(), record_event=Events()))  # type: ignore[arg-type]


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

    monkeypatch.setattr(handlers, "reconcile_server", reconcile)
    runtime = _runtime(kube)
    task = asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, 0.01))
    try:
        await _until(lambda: ran.count("b") >= 3)
        assert not task.done()
        assert ran.count("a") >= 2  # the failing object is tried again on every round, not dropped
    finally:
        task.cancel()
        runtime.close()


async def test_resync_survives_a_failing_list(monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, server_body("a"))
    kube.fail("list", None, lambda: ValueError("the API answered something that is not JSON"))
    ran: list[str] = []

    async def reconcile(body: Mapping[str, Any], ctx: Context) -> None:
        ran.append(body["metadata"]["name"])

    monkeypatch.setattr(handlers, "reconcile_server", reconcile)
    runtime = _runtime(kube)
    task = asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, 0.01))
    try:
        await _until(lambda: kube.count("list") >= 3)
        assert not task.done()
        kube.fail_on.clear()
        await _until(lambda: ran == ["a"] or len(ran) > 1)
    finally:
        task.cancel()
        runtime.close()
