"""The InferencePool next to a LlamaServer (builders/inference_pool.py): in the plan only where the setting and the
cluster allow it, selecting exactly the Deployment's pods on llama-server's port, naming the endpoint picker, the
engine-type labels on the pods only then; the settings it reads; discovery; applied and removed by the reconcile."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from llama_operator.api.v1beta1 import LlamaServer
from llama_operator.builders.inference_pool import (
    ENGINE_TYPE,
    ENGINE_TYPE_LABELS,
    LLAMA_CPP_METRICS,
    build_inference_pool,
)
from llama_operator.builders.plan import ServerPlan, plan_server
from llama_operator.config import InferencePoolSettings, Settings, SettingsError
from llama_operator.kube import INFERENCE_POOLS, LLAMA_MODELS, LLAMA_SERVERS, Kube, NotFound
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.discovery import with_served_apis
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, resolved_model, server, server_body
from tests.fakekube import Events, FakeKube
from tests.metric_names import LLAMA_SERVER

ON = InferencePoolSettings(served=True)
READY = {"phase": "Ready", "cacheKey": "qwen-0123456789ab", "files": [{"name": "m.gguf"}]}


def _plan(settings: Settings, **spec: Any) -> ServerPlan:
    plan = plan_server(server(**spec), {"qwen": resolved_model()}, settings)
    assert isinstance(plan, ServerPlan), plan
    return plan


def _router_plan(settings: Settings) -> ServerPlan:
    body = server_body(models=[{"modelRef": {"name": "a"}}, {"modelRef": {"name": "b"}}])
    del body["spec"]["modelRef"]
    plan = plan_server(LlamaServer.model_validate(body), {n: resolved_model(name=n) for n in "ab"}, settings)
    assert isinstance(plan, ServerPlan), plan
    return plan


@pytest.mark.parametrize(("mode", "served", "made"), [
    ("auto", False, False), ("auto", True, True), ("true", False, True), ("false", True, False),
])
def test_a_pool_only_where_the_setting_and_the_cluster_allow(mode: str, served: bool, made: bool) -> None:
    pools = InferencePoolSettings(mode=mode, served=served)  # type: ignore[arg-type]
    assert (build_inference_pool(server(), pools) is not None) is made
    plan = _plan(Settings(inference_pool=pools))
    assert (plan.find("InferencePool") is not None) is made


def test_the_pool_selects_the_deployments_pods_on_llama_servers_port() -> None:
    plan = _plan(Settings(inference_pool=ON), replicas=2)
    pool, deployment = plan.find("InferencePool"), plan.deployment
    assert pool is not None
    assert [obj["kind"] for obj in plan.objects][-2:] == ["Service", "InferencePool"]  # after what it routes to
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["metadata"]["name"] == "chat" and pool["metadata"]["namespace"] == "default"
    assert pool["metadata"]["ownerReferences"][0]["uid"] == "uid-server"  # deleted with the server
    assert pool["spec"]["selector"] == {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service", "name": "chat-epp", "port": {"number": 9002}, "failureMode": "FailClose"}
    assert {pool["metadata"]["labels"][key] for key in ENGINE_TYPE_LABELS} == {ENGINE_TYPE}


def test_the_pods_carry_the_engine_type_only_with_a_pool() -> None:
    # A changed pod template rolls every pod: servers without a pool keep theirs exactly as before.
    off, on = _plan(Settings()), _plan(Settings(inference_pool=ON))
    off_labels = off.deployment["spec"]["template"]["metadata"]["labels"]
    on_labels = on.deployment["spec"]["template"]["metadata"]["labels"]
    assert not set(ENGINE_TYPE_LABELS) & set(off_labels)
    assert on_labels == {**off_labels, **dict.fromkeys(ENGINE_TYPE_LABELS, ENGINE_TYPE)}
    # The Deployment's selector is immutable: the labels go on the pods only.
    assert on.deployment["spec"]["selector"] == off.deployment["spec"]["selector"]
    assert on.deployment["spec"]["template"]["spec"] == off.deployment["spec"]["template"]["spec"]


def test_router_mode_servers_get_no_pool() -> None:
    # The router's /metrics needs ?model= (the EPP scrapes without): a pool would route on no metrics at all.
    plan = _router_plan(Settings(inference_pool=ON))
    assert [obj["kind"] for obj in plan.objects] == ["ConfigMap", "Deployment", "Service"]
    assert not set(ENGINE_TYPE_LABELS) & set(plan.deployment["spec"]["template"]["metadata"]["labels"])


def test_the_endpoint_picker_is_named_by_the_setting() -> None:
    pools = replace(ON, endpoint_picker="shared-picker", endpoint_picker_port=9100, failure_mode="FailOpen")
    ref = _plan(Settings(inference_pool=pools)).find("InferencePool")["spec"]["endpointPickerRef"]  # type: ignore[index]
    assert ref == {"kind": "Service", "name": "shared-picker", "port": {"number": 9100}, "failureMode": "FailOpen"}
    pools = replace(ON, endpoint_picker="epp-{server}")
    assert build_inference_pool(server(), pools)["spec"]["endpointPickerRef"]["name"] == "epp-chat"  # type: ignore[index]


def test_the_metric_mapping_names_metrics_llama_server_exports() -> None:
    # tests/runtime/test_metrics_scrape.py asserts that the real llama-server exports every LLAMA_SERVER name.
    named = {spec for spec in LLAMA_CPP_METRICS.values() if spec}
    assert named == {"llamacpp:requests_deferred", "llamacpp:requests_processing"} and named <= LLAMA_SERVER
    assert LLAMA_CPP_METRICS["queuedRequestsSpec"] == "llamacpp:requests_deferred"
    assert LLAMA_CPP_METRICS["runningRequestsSpec"] == "llamacpp:requests_processing"


def test_the_settings_from_the_environment() -> None:
    assert Settings.from_env({}).inference_pool == InferencePoolSettings()
    pools = Settings.from_env({
        "LLAMA_OPERATOR_INFERENCE_POOL": "true", "LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER": "{server}-picker",
        "LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER_PORT": "9100",
        "LLAMA_OPERATOR_INFERENCE_POOL_FAILURE_MODE": "FailOpen",
    }).inference_pool
    assert pools == InferencePoolSettings(mode="true", endpoint_picker="{server}-picker", endpoint_picker_port=9100,
                                          failure_mode="FailOpen")
    assert pools.enabled and not InferencePoolSettings().enabled


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("LLAMA_OPERATOR_INFERENCE_POOL", "yes", "must be auto, true or false"),
    ("LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER", "EPP_Service", "must be a Service name"),
    ("LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER", "x" * 5000, "must be a Service name"),
    ("LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER_PORT", "0", "needs a port"),
    ("LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER_PORT", "70000", "must be a port number"),
    ("LLAMA_OPERATOR_INFERENCE_POOL_FAILURE_MODE", "open", "must be FailClose or FailOpen"),
])
def test_bad_settings_are_one_clear_line(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as caught:
        Settings.from_env({variable: value})
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


class _Discovery(Kube):
    """Answers the discovery request only: what the API server lists under inference.networking.k8s.io/v1."""

    def __init__(self, resources: list[str] | None) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.resources = resources
        self.paths: list[str] = []

    async def _request(self, method: str, path: str, *, permission: str | None = None, **_: Any) -> Any:
        self.paths.append(f"{method} {path}")
        if self.resources is None:
            raise NotFound(f"{method} {path}: not found", status=404)
        return {"kind": "APIResourceList", "resources": [{"name": name} for name in self.resources]}


@pytest.mark.parametrize(("resources", "served"), [
    (None, False), ([], False), (["inferencepools/status"], False), (["inferencepools", "inferencepools/status"], True),
])
async def test_discovery_at_startup(resources: list[str] | None, served: bool) -> None:
    kube = _Discovery(resources)
    settings = await with_served_apis(kube, Settings())
    assert settings.inference_pool.served is served and settings.inference_pool.enabled is served
    assert kube.paths == ["GET /apis/inference.networking.k8s.io/v1"]


async def test_the_reconcile_applies_the_pool_and_removes_it_when_turned_off() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    body = kube.put(LLAMA_SERVERS, server_body())
    await reconcile_server(body, Context(kube=kube, settings=Settings(inference_pool=ON), record_event=Events()))
    pool = kube.objects[("inferencepools", "default", "chat")]
    assert pool["spec"]["endpointPickerRef"]["name"] == "chat-epp"

    off = Settings(inference_pool=replace(ON, mode="false"))
    await reconcile_server(body, Context(kube=kube, settings=off, record_event=Events()))
    assert ("inferencepools", "default", "chat") not in kube.objects
    assert "llm-d.ai/engine-type" not in kube.objects[("deployments", "default", "chat")]["spec"]["template"][
        "metadata"]["labels"]


async def test_no_request_for_pools_where_the_cluster_serves_none() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    body = kube.put(LLAMA_SERVERS, server_body())
    await reconcile_server(body, Context(kube=kube, settings=Settings(), record_event=Events()))
    assert kube.count("get", INFERENCE_POOLS.plural) == kube.count("apply", INFERENCE_POOLS.plural) == 0
    assert kube.count("delete", INFERENCE_POOLS.plural) == 0


async def test_a_pool_someone_else_made_is_theirs_to_keep() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(INFERENCE_POOLS, {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                               "metadata": {"name": "chat", "namespace": "default"}, "spec": {}})
    body = kube.put(LLAMA_SERVERS, server_body())
    off = Settings(inference_pool=replace(ON, mode="false"))
    await reconcile_server(body, Context(kube=kube, settings=off, record_event=Events()))
    assert ("inferencepools", "default", "chat") in kube.objects
