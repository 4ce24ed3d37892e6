"""The real llama-server with the args the operator renders: /slots is off unless the server asks for it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaServerSpec

from .test_metrics_scrape import _start
from .test_metrics_scrape import tiny as tiny  # noqa: F401 - the fixture
from .test_router_preset import _chat, _models_json
from .test_router_preset import router as router  # noqa: F401 - the fixture


@pytest.mark.parametrize(("args", "served"), [([], False), (["--slots"], True)])
def test_slots_only_when_asked(tiny: Path, tmp_path: Path, args: list[str], served: bool) -> None:  # noqa: F811
    spec = LlamaServerSpec.model_validate({"modelRef": {"name": "tiny"}, "contextSize": 256, "args": args})
    with _start(spec, tiny, tmp_path) as server:
        status = httpx.get(f"{server.url}/slots", timeout=10).status_code
    assert (status == 200) == served, status


def test_router_instances_inherit_no_slots(router: tuple[str, str]) -> None:  # noqa: F811
    """The router passes its own arguments to every model instance: /slots?model= is refused there too."""
    url, _ = router
    name = _models_json(url)[0]["id"]
    _chat(url, name)  # loads the instance
    response = httpx.get(f"{url}/slots", params={"model": name}, timeout=10)
    assert response.status_code == 501, response.text
