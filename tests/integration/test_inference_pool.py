"""The InferencePool next to a LlamaServer on a real API server, with exactly the chart's RBAC and the upstream CRD
(gateway-api-inference-extension, from its Go module: scripts/get-inference-crds.sh): none while the cluster does
not serve the API; with the CRD installed before the operator starts, a pool the CRD's schema accepts, selecting
the Deployment's pods on llama-server's port, the engine-type labels on the pods, garbage-collected with the server.

The CRD is installed for one test and deleted after it: the other tests of the session run without it."""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from llama_operator.builders.inference_pool import ENGINE_TYPE, ENGINE_TYPE_LABELS
from tests.cluster import ApiError
from tests.conftest import model_body, server_body
from tests.tiers import REPO, in_ci

CRD = "llamacpp.dev/v1beta1"
POOLS = "inference.networking.k8s.io/v1"
DISCOVERY = f"/apis/{POOLS}"
CRDS = "apiextensions.k8s.io/v1"
VOLUME_MODEL = {"source": {"volume": {"persistentVolumeClaim": "models", "path": "m.gguf"}}}
ENV = "LLAMA_OPERATOR_INFERENCE_CRDS"


def _crd_file() -> pathlib.Path:
    """The upstream CRD as the script fetched it ($LLAMA_OPERATOR_INFERENCE_CRDS, or its cache): never fetched here."""
    configured = os.environ.get(ENV)
    if configured:
        return pathlib.Path(configured)
    proc = subprocess.run([str(REPO / "scripts" / "get-inference-crds.sh"), "--cached"], capture_output=True,
                          text=True, timeout=60)
    if proc.returncode == 0 and proc.stdout.strip():
        return pathlib.Path(proc.stdout.strip().splitlines()[-1])
    reason = f"${ENV} is not set and scripts/get-inference-crds.sh has not fetched the CRD (it needs the Go proxy)"
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


def _served(apiserver: Any) -> bool:
    try:
        found = apiserver.request("GET", DISCOVERY)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return any(resource["name"] == "inferencepools" for resource in found.get("resources") or [])


@pytest.fixture
def inference_crd(apiserver: Any) -> Iterator[dict[str, Any]]:
    crd = yaml.safe_load(_crd_file().read_text())
    assert crd["spec"]["group"] == "inference.networking.k8s.io" and crd["spec"]["names"]["kind"] == "InferencePool"
    name = crd["metadata"]["name"]
    apiserver.create(CRDS, "customresourcedefinitions", None, crd)
    try:
        apiserver.wait_for(lambda: _served(apiserver), timeout=30, message="the InferencePool API served")
        yield crd
    finally:
        apiserver.delete(CRDS, "customresourcedefinitions", None, name)
        apiserver.wait_for(lambda: not _served(apiserver), timeout=60, message="the InferencePool API gone")


def _deployment(apiserver: Any) -> dict[str, Any]:
    return apiserver.wait_for(lambda: apiserver.read("apps/v1", "deployments", apiserver.namespace, "chat"),
                              message="Deployment")


def _pod_labels(apiserver: Any) -> dict[str, str]:
    return _deployment(apiserver)["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]


def _pool(apiserver: Any) -> dict[str, Any] | None:
    return apiserver.read(POOLS, "inferencepools", apiserver.namespace, "chat")


def test_no_pool_where_the_cluster_does_not_serve_the_api(apiserver: Any, run_operator: Any) -> None:
    assert not _served(apiserver)  # the session's control plane has only our own CRDs
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):
        apiserver.create_llama("llamamodels", model_body("qwen", spec=VOLUME_MODEL))
        apiserver.create_llama("llamaservers", server_body("chat"))
        assert not set(ENGINE_TYPE_LABELS) & set(_pod_labels(apiserver))  # the pods as before pools existed


def test_the_pool_is_accepted_by_the_upstream_crd_and_goes_with_the_server(
        apiserver: Any, run_operator: Any, inference_crd: dict[str, Any]) -> None:
    # The chart's operator Role, namespaced mode: discovery needs no rule, the pool its own.
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):
        apiserver.create_llama("llamamodels", model_body("qwen", spec=VOLUME_MODEL))
        server = apiserver.create_llama("llamaservers", server_body("chat", replicas=2))
        pool = apiserver.wait_for(lambda: _pool(apiserver), timeout=30, message="InferencePool")
        deployment = _deployment(apiserver)
        template = deployment["spec"]["template"]
        assert pool["metadata"]["ownerReferences"][0]["uid"] == server["metadata"]["uid"]
        assert pool["spec"]["selector"] == {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}
        port = template["spec"]["containers"][0]["ports"][0]["containerPort"]
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
        assert pool["spec"]["endpointPickerRef"]["name"] == "chat-epp"
        assert pool["spec"]["endpointPickerRef"]["port"] == {"number": 9002}
        for key in ENGINE_TYPE_LABELS:
            assert pool["metadata"]["labels"][key] == template["metadata"]["labels"][key] == ENGINE_TYPE

    # The schema is the upstream one, enforced: a pool without target ports is refused.
    broken = {"apiVersion": POOLS, "kind": "InferencePool", "metadata": {"name": "broken"},
              "spec": {**pool["spec"], "targetPorts": []}}
    with pytest.raises(ApiError) as refused:
        apiserver.create(POOLS, "inferencepools", apiserver.namespace, broken)
    assert refused.value.status == 422 and "targetPorts" in str(refused.value.body)

    apiserver.delete(CRD, "llamaservers", apiserver.namespace, "chat")
    # The garbage collector learns of a CRD installed after it started at its next discovery sync (30 s).
    apiserver.wait_for(lambda: _pool(apiserver) is None, timeout=90, message="garbage-collected with the server")


def test_turned_off_the_operator_removes_the_pools_it_made(
        apiserver: Any, run_operator: Any, inference_crd: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):
        apiserver.create_llama("llamamodels", model_body("qwen", spec=VOLUME_MODEL))
        apiserver.create_llama("llamaservers", server_body("chat"))
        apiserver.wait_for(lambda: _pool(apiserver), timeout=30, message="InferencePool")
    monkeypatch.setenv("LLAMA_OPERATOR_INFERENCE_POOL", "false")
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):  # resumes: reconciles once
        apiserver.wait_for(lambda: _pool(apiserver) is None, timeout=30, message="InferencePool removed")
        apiserver.wait_for(lambda: not set(ENGINE_TYPE_LABELS) & set(_pod_labels(apiserver)), timeout=30,
                           message="the engine-type labels gone from the pods")
