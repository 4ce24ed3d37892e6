"""Unit-test isolation for process-wide state the reconcile code feeds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llama_operator import metrics


@pytest.fixture(autouse=True)
def _forget_reconciled_phases() -> Iterator[None]:
    """The phase gauges count every object any reconcile saw: one test's objects must not count in another's."""
    yield
    for kind in ("LlamaServer", "LlamaModel"):
        metrics.PHASES.retain(kind, None, [])
