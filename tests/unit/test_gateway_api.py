"""The API fields the gateway reads and writes: spec.scaling, spec.routing, status.autoscaling (issue 12)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from llama_operator.api.cel import violations
from llama_operator.api.v1beta1 import SCALING_RULES, LlamaServer, LlamaServerSpec
from llama_operator.config import Settings
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import observe, reconcile_server
from tests import crdschema
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube

SCALING_CORPUS = [
    {"minReplicas": 0},
    {"minReplicas": 0, "maxReplicas": 4},
    {"minReplicas": 3, "maxReplicas": 2},
    {"minReplicas": 2},
    {"minReplicas": 1, "maxReplicas": 1, "targetInFlight": 2, "idleSeconds": 5, "scaleDownDelaySeconds": 0},
]


@pytest.mark.parametrize("scaling", SCALING_CORPUS, ids=[str(s) for s in SCALING_CORPUS])
def test_scaling_cel_rule_says_what_its_python_says(scaling: dict[str, Any]) -> None:
    body = server_body(scaling=scaling)
    spec = LlamaServerSpec.model_validate(body["spec"])
    assert spec.scaling is not None
    python = [f"{path}: {message}" for path, message, _ in violations(SCALING_RULES, spec.scaling, "spec.scaling")]
    assert crdschema.cel_errors(body) == python


def test_min_above_max_is_reported_by_the_operator_too() -> None:
    observed = observe(server_body(scaling={"minReplicas": 3, "maxReplicas": 2}), Settings())
    assert observed.server is not None
    assert observed.problems == ["spec.scaling.minReplicas: minReplicas (3) must be <= maxReplicas (2)"]


@pytest.mark.parametrize(("fields", "complaint"), [
    ({"scaling": {"minReplicas": -1}}, "spec.scaling.minReplicas"),
    ({"scaling": {"maxReplicas": 0}}, "spec.scaling.maxReplicas"),
    ({"scaling": {"targetInFlight": 0}}, "spec.scaling.targetInFlight"),
    ({"scaling": {"idleSecond": 5}}, "idleSecond"),
    ({"routing": {"strategy": "RoundRobin"}}, "spec.routing.strategy"),
    ({"routing": {"loadBound": 0.5}}, "spec.routing.loadBound"),
])
def test_schema_refuses_bad_scaling_and_routing(fields: dict[str, Any], complaint: str) -> None:
    assert any(complaint in problem for problem in crdschema.errors(server_body(**fields)))


def test_defaults() -> None:
    server = LlamaServer.model_validate(server_body(scaling={"minReplicas": 0}, routing={"strategy": "PrefixAffinity"}))
    scaling, routing = server.spec.scaling, server.spec.routing
    assert scaling is not None and routing is not None
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_in_flight) == (0, 1, None)
    assert (scaling.idle_seconds, scaling.scale_down_delay_seconds, scaling.window_seconds) == (300, 60, 30)
    assert (routing.prefix_characters, routing.load_bound) == (2048, 1.25)
    assert LlamaServer.model_validate(server_body()).spec.routing is None


READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}]}


async def test_the_operator_never_writes_over_the_gateways_status() -> None:
    """The reconcile read the object before the gateway wrote a newer autoscaling view: the view survives."""
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_SERVERS, server_body(scaling={"minReplicas": 0}))
    ctx = Context(kube=kube, settings=Settings(), record_event=Events())
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")], ctx)
    stored = kube.objects[("llamaservers", "default", "chat")]
    stored["status"]["autoscaling"] = {"desiredReplicas": 1, "reason": "ScaleFromZero"}
    stale = copy.deepcopy(stored)
    stored["status"]["autoscaling"] = {"desiredReplicas": 0, "reason": "Idle"}  # the gateway, meanwhile
    stale["status"]["message"] = "stale"  # something for this reconcile to write
    await reconcile_server(stale, ctx)
    assert kube.count("patch_status") == 2
    assert kube.objects[("llamaservers", "default", "chat")]["status"]["autoscaling"] == {
        "desiredReplicas": 0, "reason": "Idle"}
    assert kube.objects[("llamaservers", "default", "chat")]["status"]["message"] != "stale"
