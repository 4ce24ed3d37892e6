"""Rollouts, disruption and placement of a LlamaServer's pods (issue 21): the Deployment strategy per case, the
PodDisruptionBudget of a server with more than one replica, and the topology spread (docs/architecture.md,
"The pods")."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest

from llama_operator.api.v1beta1 import BUDGET_RULES, DISRUPTION_RULES, LlamaServerSpec
from llama_operator.builders import build_deployment
from llama_operator.builders.deployment import rollout_strategy
from llama_operator.builders.placement import build_disruption_budget
from llama_operator.builders.plan import ServerPlan, plan_server
from llama_operator.config import Settings
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS, POD_DISRUPTION_BUDGETS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests import crdschema
from tests.conftest import model_body, resolved_model, server, server_body
from tests.fakekube import Events, FakeKube

GPU = {"vendor": "nvidia"}
SURGE = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
ONE_AT_A_TIME = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
RECREATE = {"type": "Recreate"}


@pytest.mark.parametrize(("spec", "strategy"), [
    ({"replicas": 1}, SURGE),
    ({"replicas": 3}, SURGE),
    ({"replicas": 1, "gpu": GPU}, RECREATE),
    ({"replicas": 0, "gpu": GPU}, RECREATE),
    ({"replicas": 2, "gpu": GPU}, ONE_AT_A_TIME),
    ({"replicas": 5, "gpu": GPU}, ONE_AT_A_TIME),
], ids=["cpu-1", "cpu-3", "gpu-1", "gpu-0", "gpu-2", "gpu-5"])
def test_the_rollout_strategy_per_case(spec: dict[str, Any], strategy: dict[str, Any]) -> None:
    assert build_deployment(server(**spec), resolved_model(), Settings())["spec"]["strategy"] == strategy
    assert rollout_strategy(gpu="gpu" in spec, replicas=spec["replicas"]) == strategy


def test_a_server_with_several_replicas_gets_a_budget_that_selects_its_pods() -> None:
    chat = server(name="chat", replicas=3)
    budget = build_disruption_budget(chat)
    assert budget is not None
    kubernetes_validate.validate(budget, "1.31.0", strict=True)
    deployment = build_deployment(chat, resolved_model(), Settings())
    assert budget["spec"] == {"selector": deployment["spec"]["selector"], "maxUnavailable": 1}
    assert budget["metadata"]["name"] == "chat" and budget["metadata"]["ownerReferences"][0]["uid"] == "uid-server"


@pytest.mark.parametrize("disruption", [{"maxUnavailable": "50%"}, {"minAvailable": 2}, {"maxUnavailable": 0}])
def test_spec_disruption_replaces_the_default(disruption: dict[str, Any]) -> None:
    budget = build_disruption_budget(server(replicas=4, disruption=disruption))
    assert budget is not None
    kubernetes_validate.validate(budget, "1.31.0", strict=True)
    assert {k: v for k, v in budget["spec"].items() if k != "selector"} == disruption


@pytest.mark.parametrize("replicas", [0, 1])
def test_no_budget_for_one_replica_or_none(replicas: int) -> None:
    assert build_disruption_budget(server(replicas=replicas, disruption={"minAvailable": 1})) is None


def test_the_budget_is_applied_after_the_deployment_and_before_the_service() -> None:
    plan = plan_server(server(replicas=2), {"qwen": resolved_model()}, Settings())
    assert isinstance(plan, ServerPlan)
    assert [obj["kind"] for obj in plan.objects] == ["Deployment", "PodDisruptionBudget", "Service"]


READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}]}


async def test_the_reconcile_makes_the_budget_follows_replicas_and_removes_it_at_one_replica() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    key = (POD_DISRUPTION_BUDGETS.plural, "default", "chat")

    async def reconcile(**spec: Any) -> None:
        kube.put(LLAMA_SERVERS, server_body("chat", **spec))
        await reconcile_server(kube.objects[("llamaservers", "default", "chat")],
                               Context(kube=kube, settings=Settings(), record_event=Events()))

    await reconcile(replicas=1)
    assert key not in kube.objects
    await reconcile(replicas=2)
    assert kube.objects[key]["spec"]["maxUnavailable"] == 1
    kube.calls.clear()
    await reconcile(replicas=2)
    assert kube.count("apply") == 0  # converged: nothing sent again
    await reconcile(replicas=3, disruption={"minAvailable": "50%"})
    assert kube.objects[key]["spec"]["minAvailable"] == "50%"
    await reconcile(replicas=1)
    assert key not in kube.objects


async def test_a_budget_of_the_same_name_made_by_someone_else_is_left_alone() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_SERVERS, server_body("chat"))
    kube.put(POD_DISRUPTION_BUDGETS, {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                                      "metadata": {"name": "chat", "namespace": "default"},
                                      "spec": {"maxUnavailable": 1}})
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")],
                           Context(kube=kube, settings=Settings(), record_event=Events()))
    assert (POD_DISRUPTION_BUDGETS.plural, "default", "chat") in kube.objects


def _spread(**spec: Any) -> list[dict[str, Any]]:
    return build_deployment(server(name="chat", **spec), resolved_model(), Settings())["spec"]["template"]["spec"][
        "topologySpreadConstraints"]


@pytest.mark.parametrize("replicas", [1, 3])
def test_the_default_spread_is_soft_over_nodes_and_the_same_for_any_replicas(replicas: int) -> None:
    # The same template for 1 and 3 replicas: scaling must not roll the pods.
    (spread,) = _spread(replicas=replicas)
    assert spread == {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                      "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "llama-server",
                                                        "llamacpp.dev/server": "chat"}}}


def test_spec_topology_spread_constraints_replace_the_default() -> None:
    zones = [{"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
              "labelSelector": {"matchLabels": {"llamacpp.dev/server": "chat"}}, "minDomains": 2}]
    assert _spread(replicas=3, topologySpreadConstraints=zones) == zones
    deployment = build_deployment(server(topologySpreadConstraints=zones), resolved_model(), Settings())
    kubernetes_validate.validate(deployment, "1.31.0", strict=True)


@pytest.mark.parametrize(("disruption", "message"), [
    ({"maxUnavailable": 1, "minAvailable": 1}, "spec.disruption: set exactly one of maxUnavailable and minAvailable"),
    ({}, "spec.disruption: set exactly one of maxUnavailable and minAvailable"),
    ({"maxUnavailable": "150%"}, "spec.disruption.maxUnavailable: must be a number >= 0 or a percentage"),
    ({"minAvailable": "half"}, "spec.disruption.minAvailable: must be a number >= 0 or a percentage"),
    ({"minAvailable": -1}, "spec.disruption.minAvailable: must be a number >= 0 or a percentage"),
])
def test_the_crd_refuses_a_bad_disruption(disruption: dict[str, Any], message: str) -> None:
    body = server_body(disruption=disruption)
    assert any(message in p for p in crdschema.errors(body)), crdschema.errors(body)
    with pytest.raises(ValueError, match=message.split(": ", 1)[1]):
        LlamaServerSpec.model_validate(body["spec"])


def test_the_crd_bounds_the_spread_list() -> None:
    one = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
    assert crdschema.errors(server_body(topologySpreadConstraints=[one])) == []
    assert any("is too long" in p for p in crdschema.errors(server_body(topologySpreadConstraints=[one] * 9)))


@pytest.mark.parametrize("value", [0, 1, 7, -1, "0%", "50%", "100%", "101%", "5", "%", "05%", "half", ""])
def test_the_budget_cel_says_what_its_python_says(value: Any) -> None:
    for rule in BUDGET_RULES:
        assert crdschema.evaluate(rule.cel, value) == rule.holds(value), (rule.id, value)


@pytest.mark.parametrize("fields", [{"maxUnavailable": 1}, {"minAvailable": "5%"}, {},
                                    {"maxUnavailable": 1, "minAvailable": 1}])
def test_the_disruption_cel_says_what_its_python_says(fields: dict[str, Any]) -> None:
    (rule,) = DISRUPTION_RULES
    node = SimpleNamespace(max_unavailable=fields.get("maxUnavailable"), min_available=fields.get("minAvailable"))
    assert crdschema.evaluate(rule.cel, fields) == rule.holds(node) == (len(fields) == 1)


@pytest.mark.parametrize(("spec", "note"), [
    ({"replicas": 2}, None),
    ({"replicas": 2, "gpu": GPU}, "rollouts replace one replica at a time (no spare GPU for a surge pod)"),
    ({"replicas": 1, "gpu": GPU}, "rollouts replace the only replica (Recreate): unavailable until the new pod"),
], ids=["cpu", "gpu-2", "gpu-1"])
async def test_the_progressing_condition_says_what_a_rollout_costs(spec: dict[str, Any], note: str | None) -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_SERVERS, server_body("chat", **spec))
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")],
                           Context(kube=kube, settings=Settings(), record_event=Events()))
    conditions = {c["type"]: c for c in kube.objects[("llamaservers", "default", "chat")]["status"]["conditions"]}
    progressing = conditions["Progressing"]
    assert progressing["status"] == "True"  # no pod is ready yet
    if note is None:
        assert "rollouts" not in progressing["message"]
    else:
        assert note in progressing["message"]
