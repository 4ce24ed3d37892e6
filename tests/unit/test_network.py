"""What a llama-server pod exposes on the network: `--no-slots` unless asked for, and the NetworkPolicy the
operator puts next to each server (docs/security.md#network)."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.builders import build_deployment
from llama_operator.builders.router import router_args
from llama_operator.config import Settings
from llama_operator.flags.render import SLOTS_ENV
from llama_operator.llamacpp.catalog import load_catalog
from tests.conftest import resolved_model, server


def _args(**spec: Any) -> list[str]:
    deployment = build_deployment(server(**spec), resolved_model(), Settings())
    (main,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "llama-server"]
    return list(main["args"])


def test_slots_are_off_by_default() -> None:
    args = _args()
    assert args.count("--no-slots") == 1 and "--slots" not in args


@pytest.mark.parametrize("spec", [{"args": ["--slots"]}, {"args": ["--no-slots"]},
                                  {"env": [{"name": SLOTS_ENV, "value": "1"}]}])
def test_a_server_that_asks_for_slots_gets_its_own_choice_only(spec: dict[str, Any]) -> None:
    args = _args(**spec)
    assert [a for a in args if a in ("--slots", "--no-slots")] == list(spec.get("args", []))


def test_router_mode_has_slots_off_too() -> None:
    router = server(modelRef=None, models=[{"modelRef": {"name": "a"}}])
    assert "--no-slots" in router_args(router)
    assert "--no-slots" not in router_args(server(modelRef=None, models=[{"modelRef": {"name": "a"}}],
                                                  args=["--slots"]))


def test_the_slots_env_name_is_the_catalogs() -> None:
    (option,) = [o for o in load_catalog().options if "--slots" in o.names]
    assert option.env == SLOTS_ENV and list(option.negatives) == ["--no-slots"]
