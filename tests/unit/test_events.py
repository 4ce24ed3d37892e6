"""Each phase change of a LlamaServer, and each failure, posts the Event `kubectl describe` shows, once.

The fleet is driven the way a kubelet would drive it: the pod's init container runs (Downloading), llama-server
starts (Loading), answers /health (Ready), then crash-loops (Failed).
"""

from __future__ import annotations

from typing import Any

from llama_operator.config import Settings
from llama_operator.kube import DEPLOYMENTS, LLAMA_MODELS, LLAMA_SERVERS, PODS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube

READY_MODEL = {"phase": "Ready", "cacheKey": "qwen-0123456789ab", "files": [{"name": "m.gguf"}]}


def _pod(init: dict[str, Any], main: dict[str, Any] | None = None) -> dict[str, Any]:
    statuses = [{"name": "fetch-model", "state": init}]
    containers = [] if main is None else [{"name": "llama-server", **main}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "chat-abc", "labels": {
        "app.kubernetes.io/name": "llama-server", "llamacpp.dev/server": "chat"}},
        "status": {"phase": "Pending" if main is None else "Running", "initContainerStatuses": statuses,
                   "containerStatuses": containers}}


async def _reconcile(kube: FakeKube, ctx: Context) -> str:
    body = kube.objects[("llamaservers", "default", "chat")]
    status = await reconcile_server(body, ctx)
    return str(status.phase)


async def test_every_phase_change_and_failure_posts_one_event() -> None:
    kube = FakeKube()
    events = Events()
    ctx = Context(kube=kube, settings=Settings(), record_event=events)
    kube.put(LLAMA_SERVERS, server_body())

    assert await _reconcile(kube, ctx) == "Pending"  # no LlamaModel yet
    kube.put(LLAMA_MODELS, model_body(status=READY_MODEL))
    assert await _reconcile(kube, ctx) == "Pending"  # waiting for pods: the message changed, the phase did not
    done = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    steps: list[tuple[dict[str, Any], str]] = [
        (_pod({"running": {}}), "Downloading"),
        (_pod(done, {"state": {"running": {}}, "ready": False}), "Loading"),
        (_pod(done, {"state": {"running": {}}, "ready": True}), "Ready"),
        (_pod(done, {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "ready": False, "lastState": {
            "terminated": {"exitCode": 1, "message": "error: invalid argument: --bogus"}}}), "Failed"),
    ]
    for pod, phase in steps:
        kube.put(PODS, pod)
        ready = 1 if phase == "Ready" else 0
        kube.edit("deployments", "chat", lambda d, r=ready: d.update(status={  # type: ignore[misc]
            "replicas": 1, "readyReplicas": r, "updatedReplicas": 1}), spec=False)
        assert await _reconcile(kube, ctx) == phase
        assert await _reconcile(kube, ctx) == phase  # nothing new: no second Event
    assert [(kind, reason) for _, kind, reason, _ in events] == [
        ("Normal", "Pending"), ("Normal", "Pending"), ("Normal", "Downloading"), ("Normal", "Loading"),
        ("Normal", "Ready"), ("Warning", "Failed")]
    messages = {reason: message for _, _, reason, message in events}
    assert "LlamaModel default/qwen not found" in events[0][3]
    assert "downloading the model" in messages["Downloading"]
    assert "exited with code 1: error: invalid argument: --bogus" in messages["Failed"]
    assert (DEPLOYMENTS.plural, "default", "chat") in kube.objects


async def test_an_oom_kill_turns_fits_false_with_the_limit_and_posts_one_warning() -> None:
    kube = FakeKube()
    events = Events()
    ctx = Context(kube=kube, settings=Settings(), record_event=events)
    kube.put(LLAMA_SERVERS, server_body())
    kube.put(LLAMA_MODELS, model_body(status=READY_MODEL))
    await _reconcile(kube, ctx)
    done = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    killed = _pod(done, {"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "ready": False, "lastState": {
        "terminated": {"exitCode": 137, "reason": "OOMKilled"}}})
    killed["spec"] = {"containers": [{"name": "llama-server", "resources": {"limits": {"memory": "64Mi"}}}]}
    kube.put(PODS, killed)
    assert await _reconcile(kube, ctx) == "Failed"
    assert await _reconcile(kube, ctx) == "Failed"
    status = kube.objects[("llamaservers", "default", "chat")]["status"]
    fits = next(c for c in status["conditions"] if c["type"] == "Fits")
    assert (fits["status"], fits["reason"]) == ("False", "OOMKilled")
    assert "OOM-killed at its memory limit 64Mi in pod chat-abc" in fits["message"]
    assert "exited with code 137: OOMKilled" in status["message"] and "64Mi" in status["message"]
    warnings = [(reason, message) for _, kind, reason, message in events if kind == "Warning"]
    assert [reason for reason, _ in warnings] == ["Failed", "OOMKilled"]
