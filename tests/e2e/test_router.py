"""Several models behind one llama-server (router mode) through `llama-operator sandbox`: the operator installed by
helm renders the preset ConfigMap and the Deployment, the real fetcher downloads each model once, the real
llama-server router loads them on demand; three models with maxLoaded 2, a request to each in turn through the
Service with the OpenAI client: the third loads, the least recently used one is stopped, status.models (read by
the operator from the pod over HTTP) says so, and the pod never restarts. A bad per-model setting is refused at
apply with the model named.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from llama_operator.nodes.host import HOST_ADDRESS
from tests.e2e.conftest import SandboxProcess, custom_object, wait_for
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.nodes

GROUP, VERSION, NS = "llamacpp.dev", "v1beta1", "default"
REPO = "test/tiny-GGUF"
NAMES = ("alpha", "beta", "gamma")


def _status(sandbox: SandboxProcess, name: str) -> dict[str, Any]:
    return sandbox.custom.get_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", name).get("status") or {}


def _states(sandbox: SandboxProcess) -> dict[str, str]:
    return {m["name"]: m["state"] for m in _status(sandbox, "fleet").get("models") or []}


def _wait_states(sandbox: SandboxProcess, want: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = _status(sandbox, "fleet")
        states = {m["name"]: m["state"] for m in status.get("models") or []}
        return status if all(states.get(k) == v for k, v in want.items()) else None
    try:
        return wait_for(reached, timeout=timeout, message=f"status.models {want}")
    except TimeoutError:
        raise AssertionError(f"status.models: {_states(sandbox)}\n{sandbox.log()}") from None


def _chat(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert reply.model == model and reply.choices[0].finish_reason in ("length", "stop")


def test_three_models_two_loaded(sandbox_factory: Any, tmp_path: Path) -> None:
    hub = FakeHub()
    served = {name: hub.add(REPO, f"{name}.gguf", write_tiny_llama(tmp_path / f"{name}.gguf", seed=seed))
              for seed, name in enumerate(NAMES)}
    with hub.running(HOST_ADDRESS):
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url,
                                       "LLAMA_OPERATOR_MODEL_STATUS_SECONDS": "1"})
        for name in NAMES:
            sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", custom_object(
                "llamamodels", name, {"source": {"huggingFace": {"repo": REPO, "file": f"{name}.gguf"}}}))
        # A bad per-model setting: refused by the API server at apply, naming the model.
        bad = custom_object("llamaservers", "bad", {"models": [
            {"modelRef": {"name": "alpha"}}, {"modelRef": {"name": "beta"}, "cacheTypeV": "q4_0"}]})
        proc = subprocess.run([sandbox.kubectl_bin, "--kubeconfig", str(sandbox.kubeconfig), "apply", "-f", "-"],
                              input=yaml.safe_dump(bad), capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert ("spec.models[1].cacheTypeV: Invalid value: model beta: a quantized V cache (q4_0) needs flash "
                "attention: set flashAttention: on") in proc.stderr

        for name in NAMES:  # resolved (the operator reads each GGUF header) before the server's pods download
            wait_for(lambda name=name: (sandbox.custom.get_namespaced_custom_object(
                GROUP, VERSION, NS, "llamamodels", name).get("status") or {}).get("phase") == "Ready",
                timeout=60, message=f"LlamaModel {name} Ready")
        resolved = {name: hub.bytes_served.get(s.name, 0) for name, s in served.items()}
        started = time.monotonic()
        sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", custom_object(
            "llamaservers", "fleet", {
                "models": [{"modelRef": {"name": "alpha"}, "contextSize": 256, "loadOnStartup": True},
                           {"modelRef": {"name": "beta"}, "alias": "bee", "contextSize": 512},
                           {"modelRef": {"name": "gamma"}, "contextSize": 256}],
                "maxLoaded": 2, "threads": 1}))
        _wait_states(sandbox, {"alpha": "Loaded", "bee": "Unloaded", "gamma": "Unloaded"}, timeout=180)
        # The poller sees the pod ready (its watch) a moment before the Deployment's readyReplicas, which the
        # phase is computed from, counts it.
        status = wait_for(lambda: (s := _status(sandbox, "fleet")).get("phase") == "Ready" and s, timeout=30,
                          message="phase Ready")
        assert status["modelsLoaded"] == "1/3"
        print(f"router, 3 models: apply -> first model Loaded in status {time.monotonic() - started:.1f}s")
        # One verified download per model.
        for name, s in served.items():
            assert hub.bytes_served[s.name] - resolved[name] == s.size, name

        (pod,) = sandbox.core.list_namespaced_pod(NS, label_selector="llamacpp.dev/server=fleet").items
        client = openai.OpenAI(base_url=f"{sandbox.url('default/fleet')}/v1", api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["alpha", "bee", "gamma"]
        _chat(client, "alpha")
        _chat(client, "bee")
        _wait_states(sandbox, {"alpha": "Loaded", "bee": "Loaded", "gamma": "Unloaded"})
        started = time.monotonic()
        _chat(client, "gamma")  # the third: loads, and the least recently used (alpha) is stopped
        print(f"router: a request for an unloaded third model answered in {time.monotonic() - started:.2f}s")
        status = _wait_states(sandbox, {"alpha": "Unloaded", "bee": "Loaded", "gamma": "Loaded"})
        assert status["modelsLoaded"] == "2/3"
        table = sandbox.kubectl("get", "lserver", "fleet").stdout
        assert "LOADED" in table and "2/3" in table
        _chat(client, "alpha")  # and back: bee is now the least recently used
        _wait_states(sandbox, {"alpha": "Loaded", "bee": "Unloaded", "gamma": "Loaded"})

        (after,) = sandbox.core.list_namespaced_pod(NS, label_selector="llamacpp.dev/server=fleet").items
        assert after.metadata.uid == pod.metadata.uid
        assert all(c.restart_count == 0 for c in after.status.container_statuses)
