"""Memory-budgeted router mode through `llama-operator sandbox` with the chart's gateway: the whole chain.

Three tiny models on the fake hub, one big (a 50,000-word vocabulary) and two small; the operator reads each
header, the poller writes each model's estimate into status.models, the reconcile's Fits says each fits the
memory limit alone, and the gateway (installed by the chart) reads the budget and the estimates from the
LlamaServer. Requests for each model in turn through the gateway keep the router's loaded models (its /models,
through the Service) within the budget after every request, with maxLoaded 3, which alone would let all three
in: the budget is the gateway's doing. The node enforces the limit too (the router and the model processes it
starts share the container's memory cgroup): the router is never OOM-killed along the way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llama_operator.builders.quantity import parse_quantity
from llama_operator.nodes.host import HOST_ADDRESS
from tests.e2e.conftest import wait_for
from tests.e2e.test_sandbox import _create, _status
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.nodes

GATEWAY = "llama-system/llama-operator-gateway"
REPO = "test/tiny-GGUF"
TURN = ["big", "small-a", "small-b", "big", "small-a", "big", "small-b", "small-a"]


def test_the_gateway_keeps_the_loaded_models_within_the_memory_limit(sandbox_factory: Any, tmp_path: Path) -> None:
    hub = FakeHub()
    for seed, (name, vocab) in enumerate((("big", 50000), ("small-a", None), ("small-b", None))):
        hub.add(REPO, f"{name}.gguf", write_tiny_llama(tmp_path / f"{name}.gguf", seed=seed, vocab_size=vocab))
    with hub.running(HOST_ADDRESS):
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url,
                                       "LLAMA_OPERATOR_MODEL_STATUS_SECONDS": "1"}, args=("--gateway",))
        for name in ("big", "small-a", "small-b"):
            _create(sandbox, "llamamodels", name, {"source": {"huggingFace": {"repo": REPO, "file": f"{name}.gguf"}}})
        for name in ("big", "small-a", "small-b"):
            wait_for(lambda name=name: _status(sandbox, "llamamodels", name).get("phase") == "Ready", timeout=60,
                     message=f"LlamaModel {name} Ready")
        # Estimates at contextSize 256 (builders/router_memory.py): 53Mi and twice 18Mi; the budget holds the big
        # one or the two small ones.
        _create(sandbox, "llamaservers", "fleet", {
            "models": [{"modelRef": {"name": n}, "contextSize": 256} for n in ("big", "small-a", "small-b")],
            "maxLoaded": 3, "threads": 1, "resources": {"limits": {"memory": "62Mi"}}})

        def estimates() -> dict[str, int] | None:
            status = _status(sandbox, "llamaservers", "fleet")
            found = {m["name"]: int(parse_quantity(m["estimate"])) for m in status.get("models") or []
                     if m.get("estimate")}
            ready = status.get("phase") == "Ready" and (status.get("modelsMemory") or "").endswith("/62Mi")
            return found if len(found) == 3 and ready else None
        sizes = wait_for(estimates, timeout=180, message="status.models with three estimates")
        budget = 62 * 2**20
        assert sizes["small-a"] == sizes["small-b"] and 2 * sizes["small-a"] <= budget < sizes["big"] + sizes["small-a"]
        status = _status(sandbox, "llamaservers", "fleet")
        fits = {c["type"]: c for c in status["conditions"]}["Fits"]
        assert (fits["status"], fits["reason"]) == ("True", "Fits"), fits

        client = openai.OpenAI(base_url=sandbox.url(GATEWAY) + "/v1", api_key="unused", max_retries=0, timeout=120)
        router = sandbox.url("default/fleet")
        sums = []
        for model in TURN:
            reply = client.chat.completions.create(model=model, max_tokens=2,
                                                   messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].finish_reason in ("length", "stop")
            data = httpx.get(f"{router}/models", timeout=10).json()["data"]
            loaded = {m["id"] for m in data if m["status"]["value"] in ("loaded", "loading")}
            assert model in loaded
            sums.append(sum(sizes[name] for name in loaded) // 2**20)
        print(f"router budget 62Mi through the gateway: loaded estimates after each request (MiB): {sums}")
        assert max(sums) <= 62, sums
        (pod,) = sandbox.core.list_namespaced_pod("default", label_selector="llamacpp.dev/server=fleet").items
        assert [c.restart_count for c in pod.status.container_statuses] == [0], pod.status.container_statuses

        def used() -> dict[str, Any] | None:
            status = _status(sandbox, "llamaservers", "fleet")
            return status if status.get("modelsMemory") == f"{2 * sizes['small-a'] // 2**20}Mi/62Mi" else None
        wait_for(used, timeout=30, message="status.modelsMemory of the two small ones")
