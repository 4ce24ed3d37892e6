"""The unit tier (marker `unit`): needs nothing but the virtualenv (no helm, no binary, no network beyond
loopback, no build). Also isolates the process-wide state the reconcile code feeds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_operator import metrics
from tests.tiers import mark_tier


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, Path(__file__).parent, "unit")


@pytest.fixture(autouse=True)
def _forget_reconciled_phases() -> Iterator[None]:
    """The phase gauges count every object any reconcile saw: one test's objects must not count in another's."""
    yield
    for kind in ("LlamaServer", "LlamaModel"):
        metrics.PHASES.retain(kind, None, [])
