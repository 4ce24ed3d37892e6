"""Router mode (spec.models) on the real control plane: the CRD's CEL rules in the real API server (and within its
cost budget), the operator with the chart's RBAC applying the preset ConfigMap, the Deployment and the Service,
a per-model change rolling the template, and status.models from the poller (no pod is ready: every model is
Unloaded). The pods themselves run in the sandbox e2e test (tests/e2e/test_router.py)."""

from __future__ import annotations

import copy
import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import model_body
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1beta1"
REPO = "org/tiny-GGUF"
NAMES = ("alpha", "beta", "gamma")


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {name: write_tiny_llama(root / f"{name}.gguf", seed=seed) for seed, name in enumerate(NAMES)}


@pytest.fixture
def hub(ggufs: dict[str, pathlib.Path]) -> Iterator[FakeHub]:
    fake = FakeHub()
    for name, path in ggufs.items():
        fake.add(REPO, f"{name}.gguf", path)
    with fake.running():
        yield fake


@pytest.fixture(autouse=True)
def operator_env(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_MODEL_STATUS_SECONDS", "1")
    monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", hub.url)


MODELS = [{"modelRef": {"name": "alpha"}, "contextSize": 512, "loadOnStartup": True},
          {"modelRef": {"name": "beta"}, "alias": "bee", "contextSize": 1024},
          {"modelRef": {"name": "gamma"}, "idleUnloadSeconds": 60}]


def _server(namespace: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": CRD, "kind": "LlamaServer", "metadata": {"name": "fleet", "namespace": namespace},
            "spec": {"models": MODELS, "maxLoaded": 2, **spec}}


def _create_models(apiserver: Any) -> None:
    for name in NAMES:
        body = copy.deepcopy(model_body(name, spec={"source": {"huggingFace": {"repo": REPO, "file": f"{name}.gguf"}}}))
        body["metadata"] = {"name": name, "namespace": apiserver.namespace}
        apiserver.create(CRD, "llamamodels", apiserver.namespace, body)


def _status(apiserver: Any) -> dict[str, Any]:
    return ((apiserver.read(CRD, "llamaservers", apiserver.namespace, "fleet") or {}).get("status")) or {}


def test_a_router_server_gets_its_preset_deployment_and_model_status(apiserver: Any, run_operator: Any,
                                                                     kubectl_admin: Any) -> None:
    with run_operator("llama_operator.handlers"):
        _create_models(apiserver)
        server = apiserver.create(CRD, "llamaservers", apiserver.namespace, _server(apiserver.namespace))
        cm = apiserver.wait_for(lambda: apiserver.read("v1", "configmaps", apiserver.namespace, "fleet-models"),
                                message="preset ConfigMap", timeout=30)
        assert cm["metadata"]["ownerReferences"][0]["uid"] == server["metadata"]["uid"]
        ini = cm["data"]["models.ini"]
        assert [line for line in ini.splitlines() if line.startswith("[")] == ["[alpha]", "[bee]", "[gamma]"]
        assert "ctx-size = 1024" in ini and "load-on-startup = true" in ini and "sleep-idle-seconds = 60" in ini

        dep = apiserver.wait_for(lambda: apiserver.read("apps/v1", "deployments", apiserver.namespace, "fleet"),
                                 message="Deployment")
        pod = dep["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-model-0", "fetch-model-1", "fetch-model-2",
                                                                  "drain"]
        args = pod["containers"][0]["args"]
        assert args[:2] == ["--models-preset", "/run/llama-server/preset/models.ini"]
        assert args[args.index("--models-max") + 1] == "2"
        apiserver.wait_for(lambda: apiserver.read("v1", "services", apiserver.namespace, "fleet"), message="Service")

        # No pod is ready (no kubelet here): the poller says every model is unloaded; kubectl shows the count.
        status = apiserver.wait_for(lambda: _status(apiserver).get("models") and _status(apiserver).get("args")
                                    and _status(apiserver), message="status.models and args", timeout=20)
        assert [(m["name"], m["model"], m["state"]) for m in status["models"]] == [
            ("alpha", "alpha", "Unloaded"), ("bee", "beta", "Unloaded"), ("gamma", "gamma", "Unloaded")]
        assert status["modelsLoaded"] == "0/3" and status["modelName"] == "alpha, bee, gamma"
        table = kubectl_admin("get", "lserver", "fleet", check=True).stdout
        assert table.split()[:4] == ["NAME", "MODEL", "PHASE", "READY"] and "LOADED" in table and "0/3" in table

        # One model's setting changes: the ConfigMap and the pod template's preset hash change together.
        before = dep["spec"]["template"]["metadata"]["annotations"]["llamacpp.dev/models-preset-sha256"]
        changed = copy.deepcopy(MODELS)
        changed[1]["contextSize"] = 2048
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "fleet", {"spec": {"models": changed}})

        def rolled() -> dict[str, Any] | None:
            current = apiserver.read("apps/v1", "deployments", apiserver.namespace, "fleet") or {}
            annotations = current.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
            return current if annotations.get("llamacpp.dev/models-preset-sha256") not in (None, before) else None

        apiserver.wait_for(rolled, message="a new pod template", timeout=20)
        assert "ctx-size = 2048" in apiserver.read("v1", "configmaps", apiserver.namespace,
                                                   "fleet-models")["data"]["models.ini"]
        # The poller's fields survive the reconcile's own status writes.
        assert _status(apiserver)["modelsLoaded"] == "0/3"


BAD = [
    ({"models": [{"modelRef": {"name": "alpha"}}, {"modelRef": {"name": "beta"}, "cacheTypeV": "q8_0"}]},
     'spec.models[1].cacheTypeV: Invalid value: model beta: a quantized V cache (q8_0) needs flash '
     "attention: set flashAttention: on"),
    ({"models": [{"modelRef": {"name": "alpha"}}, {"modelRef": {"name": "beta"}, "alias": "alpha"}]},
     'spec.models: Invalid value: model name alpha is served twice: give each entry of spec.models its '
     "own alias"),
    ({"models": [{"modelRef": {"name": "alpha"}}], "contextSize": 4096},
     'spec.contextSize: Invalid value: with spec.models, contextSize is set per model: use '
     "spec.models[].contextSize"),
    ({"modelRef": {"name": "alpha"}, "models": [{"modelRef": {"name": "alpha"}}]},
     'spec: Invalid value: exactly one of modelRef, models must be set (got modelRef, models)'),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=["per-model", "duplicate", "server-level", "both"])
def test_a_bad_router_spec_is_refused_by_the_api_server_naming_the_model(
    apiserver: Any, kubectl_admin: Any, spec: dict[str, Any], message: str
) -> None:
    body = {"apiVersion": CRD, "kind": "LlamaServer", "metadata": {"name": "x"}, "spec": spec}
    proc = kubectl_admin("apply", "-f", "-", input=yaml.safe_dump(body))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_a_good_router_spec_is_admitted(apiserver: Any, kubectl_admin: Any) -> None:
    body = _server(apiserver.namespace, gpu={"vendor": "nvidia", "count": 2}, tensorSplit=[1, 1])
    proc = kubectl_admin("apply", "-f", "-", input=json.dumps(body))
    assert proc.returncode == 0, proc.stderr
