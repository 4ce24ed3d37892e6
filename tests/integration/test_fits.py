"""The memory fit end to end: a real kube-apiserver, the operator with the chart's RBAC (which must let it list
Nodes), a model resolved from a (fake) hub so its status carries the GGUF memory shape, and the Fits condition,
the status.memory estimate, the Memory printer column, the Warning Event and the default memory request."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import model_body, server_body
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1beta1"
REPO_ID, FILE = "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf"


@pytest.fixture
def hub(tmp_path: pathlib.Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(REPO_ID, FILE, write_tiny_llama(tmp_path / "tiny.gguf"))
    with fake.running():
        yield fake


@pytest.fixture(autouse=True)
def operator_env(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", hub.url)


def _fits(apiserver: Any, name: str, reason: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        status = (apiserver.read(CRD, "llamaservers", apiserver.namespace, name) or {}).get("status") or {}
        cond = {c["type"]: c for c in status.get("conditions") or []}.get("Fits")
        return status if cond is not None and cond["reason"] == reason else None

    return apiserver.wait_for(found, timeout=20, message=f"LlamaServer {name}: Fits {reason}")  # type: ignore[no-any-return]


def _condition(status: dict[str, Any]) -> dict[str, Any]:
    return {c["type"]: c for c in status["conditions"]}["Fits"]


def _events(apiserver: Any, name: str) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e.get("message", "")) for e in apiserver.list("v1", "events", apiserver.namespace)
            if e["involvedObject"].get("name") == name and e["involvedObject"].get("kind") == "LlamaServer"]


def test_memory_limit_below_the_estimate(apiserver: Any, run_operator: Any, kubectl_admin: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(
            contextSize=4096, resources={"limits": {"cpu": "1", "memory": "8Mi"}}))
        status = _fits(apiserver, "chat", "MemoryLimitTooLow")
        cond = _condition(status)
        assert cond["status"] == "False" and cond["observedGeneration"] == 1
        host = status["memory"]["host"]
        assert host.endswith("Mi") and int(host[:-2]) > 8
        assert "resources.limits.memory 8.0 MiB" in cond["message"]
        assert f"raise the limit to at least {host}" in cond["message"]
        assert status["memory"]["contextSize"] == 4096 and status["memory"]["slots"] == 4
        apiserver.wait_for(lambda: ("Warning", "MemoryLimitTooLow", cond["message"]) in _events(apiserver, "chat"),
                           timeout=20, message="Warning Event MemoryLimitTooLow")
        # the printer column, as kubectl shows it
        wide = kubectl_admin("get", "lserver", "chat", "-o", "wide", check=True)
        assert "MEMORY" in wide.stdout and host in wide.stdout

        # a limit that holds it: Fits, no default request because the user set a limit
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat",
                        {"spec": {"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}})
        status = _fits(apiserver, "chat", "Fits")
        assert "within resources.limits.memory 1.00 GiB" in _condition(status)["message"]
        dep = apiserver.read("apps/v1", "deployments", apiserver.namespace, "chat")
        assert dep["spec"]["template"]["spec"]["containers"][0]["resources"] == {
            "limits": {"cpu": "1", "memory": "1Gi"}}


def test_default_request_and_trained_context(apiserver: Any, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(contextSize=8192))  # the tiny model is trained on 4096
        status = _fits(apiserver, "chat", "ContextExceedsTraining")
        cond = _condition(status)
        assert cond["status"] == "True"
        assert "each slot gets 8192 tokens but the model was trained on 4096" in cond["message"]
        dep = apiserver.wait_for(lambda: apiserver.read("apps/v1", "deployments", apiserver.namespace, "chat"),
                                 message="Deployment")
        requests = dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        # the estimate plus the default 10 % headroom, in whole MiB
        host_mib = int(status["memory"]["host"][:-2])
        assert host_mib <= int(requests["memory"][:-2]) <= host_mib * 1.1 + 1
        apiserver.wait_for(lambda: any(r == "ContextExceedsTraining" for _, r, _ in _events(apiserver, "chat")),
                           timeout=20, message="Warning Event ContextExceedsTraining")


def test_gpu_memory_from_node_labels(apiserver: Any, run_operator: Any) -> None:
    node = f"gpu-{apiserver.namespace}"[:63]
    apiserver.create("v1", "nodes", None, {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": node, "labels": {"nvidia.com/gpu.memory": "4", "pool": apiserver.namespace}}})
    try:
        with run_operator("llama_operator.handlers"):
            apiserver.create_llama("llamamodels", model_body())
            apiserver.create_llama("llamaservers", server_body(
                contextSize=4096, gpu={"vendor": "nvidia", "count": 1}, nodeSelector={"pool": apiserver.namespace}))
            status = _fits(apiserver, "chat", "GpuMemoryTooSmall")
            cond = _condition(status)
            assert cond["status"] == "False"
            assert "the 1 candidate node(s) (nvidia.com/gpu.memory=4 MiB)" in cond["message"]
            assert status["memory"]["gpu"].endswith("Mi")

            apiserver.patch("v1", "nodes", None, node, {"metadata": {"labels": {"nvidia.com/gpu.memory": "81920"}}})
            # Nodes are not watched: the next reconcile (here, a spec change) reads them again.
            apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"contextSize": 2048}})
            status = _fits(apiserver, "chat", "Fits")
            assert "fits the GPUs of 1 of 1 candidate node(s)" in _condition(status)["message"]
    finally:
        apiserver.delete("v1", "nodes", None, node)
