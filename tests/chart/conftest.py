"""The chart tier (marker `helm`): the Helm chart rendered and linted with the real helm binary, no cluster.

What needs no helm (the values schema, the dashboard, the Dockerfile, the PSS checker) is in the unit tier.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiers import mark_tier


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_tier(items, Path(__file__).parent, "helm")
