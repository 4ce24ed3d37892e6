"""The NetworkPolicy next to a LlamaServer, on a real API server with exactly the chart's RBAC: the operator
applies it before the Deployment, the API server accepts what the builder makes, garbage collection removes it
with the server, and turning the setting off removes it (namespaced mode: only a Role in the namespace)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import model_body, server_body

CRD = "llamacpp.dev/v1beta1"
NP = "networking.k8s.io/v1"

OPERATOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llama-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llama-operator"}}}
READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}]}
VOLUME_MODEL = {"source": {"volume": {"persistentVolumeClaim": "models", "path": "m.gguf"}}}


def _policy(apiserver: Any) -> dict[str, Any] | None:
    return apiserver.read(NP, "networkpolicies", apiserver.namespace, "chat")


def test_the_policy_is_applied_with_the_chart_rbac_and_goes_with_the_server(
        apiserver: Any, run_operator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_SERVER_NETWORK_POLICY_FROM", json.dumps([OPERATOR]))
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):
        apiserver.create_llama("llamamodels", model_body("qwen", spec=VOLUME_MODEL))
        server = apiserver.create_llama("llamaservers", server_body("chat"))
        policy = apiserver.wait_for(lambda: _policy(apiserver), message="NetworkPolicy")
        deployment = apiserver.wait_for(lambda: apiserver.read("apps/v1", "deployments", apiserver.namespace,
                                                               "chat"), message="Deployment")
        assert policy["metadata"]["ownerReferences"][0]["uid"] == server["metadata"]["uid"]
        assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {}}, OPERATOR]
        # before the pods: the policy was there first
        assert policy["metadata"]["creationTimestamp"] <= deployment["metadata"]["creationTimestamp"]

    monkeypatch.delenv("LLAMA_OPERATOR_SERVER_NETWORK_POLICY_FROM")
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):  # resumes: reconciles once
        apiserver.wait_for(lambda: _policy(apiserver) is None, message="NetworkPolicy removed when turned off")

    monkeypatch.setenv("LLAMA_OPERATOR_SERVER_NETWORK_POLICY_FROM", "[]")
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):
        policy = apiserver.wait_for(lambda: _policy(apiserver), message="NetworkPolicy again")
        assert policy["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]
        apiserver.delete(CRD, "llamaservers", apiserver.namespace, "chat")
        apiserver.wait_for(lambda: _policy(apiserver) is None, message="garbage-collected with the server")
