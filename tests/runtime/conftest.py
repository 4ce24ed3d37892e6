"""The runtime tier (marker `runtime`): the real pinned llama-server binary, started by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiers import mark_tier


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, Path(__file__).parent, "runtime")
