"""The root check (tests/tiers.py): what a test's markers need, and skip locally / fail in CI with the tool named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests import tiers


class Item:
    """Just what the check reads of a pytest item: its markers and its path."""

    def __init__(self, *markers: str, path: Path = Path("tests/unit/test_x.py")) -> None:
        self.markers = set(markers)
        self.path = path.resolve()

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None

    def add_marker(self, name: str) -> None:
        self.markers.add(name)


def test_each_tier_needs_its_tools_once_and_kind_replaces_the_sandbox() -> None:
    assert tiers.needs_of(Item("unit")) == []
    assert tiers.needs_of(Item("helm")) == ["helm"]
    assert tiers.needs_of(Item("integration", "runtime", "root")) == ["llama-server", "control plane", "helm", "root"]
    assert tiers.needs_of(Item("e2e", "runtime")) == ["llama-server", "root", "control plane", "helm"]
    assert tiers.needs_of(Item("e2e", "kind")) == ["helm"]


def test_a_tier_conftest_marks_only_the_tests_under_its_directory() -> None:
    inside, outside = Item(path=Path("tests/chart/test_a.py")), Item(path=Path("tests/unit/test_a.py"))
    tiers.mark_tier([inside, outside], Path("tests/chart").resolve(), "helm")  # type: ignore[list-item]
    assert inside.markers == {"helm"} and outside.markers == set()


@pytest.fixture
def no_helm(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    def set_up(configured: bool) -> None:
        monkeypatch.setitem(tiers.FINDERS, tiers.HELM, lambda: tiers.Missing(tiers.HELM, "not fetched", configured))
    return set_up


def test_a_missing_tool_skips_locally_naming_it(no_helm: Callable[[bool], None], monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    no_helm(False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs helm: not fetched"):
        tiers.check(Item("helm"))  # type: ignore[arg-type]
    tiers.check(Item("unit"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("ci", "configured"), [("1", False), ("true", False), ("", True)])
def test_a_missing_tool_fails_in_ci_or_when_configured(no_helm: Callable[[bool], None],
                                                       monkeypatch: pytest.MonkeyPatch, ci: str, configured: bool
                                                       ) -> None:
    no_helm(configured)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="needs helm: not fetched"):
        tiers.check(Item("helm"))  # type: ignore[arg-type]


def test_a_configured_path_that_is_not_executable_is_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(tmp_path / "nothing-here"))
    tiers.llama_server.cache_clear()
    try:
        found = tiers.llama_server()
    finally:
        tiers.llama_server.cache_clear()
    assert isinstance(found, tiers.Missing) and found.configured and "nothing-here" in found.reason
