"""The unit tier (marker `unit`): needs nothing but the virtualenv (no helm, no binary, no network beyond
loopback, no build). Also isolates the process-wide state the reconcile code feeds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from llama_operator import metrics
from tests.tiers import mark_tier

if TYPE_CHECKING:
    from tests.unit.test_gateway_proxy import Harness, Upstream


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, Path(__file__).parent, "unit")


@pytest.fixture(autouse=True)
def _forget_reconciled_phases() -> Iterator[None]:
    """The phase gauges count every object any reconcile saw: one test's objects must not count in another's."""
    yield
    for kind in ("LlamaServer", "LlamaModel"):
        metrics.PHASES.retain(kind, None, [])



@pytest.fixture
async def gw() -> AsyncIterator[Harness]:
    """The gateway's API app in-process (tests/unit/test_gateway_proxy.py's Harness), started and closed."""
    from tests.unit.test_gateway_proxy import Harness

    harness = Harness()
    await harness.start()
    yield harness
    await harness.close()


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Upstream]]:
    """Two stand-in replicas (tests/unit/test_gateway_proxy.py's Upstream), started; released and stopped after."""
    from tests.unit.test_gateway_proxy import Upstream

    made = [Upstream(), Upstream()]
    for upstream in made:
        await upstream.start()
    yield made
    for upstream in made:
        upstream.go.set()
        assert upstream.runner is not None
        await upstream.runner.cleanup()
