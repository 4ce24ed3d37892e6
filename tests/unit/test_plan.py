"""The pure plan of a LlamaServer (builders/plan.py): decided once per reconcile, the same for one model and router
mode, and the one list of a server's model references (LlamaServerSpec.model_refs)."""

from __future__ import annotations

from typing import Any

import pytest

import llama_operator.fit
import llama_operator.flags.render
from llama_operator.api.v1beta1 import GgufInfo, LlamaModel, LlamaServer, ModelMemoryShape
from llama_operator.builders.plan import PlanProblem, ServerPlan, plan_server
from llama_operator.config import Settings
from llama_operator.fit.estimate import GiB
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, resolved_model, server, server_body
from tests.fakekube import Events, FakeKube

SHAPE = ModelMemoryShape(
    weight_bytes=GiB, layer_weight_bytes=GiB - GiB // 8, embedding_weight_bytes=GiB // 16,
    output_weight_bytes=GiB // 16, layers=24, vocab_size=32_000, embedding_length=2048, feed_forward_length=8192,
    head_count=16, attention_layers=24, key_width=4 * 128, value_width=4 * 128,
)  # fmt: skip
READY = {"phase": "Ready", "cacheKey": "qwen-0123456789ab", "files": [{"name": "m.gguf"}],
         "gguf": GgufInfo(architecture="llama", context_length=8192, memory=SHAPE).to_wire()}
POLICY_ON = Settings(server_network_policy_from=({"namespaceSelector": {"matchLabels": {"team": "gw"}}},))


def _models(*names: str) -> dict[str, LlamaModel]:
    return {name: resolved_model(name=name) for name in names}


def _kinds(plan: ServerPlan | PlanProblem) -> list[str]:
    assert isinstance(plan, ServerPlan), plan
    return [obj["kind"] for obj in plan.objects]


def _router(**spec: Any) -> LlamaServer:
    body = server_body(models=[{"modelRef": {"name": "a"}}, {"modelRef": {"name": "b"}, "alias": "bee"}], **spec)
    del body["spec"]["modelRef"]
    return LlamaServer.model_validate(body)


def test_the_plan_lists_every_object_in_apply_order() -> None:
    assert _kinds(plan_server(server(), _models("qwen"), Settings())) == ["Deployment", "Service"]
    # The NetworkPolicy before any pod can start; the preset before the pods that mount it.
    assert _kinds(plan_server(server(), _models("qwen"), POLICY_ON)) == ["NetworkPolicy", "Deployment", "Service"]
    assert _kinds(plan_server(_router(), _models("a", "b"), POLICY_ON)) == [
        "NetworkPolicy", "ConfigMap", "Deployment", "Service"]


def test_the_plan_carries_what_status_reports() -> None:
    plan = plan_server(server(alias="chatty"), _models("qwen"), Settings())
    assert isinstance(plan, ServerPlan)
    assert plan.args == plan.deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert (plan.model_name, plan.served_names) == ("chatty", ["chatty"])
    assert plan.endpoint == "http://chat.default.svc:8080/v1"
    router = plan_server(_router(), _models("a", "b"), Settings())
    assert isinstance(router, ServerPlan)
    assert (router.model_name, router.served_names, router.estimate) == ("a, bee", ["a", "bee"], None)
    assert "--models-preset" in router.args


def test_only_models_trusted_on_first_use_have_their_fetch_recorded() -> None:
    pinned = resolved_model(name="qwen", spec={"source": {"http": {"url": "https://h/m.gguf"}}, "sha256": "a" * 64})
    unpinned = resolved_model(name="d", spec={"source": {"http": {"url": "https://h/d.gguf"}}})
    plan = plan_server(server(speculative={"draftModelRef": {"name": "d"}}), {"qwen": pinned, "d": unpinned},
                       Settings())
    assert isinstance(plan, ServerPlan)
    assert dict(plan.trust) == {"fetch-draft-model": unpinned}


def test_what_the_models_rule_out_is_a_problem_not_a_plan() -> None:
    volume = resolved_model(name="d", spec={"source": {"volume": {"persistentVolumeClaim": "pvc", "path": "d.gguf"}}})
    plan = plan_server(server(speculative={"draftModelRef": {"name": "d"}}), {**_models("qwen"), "d": volume},
                       Settings())
    assert isinstance(plan, PlanProblem)
    assert (plan.condition, plan.reason) == ("ModelResolved", "DraftNotDownloadable")
    assert plan.message.startswith("spec.speculative.draftModelRef: LlamaModel d has a volume source")


def test_model_refs_is_every_reference_with_its_field() -> None:
    spec = server(speculative={"draftModelRef": {"name": "d"}}).spec
    assert [(field, ref.name) for field, ref in spec.model_refs()] == [
        ("spec.modelRef", "qwen"), ("spec.speculative.draftModelRef", "d")]
    assert [(field, ref.name) for field, ref in _router().spec.model_refs()] == [
        ("spec.models[0].modelRef", "a"), ("spec.models[1].modelRef", "b")]


def test_the_model_index_reads_model_refs() -> None:
    from llama_operator.handlers import servers_by_model

    spec = {"modelRef": {"name": "qwen"}, "speculative": {"draftModelRef": {"name": "d"}}}
    assert servers_by_model(namespace="ns", name="chat", spec=spec) == {("ns", "qwen"): "chat", ("ns", "d"): "chat"}
    assert servers_by_model(namespace="ns", name="chat", spec={"replicas": 1}) == {}  # neither modelRef nor models


async def test_one_reconcile_estimates_and_renders_the_arguments_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"estimate": 0, "args": 0}

    def counting(name: str, module: Any, attribute: str) -> None:
        real = getattr(module, attribute)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, attribute, wrapper)

    # Looked up by name inside estimate_server and render_args, wherever those are called from.
    counting("estimate", llama_operator.fit, "settings_from_spec")
    counting("args", llama_operator.flags.render, "managed_args")
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    body = kube.put(LLAMA_SERVERS, server_body())
    status = await reconcile_server(body, Context(kube=kube, settings=Settings(), record_event=Events()))
    assert status.memory is not None and status.args
    assert counts == {"estimate": 1, "args": 1}


@pytest.mark.parametrize(("model_status", "reason", "event"), [
    ({"phase": "Failed", "message": "x.gguf: not a GGUF file"}, "ModelFailed", "Warning"),
    ({"phase": "Resolving", "message": "inspecting the model source"}, "ModelNotReady", "Normal"),
])
async def test_a_server_waiting_on_a_failed_model_warns(model_status: dict[str, Any], reason: str,
                                                        event: str) -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=model_status))
    body = kube.put(LLAMA_SERVERS, server_body())
    events = Events()
    status = await reconcile_server(body, Context(kube=kube, settings=Settings(), record_event=events))
    assert status.phase == "Pending"
    (resolved,) = [c for c in status.conditions or [] if c.type == "ModelResolved"]
    assert (resolved.status, resolved.reason) == ("False", reason)
    assert [(kind, why) for _, kind, why, _ in events] == [(event, "Pending")]
    assert model_status["message"] in events[0][3]
