"""A LlamaServer split over RPC workers (spec.distributed): what the API refuses, the plan's objects (the workers'
StatefulSet, headless Service and NetworkPolicy, the leader's --rpc and --tensor-split), the leader held back
until every worker runs and rolled when one restarts, and what status says about each worker."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.api.v1beta1 import GgufInfo, LlamaServer
from llama_operator.builders.plan import PlanProblem, ServerPlan, Workers, plan_server
from llama_operator.config import Settings
from llama_operator.contract import RPC_PORT, RPC_WORKERS_ANNOTATION
from llama_operator.flags.validate import validate_server_spec
from llama_operator.kube import DEPLOYMENTS, LLAMA_MODELS, LLAMA_SERVERS, PODS, STATEFUL_SETS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from llama_operator.reconcile.workers import Worker, identity
from tests.conftest import model_body, resolved_model, server_body
from tests.fakekube import Events, FakeKube
from tests.unit.test_plan import SHAPE

IMAGE = "registry.local/llama.cpp:rpc-b11312"
RPC = Settings(rpc_images={"cpu": IMAGE})
STATUS = {"phase": "Ready", "cacheKey": "qwen-0123456789ab", "files": [{"name": "m.gguf"}],
          "gguf": GgufInfo(architecture="llama", context_length=8192, memory=SHAPE).to_wire()}
SPLIT = {"workers": 2, "memory": "2Gi", "cpu": "2"}


def _server(**spec: Any) -> LlamaServer:
    return LlamaServer.model_validate(server_body(contextSize=4096, distributed=SPLIT, **spec))


def _plan(srv: LlamaServer, settings: Settings = RPC, workers: Workers | None = None) -> ServerPlan:
    plan = plan_server(srv, {"qwen": resolved_model(name="qwen", status=STATUS)}, settings, workers)
    assert isinstance(plan, ServerPlan), plan
    return plan


@pytest.mark.parametrize(("spec", "refused"), [
    ({"replicas": 2}, "distributed serves one replica"),
    ({"gpuLayers": 10}, "distributed cannot be used with gpuLayers"),
    ({"tensorSplit": [1.0]}, "distributed cannot be used with tensorSplit"),
    ({"scaling": {"minReplicas": 0, "maxReplicas": 1}}, "distributed cannot be used with scaling"),
    ({"gpu": {"vendor": "nvidia"}}, "distributed cannot be used with gpu"),
    ({"promptCache": {"persist": True}}, "distributed cannot be used with promptCache"),
    ({"args": ["--rpc", "10.0.0.1:50052"]}, "--rpc is managed by the operator"),
])
def test_what_a_split_cannot_be_combined_with_is_refused(spec: dict[str, Any], refused: str) -> None:
    srv = LlamaServer.model_validate(server_body(distributed=SPLIT, **spec))
    assert any(refused in str(error) for error in validate_server_spec(srv.spec)), validate_server_spec(srv.spec)


def test_the_plan_makes_the_workers_and_points_the_leader_at_them() -> None:
    plan = _plan(_server())
    assert [obj["kind"] for obj in plan.objects] == [
        "NetworkPolicy", "Service", "StatefulSet", "Deployment", "Service"]
    workers = plan.find("StatefulSet")
    assert workers is not None and workers["spec"]["replicas"] == 2
    assert workers["spec"]["podManagementPolicy"] == "Parallel"
    pod = workers["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert (container["image"], container["command"]) == (IMAGE, ["/app/ggml-rpc-server"])
    assert container["args"] == ["--host", "0.0.0.0", "--port", str(RPC_PORT), "--threads", "2"]
    amounts = {"memory": "2Gi", "cpu": "2"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    assert "readinessProbe" not in container and "livenessProbe" not in container  # the backlog of 1: module doc
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    # The workers are not the server's pods: neither its Service nor its Deployment selects them.
    worker_labels = workers["spec"]["template"]["metadata"]["labels"]
    service = plan.objects[-1]["spec"]["selector"]
    assert not all(worker_labels.get(key) == value for key, value in service.items())
    args = plan.args
    assert args[args.index("--rpc") + 1] == (f"chat-workers-0.chat-workers.default.svc:{RPC_PORT},"
                                             f"chat-workers-1.chat-workers.default.svc:{RPC_PORT}")
    assert plan.placement is not None
    assert args[args.index("--n-gpu-layers") + 1] == str(plan.placement.gpu_layers) == str(SHAPE.layers + 1)
    split = [int(part) for part in args[args.index("--tensor-split") + 1].split(",")]
    assert sum(split) == SHAPE.layers + 1 and abs(split[0] - split[1]) <= 1
    leader = plan.deployment
    assert leader["spec"]["strategy"] == {"type": "Recreate"}  # a worker serves one leader at a time
    assert leader["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE


def test_only_the_leader_reaches_the_workers() -> None:
    policy = _plan(_server()).objects[0]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "llama-rpc-worker"
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "llama-server",
                                                             "llamacpp.dev/server": "chat"}}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": RPC_PORT}]
    service = _plan(_server()).objects[1]
    assert service["spec"]["clusterIP"] == "None"


def test_the_leader_waits_for_every_worker_and_records_which_it_met() -> None:
    assert _plan(_server(), workers=Workers(identity=None)).find("Deployment") is None
    plan = _plan(_server(), workers=Workers(identity="abc"))
    annotations = plan.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[RPC_WORKERS_ANNOTATION] == "abc"


def _pod(name: str, *, uid: str = "u1", restarts: int = 0, running: bool = True) -> dict[str, Any]:
    state = {"running": {}} if running else {"waiting": {"reason": "ContainerCreating"}}
    return {"metadata": {"name": name, "namespace": "default", "uid": uid,
                         "labels": {"app.kubernetes.io/name": "llama-rpc-worker", "llamacpp.dev/server": "chat"}},
            "spec": {"nodeName": "node-a"},
            "status": {"phase": "Running" if running else "Pending", "containerStatuses": [
                {"name": "rpc-worker", "state": state, "restartCount": restarts}]}}


def test_a_restarted_or_replaced_worker_changes_the_identity() -> None:
    first = identity([Worker("w-0", _pod("w-0")), Worker("w-1", _pod("w-1"))])
    assert first is not None
    assert identity([Worker("w-0", _pod("w-0")), Worker("w-1", _pod("w-1"))]) == first
    assert identity([Worker("w-0", _pod("w-0", restarts=1)), Worker("w-1", _pod("w-1"))]) != first
    assert identity([Worker("w-0", _pod("w-0", uid="u2")), Worker("w-1", _pod("w-1"))]) != first
    assert identity([Worker("w-0", _pod("w-0")), Worker("w-1", None)]) is None
    assert identity([Worker("w-0", _pod("w-0")), Worker("w-1", _pod("w-1", running=False))]) is None


def test_too_little_worker_memory_says_how_many_workers_would_do() -> None:
    srv = LlamaServer.model_validate(server_body(contextSize=4096, distributed={"workers": 1, "memory": "600Mi"}))
    plan = plan_server(srv, {"qwen": resolved_model(name="qwen", status=STATUS)}, RPC)
    assert isinstance(plan, PlanProblem) and plan.condition == "Fits"
    assert "workers of 600Mi" in plan.message, plan.message


def test_without_an_rpc_image_the_server_is_refused_with_what_to_set() -> None:
    plan = plan_server(_server(), {"qwen": resolved_model(name="qwen", status=STATUS)}, Settings())
    assert isinstance(plan, PlanProblem) and plan.reason == "NoRpcImage"
    assert "GGML_RPC=ON" in plan.message and "rpcImages.cpu" in plan.message


async def test_status_waits_for_the_workers_then_starts_the_leader() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=STATUS))
    body = kube.put(LLAMA_SERVERS, server_body(contextSize=4096, distributed=SPLIT))
    ctx = Context(kube=kube, settings=RPC, record_event=Events())
    status = await reconcile_server(body, ctx)
    assert await kube.get(STATEFUL_SETS, "default", "chat-workers") is not None
    assert await kube.get(DEPLOYMENTS, "default", "chat") is None  # no leader before its workers
    assert status.phase == "Pending" and status.message is not None
    assert status.message.startswith("waiting for the RPC workers: 0/2 running; chat-workers-0: no pod yet")
    assert status.distributed is not None and status.distributed.ready_workers == "0/2"
    for index in range(2):
        kube.put(PODS, _pod(f"chat-workers-{index}", uid=f"u{index}"))
    status = await reconcile_server(body, ctx)
    leader = await kube.get(DEPLOYMENTS, "default", "chat")
    assert leader is not None
    assert status.distributed is not None and status.distributed.ready_workers == "2/2"
    assert [w.layers for w in status.distributed.workers] == [
        int(part) for part in (status.distributed.tensor_split or "").split(",")]
    assert all(w.node == "node-a" and w.ready for w in status.distributed.workers)
    fits = next(c for c in status.conditions or [] if c.type == "Fits")
    assert fits.status == "True" and fits.message.startswith("leader: estimated host memory"), fits.message
    assert f"25 layer slots over 2 workers of 2Gi (--tensor-split {status.distributed.tensor_split}): " \
        in fits.message, fits.message


def test_a_split_scaled_to_zero_stops_its_workers_and_its_leader() -> None:
    plan = _plan(_server(replicas=0), workers=Workers(identity=None))
    workers = plan.find("StatefulSet")
    assert workers is not None and workers["spec"]["replicas"] == 0
    assert plan.deployment["spec"]["replicas"] == 0  # planned although no worker runs: it must go to zero too


def test_gpu_workers_are_filled_to_their_gpu_memory_with_its_context_counted() -> None:
    srv = LlamaServer.model_validate(server_body(contextSize=4096, distributed={
        "workers": 2, "memory": "1Gi", "gpu": {"vendor": "nvidia", "memory": "2Gi"}}))
    plan = _plan(srv, Settings(rpc_images={"cpu": IMAGE, "nvidia": IMAGE + "-cuda"}))
    assert plan.placement is not None
    assert all(worker.overhead >= 768 * 2**20 for worker in plan.placement.workers)  # the GPU's context
    pod = plan.find("StatefulSet")["spec"]["template"]["spec"]  # type: ignore[index]
    assert pod["containers"][0]["image"] == IMAGE + "-cuda"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # without an RPC image for that accelerator: refused, naming the value to set
    refused = plan_server(srv, {"qwen": resolved_model(name="qwen", status=STATUS)}, RPC)
    assert isinstance(refused, PlanProblem) and "rpcImages.nvidia" in refused.message
