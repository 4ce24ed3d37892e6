"""Issue 11 against the real control plane, with the chart's RBAC: failure paths end in status, trust on first
use is recorded through the real API (ConfigMap permissions included) without touching the pod template."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from llama_operator import contract
from tests.conftest import model_body, server_body
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1beta1"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def hub(tiny_gguf: pathlib.Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add_plain("tiny.gguf", tiny_gguf)  # a plain URL: no sha256 published anywhere
    with fake.running():
        yield fake


@pytest.fixture(autouse=True)
def operator_env(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", hub.url)


def _status(apiserver: Any, plural: str, name: str) -> dict[str, Any]:
    return (apiserver.read(CRD, plural, apiserver.namespace, name) or {}).get("status") or {}


def test_trust_on_first_use_is_recorded_without_rolling_the_pods(apiserver: Any, run_operator: Any,
                                                                 hub: FakeHub) -> None:
    served = hub.plain["tiny.gguf"]
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels",
                               model_body(spec={"source": {"http": {"url": f"{hub.url}/plain/tiny.gguf"}}}))
        apiserver.create_llama("llamaservers", server_body())
        model = apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "qwen").get("phase") == "Ready"
                                   and _status(apiserver, "llamamodels", "qwen"), message="model Ready")
        assert "sha256" not in model  # nothing published: trust on first use applies
        dep = apiserver.wait_for(lambda: apiserver.read("apps/v1", "deployments", apiserver.namespace, "chat"),
                                 message="Deployment")
        fetcher = dep["spec"]["template"]["spec"]["initContainers"][0]
        assert "--trust-on-first-use" in fetcher["args"]

        pod = apiserver.wait_for(lambda: next(iter(apiserver.list(
            "v1", "pods", apiserver.namespace, label_selector="llamacpp.dev/server=chat")), None),
            message="a pod from the ReplicaSet controller")
        report = contract.verified_message(model["cacheKey"], {"tiny.gguf": served.sha256})
        apiserver.patch("v1", "pods", apiserver.namespace, pod["metadata"]["name"], {"status": {
            "initContainerStatuses": [{"name": "fetch-model", "ready": True, "restartCount": 0, "image": "x",
                                       "imageID": "", "state": {"terminated": {"exitCode": 0, "message": report}}}],
        }}, subresource="status")

        record = apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "qwen").get("trustOnFirstUse"),
                                    message="status.trustOnFirstUse")
        assert record["files"] == [{"name": "tiny.gguf", "sha256": served.sha256}]
        assert record["recordedFrom"] == pod["metadata"]["name"]
        configmap = apiserver.wait_for(lambda: apiserver.read("v1", "configmaps", apiserver.namespace, "qwen-sha256"),
                                       message="the trust ConfigMap")
        sums = contract.parse_trusted_sums(configmap["data"]["sha256sum"], model["cacheKey"])
        assert sums == {"tiny.gguf": served.sha256}
        assert configmap["metadata"]["ownerReferences"][0]["kind"] == "LlamaModel"

        after = apiserver.read("apps/v1", "deployments", apiserver.namespace, "chat")
        assert after["metadata"]["generation"] == dep["metadata"]["generation"]  # no roll for the record


def test_a_draft_with_a_volume_source_is_a_failed_status(apiserver: Any, run_operator: Any, hub: FakeHub) -> None:
    with run_operator("llama_operator.handlers") as runner:
        apiserver.create_llama("llamamodels",
                               model_body(spec={"source": {"http": {"url": f"{hub.url}/plain/tiny.gguf"}}}))
        apiserver.create_llama("llamamodels", model_body("draft", spec={"source": {"volume": {
            "persistentVolumeClaim": "models", "path": "d/draft.gguf"}}}))
        apiserver.create_llama("llamaservers", server_body(speculative={"draftModelRef": {"name": "draft"}}))
        status = apiserver.wait_for(lambda: _status(apiserver, "llamaservers", "chat").get("phase") == "Failed"
                                    and _status(apiserver, "llamaservers", "chat"), message="server Failed")
        assert "spec.speculative.draftModelRef" in status["message"] and "volume source" in status["message"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["ModelResolved"]["reason"] == "DraftNotDownloadable"
        assert conditions["Reconciled"]["status"] == "True"
        assert apiserver.read("apps/v1", "deployments", apiserver.namespace, "chat") is None
    assert "Traceback" not in runner.output
