"""The real llama-server with the args the operator renders: /slots is off unless the server asks for it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llama_operator.api.v1alpha1 import LlamaServerSpec

from .test_metrics_scrape import _start
from .test_metrics_scrape import tiny as tiny  # noqa: F401 - the fixture


@pytest.mark.parametrize(("args", "served"), [([], False), (["--slots"], True)])
def test_slots_only_when_asked(tiny: Path, tmp_path: Path, args: list[str], served: bool) -> None:  # noqa: F811
    spec = LlamaServerSpec.model_validate({"modelRef": {"name": "tiny"}, "contextSize": 256, "args": args})
    with _start(spec, tiny, tmp_path) as server:
        status = httpx.get(f"{server.url}/slots", timeout=10).status_code
    assert (status == 200) == served, status
