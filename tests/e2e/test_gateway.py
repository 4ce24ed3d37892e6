"""The gateway through the sandbox: installed by the chart (`--gateway`), two models behind its one endpoint with
the official openai client (chat, streaming, /v1/models), a LoRA adapter of one of them served as `alpha:sql`
(fetched by its own init container, loaded by llama-server, applied by the gateway), and a server at minReplicas
0 woken by its first request and put back to zero after idleSeconds. Load scaling 1 -> 3 -> 1, prefix affinity
and a killed replica under load run through the sandbox too, in tests/e2e/test_gateway_load.py; the gateway's
RBAC and its scale decisions against the API server alone in tests/integration/test_gateway.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import pytest

from llama_operator.nodes.host import HOST_ADDRESS
from tests.e2e.conftest import wait_for
from tests.e2e.test_sandbox import _create, _wait_phase
from tests.fakehub import FakeHub
from tests.tiny_lora import write_tiny_lora

pytestmark = pytest.mark.nodes

GATEWAY = "llama-system/llama-operator-gateway"


def test_two_models_and_scale_from_zero_through_the_gateway(sandbox_factory: Any, tiny_gguf: Path,
                                                            tmp_path: Path) -> None:
    hub = FakeHub()
    for repo in ("test/alpha-GGUF", "test/beta-GGUF"):
        hub.add(repo, "tiny-q8_0.gguf", tiny_gguf)
    hub.add("test/alpha-sql-LoRA", "sql-lora.gguf", write_tiny_lora(tmp_path / "sql-lora.gguf"))
    with hub.running(HOST_ADDRESS):
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url}, args=("--gateway",))
        for name in ("alpha", "beta"):
            _create(sandbox, "llamamodels", name, {"source": {"huggingFace": {
                "repo": f"test/{name}-GGUF", "file": "tiny-q8_0.gguf"}}})
        _create(sandbox, "llamamodels", "sql", {"adapterFor": "alpha", "source": {"huggingFace": {
            "repo": "test/alpha-sql-LoRA", "file": "sql-lora.gguf"}}})
        _create(sandbox, "llamaservers", "alpha", {"modelRef": {"name": "alpha"}, "contextSize": 256,
                                                   "adapters": [{"name": "sql"}]})
        _create(sandbox, "llamaservers", "beta", {"modelRef": {"name": "beta"}, "contextSize": 256, "replicas": 0,
                                                  "alias": "beta-chat",
                                                  "scaling": {"minReplicas": 0, "maxReplicas": 1, "idleSeconds": 5,
                                                              "scaleDownDelaySeconds": 0}})
        _wait_phase(sandbox, "llamaservers", "alpha", "Ready")
        client = openai.OpenAI(base_url=sandbox.url(GATEWAY) + "/v1", api_key="unused", max_retries=0, timeout=120)

        listed = wait_for(lambda: {model.id: model for model in client.models.list().data} or None, timeout=30,
                          message="the gateway's model list")
        assert set(listed) == {"alpha", "alpha:sql", "beta-chat"}, listed  # beta: listed while it has no replica
        assert {model.owned_by for model in listed.values()} == {"default"}  # the namespace
        reply = client.chat.completions.create(model="alpha", max_tokens=8,
                                               messages=[{"role": "user", "content": "Say hello"}])
        assert reply.model == "alpha" and reply.choices[0].finish_reason in ("length", "stop")
        chunks = list(client.chat.completions.create(model="alpha", max_tokens=8, stream=True,
                                                     messages=[{"role": "user", "content": "Count"}]))
        assert len(chunks) > 1

        # The adapter: the same server and weights, another answer; the plain name is still the base model.
        greedy: dict[str, Any] = {"prompt": "hello there", "max_tokens": 8, "temperature": 0,
                                  "extra_body": {"ignore_eos": True}}
        base = [client.completions.create(model="alpha", **greedy).choices[0].text for _ in range(2)]
        adapted = client.completions.create(model="alpha:sql", **greedy).choices[0].text
        assert base[0] == base[1] and adapted != base[0], (base, adapted)
        assert client.completions.create(model="alpha", **greedy).choices[0].text == base[0]

        # beta has no replica: the gateway holds the request, scales the server up and answers once it is Ready.
        started = time.monotonic()
        reply = client.chat.completions.create(model="default/beta", max_tokens=8,  # namespace/name, an alias
                                               messages=[{"role": "user", "content": "Wake up"}])
        cold_start = time.monotonic() - started
        print(f"beta from zero replicas to its first answer through the gateway: {cold_start:.1f}s")
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert reply.model == "beta-chat"  # llama-server answers with its --alias: beta's fleet served it
        beta = _beta(sandbox)
        assert beta["spec"]["replicas"] == 1
        assert beta["status"]["autoscaling"]["desiredReplicas"] == 1 and beta["status"]["autoscaling"]["lastScaleTime"]

        # ... and after idleSeconds without a request it goes back to zero.
        wait_for(lambda: _beta(sandbox)["spec"]["replicas"] == 0, timeout=90, message="beta back to zero replicas")
        status = wait_for(lambda: (s := _beta(sandbox).get("status") or {}).get("replicas") == 0 and s, timeout=60,
                          message="beta's status after the scale-down")
        assert status["phase"] == "Ready" and status["message"] == "scaled to zero replicas", status
        assert status["autoscaling"]["reason"] in ("Idle", "ScaledToZero") and status["autoscaling"][
            "desiredReplicas"] == 0, "the operator's status writes keep the gateway's view"
        with pytest.raises(openai.NotFoundError) as unknown:
            client.chat.completions.create(model="gamma", max_tokens=8, messages=[{"role": "user", "content": "x"}])
        error = unknown.value.body
        assert isinstance(error, dict) and error["code"] == "model_not_found", error
        assert "'gamma'" in error["message"] and "alpha, alpha:sql, beta-chat" in error["message"], error


def _beta(sandbox: Any) -> dict[str, Any]:
    return sandbox.custom.get_namespaced_custom_object("llamacpp.dev", "v1beta1", "default", "llamaservers", "beta")
