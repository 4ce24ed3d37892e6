"""A server's reconcile reads what the watches hold (reconcile/watched.py), not the API server: its Deployment,
Service, pods and LlamaModel come from kopf's indexes, and an object its plan no longer wants, once seen absent,
is not read again. The reconcile is the same one either way: the status it writes is the same."""

from __future__ import annotations

import copy
from typing import Any

from llama_operator.config import Settings
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS, PODS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube
from tests.watch_cache import watched_over

READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}], "sha256": "a" * 64}


def _cluster() -> FakeKube:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_SERVERS, server_body())
    return kube


def _pod(kube: FakeKube, ready: bool) -> None:
    deployment = kube.objects[("deployments", "default", "chat")]
    labels = deployment["spec"]["selector"]["matchLabels"]
    kube.put(PODS, {"metadata": {"name": "chat-1", "namespace": "default", "labels": dict(labels)},
                    "spec": copy.deepcopy(deployment["spec"]["template"]["spec"]),
                    "status": {"phase": "Running", "containerStatuses": [
                        {"name": "llama-server", "ready": ready, "state": {"running": {}}}]}})
    kube.objects[("deployments", "default", "chat")]["status"] = {"replicas": 1, "readyReplicas": int(ready),
                                                                 "updatedReplicas": 1}


async def _reconcile(kube: FakeKube, *, watched: bool) -> dict[str, Any]:
    ctx = Context(kube=kube, settings=Settings(), record_event=Events(),  # type: ignore[arg-type]
                  **({"watched": watched_over(kube)} if watched else {}))
    status = await reconcile_server(copy.deepcopy(kube.objects[("llamaservers", "default", "chat")]), ctx)
    return status.to_wire()


def _reads(kube: FakeKube) -> list[tuple[str, str | None]]:
    return [(verb, plural) for verb, plural, _, _ in kube.calls if verb in ("get", "list")]


async def test_a_pod_event_costs_no_read_when_the_watches_hold_the_objects() -> None:
    kube = _cluster()
    await _reconcile(kube, watched=True)  # creates the Deployment and Service; sees no PDB, no NetworkPolicy
    _pod(kube, ready=False)
    kube.calls.clear()
    status = await _reconcile(kube, watched=True)  # what a pod event triggers
    assert status["phase"] == "Loading"
    assert _reads(kube) == []
    assert [verb for verb, *_ in kube.calls] == ["patch_status"]  # nothing applied again: nothing changed


async def test_without_a_watch_the_same_reconcile_reads_the_api_server_and_writes_the_same_status() -> None:
    cached, direct = _cluster(), _cluster()
    for kube in (cached, direct):
        await _reconcile(kube, watched=kube is cached)
        _pod(kube, ready=True)
        kube.calls.clear()
    from_watch = await _reconcile(cached, watched=True)
    from_api = await _reconcile(direct, watched=False)
    assert from_watch["phase"] == from_api["phase"] == "Ready"
    assert from_watch == from_api
    assert ("list", "pods") in _reads(direct) and ("get", "deployments") in _reads(direct)


async def test_a_deployment_changed_by_someone_else_is_applied_again() -> None:
    kube = _cluster()
    await _reconcile(kube, watched=True)
    kube.edit("deployments", "chat", lambda d: d["spec"].update(replicas=5))  # drift: a new generation
    kube.calls.clear()
    await _reconcile(kube, watched=True)
    assert ("apply", "deployments") in [(verb, plural) for verb, plural, _, _ in kube.calls]
    assert kube.objects[("deployments", "default", "chat")]["spec"]["replicas"] == 1


async def test_a_budget_no_longer_wanted_is_deleted_and_then_not_read_again() -> None:
    kube = _cluster()
    kube.edit("llamaservers", "chat", lambda s: s["spec"].update(replicas=2))
    await _reconcile(kube, watched=True)
    assert ("poddisruptionbudgets", "default", "chat") in kube.objects
    kube.edit("llamaservers", "chat", lambda s: s["spec"].update(replicas=1))
    await _reconcile(kube, watched=True)
    assert ("poddisruptionbudgets", "default", "chat") not in kube.objects
    kube.calls.clear()
    await _reconcile(kube, watched=True)
    assert ("get", "poddisruptionbudgets") not in _reads(kube)
