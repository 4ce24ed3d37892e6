"""Memory-budgeted router mode: the real gateway in front of the real llama-server router (docs/multi-model.md).

Three tiny models made here, one big (a 50,000-word vocabulary) and two small; each one's estimate is the
operator's (builders/router_memory.py from the LlamaModel's header), shown in status.models as the poller writes
it; the budget (resources.limits.memory) holds the big one or the two small ones, never all three nor the big
one with a small one. Requests for each in turn through the gateway never leave the sum of the loaded models'
estimates over the budget (read from the router's GET /models after every request); the same requests straight
to a router with count-based eviction (--models-max 2, what holds the two small ones) do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaModel, LlamaServer
from llama_operator.builders.router_memory import quantity, served_estimates
from llama_operator.fit import model_info
from llama_operator.gateway.app import GatewayConfig
from llama_operator.gateway.room import resident_states
from llama_operator.gguf import FileByteSource, read_header

from ..conftest import model_body
from ..gateway_thread import gateway_in_thread
from ..llama_bin import free_port, serving
from ..tiny_gguf import write_tiny_llama

TURN = ["big", "small-a", "small-b", "big", "small-a", "big", "small-b", "small-a"]
MiB = 2**20


@dataclass
class Shelf:
    root: Path
    estimates: dict[str, int]
    """Served name -> bytes, as status.models shows them (whole MiB)."""
    budget_mib: int

    def server(self) -> dict[str, Any]:
        """The router-mode LlamaServer as the gateway reads it: spec and the poller's status.models."""
        return {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer",
                "metadata": {"namespace": "static", "name": "fleet"},
                "spec": {"models": [{"modelRef": {"name": n}, "contextSize": 256} for n in self.estimates],
                         "maxLoaded": 3, "resources": {"limits": {"memory": f"{self.budget_mib}Mi"}}},
                "status": {"models": [{"name": n, "model": n, "state": "Unloaded", "estimate": quantity(size)}
                                      for n, size in self.estimates.items()]}}


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> Shelf:
    root = tmp_path_factory.mktemp("budget")
    models = {}
    for seed, (name, vocab) in enumerate((("big", 50000), ("small-a", None), ("small-b", None))):
        path = write_tiny_llama(root / f"{name}.gguf", seed=seed, vocab_size=vocab)
        gguf = model_info(asyncio.run(read_header(FileByteSource(path)))).to_wire()
        models[name] = LlamaModel.model_validate(model_body(name, status={"phase": "Ready", "gguf": gguf}))
    (root / "models.ini").write_text("".join(f"[{n}]\nmodel = {root / n}.gguf\nctx-size = 256\n" for n in models))
    server = LlamaServer.model_validate({"metadata": {"name": "fleet", "namespace": "default"}, "spec": {
        "models": [{"modelRef": {"name": n}, "contextSize": 256} for n in models]}})
    estimates = {name: -(-size // MiB) * MiB for name, size in served_estimates(server, models).items()}
    big, small = estimates["big"] // MiB, estimates["small-a"] // MiB
    return Shelf(root, estimates, big + small // 2)  # the big one, or the two small ones


@contextmanager
def _router(root: Path, models_max: int) -> Iterator[str]:
    port = free_port()
    args = ["--models-preset", str(root / "models.ini"), "--host", "127.0.0.1", "--port", str(port),
            "--threads", "1", "--models-max", str(models_max)]
    with serving(args, port, workdir=root, env={"HOME": str(root)}, timeout=30) as (url, _):
        yield url


def _gateway(router: str, server: dict[str, Any]) -> Any:
    """The gateway routing `server` (router mode) to the router: its static route replaced by the server."""
    return gateway_in_thread(GatewayConfig(listen="127.0.0.1:0", admin="127.0.0.1:0", autoscale=False,
                                           static={"fleet": [router]}), servers=[server])


def _loaded(router: str) -> set[str]:
    return set(resident_states(httpx.get(f"{router}/models", timeout=5).content))


def _turn(base: str, router: str, estimates: dict[str, int]) -> list[int]:
    """Chat with each model of TURN in order through `base`; the router's loaded estimates (MiB) after each."""
    sums = []
    for model in TURN:
        answer = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        sums.append(sum(estimates[name] for name in _loaded(router)) // MiB)
    return sums


def test_the_budget_holds_where_count_based_eviction_would_not(shelf: Shelf) -> None:
    big, small = shelf.estimates["big"] // MiB, shelf.estimates["small-a"] // MiB
    assert shelf.estimates["small-b"] // MiB == small and 2 * small <= shelf.budget_mib < big + small
    with _router(shelf.root, models_max=2) as router:
        counted = _turn(router, router, shelf.estimates)
    assert max(counted) > shelf.budget_mib, counted  # count-based: the big one beside a small one
    with _router(shelf.root, models_max=3) as router, _gateway(router, shelf.server()) as gateway:
        budgeted = _turn(gateway, router, shelf.estimates)
        assert max(budgeted) <= shelf.budget_mib, budgeted
        assert _loaded(router) == {"small-a", "small-b"}  # the last two requests: the small ones fit together


def test_a_model_larger_than_the_budget_is_refused_with_the_numbers(shelf: Shelf) -> None:
    server = shelf.server()
    server["spec"]["resources"]["limits"]["memory"] = f"{shelf.estimates['big'] // MiB - 1}Mi"
    with _router(shelf.root, models_max=3) as router, _gateway(router, server) as gateway:
        answer = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
            "model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "model_does_not_fit"
        assert error["message"].startswith(f"LlamaServer static/fleet: model big needs an estimated "
                                           f"{shelf.estimates['big'] // MiB}.0 MiB, more than the server's memory "
                                           f"budget of {shelf.estimates['big'] // MiB - 1}.0 MiB"), error
        assert _loaded(router) == set()
        small = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
            "model": "small-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert small.status_code == 200, small.text
