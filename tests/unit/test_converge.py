"""Converge without churn: a reconcile that has nothing to change writes nothing (issue 11)."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.config import Settings
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS, PODS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube

READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}]}


def _context(kube: FakeKube) -> Context:
    return Context(kube=kube, settings=Settings(), record_event=Events())


async def _reconcile(kube: FakeKube, ctx: Context) -> None:
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")], ctx)


@pytest.fixture
async def settled() -> tuple[FakeKube, Context]:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_SERVERS, server_body())
    ctx = _context(kube)
    await _reconcile(kube, ctx)
    assert kube.count("apply") == 2 and kube.count("patch_status") == 1  # Deployment + Service, then status
    kube.calls.clear()
    return kube, ctx


async def test_an_unchanged_server_is_not_applied_again(settled: tuple[FakeKube, Context]) -> None:
    kube, ctx = settled
    await _reconcile(kube, ctx)
    assert kube.count("apply") == 0 and kube.count("patch_status") == 0
    assert {c[0] for c in kube.calls} <= {"get", "list"}


async def test_pod_and_deployment_status_events_cost_reads_not_writes(settled: tuple[FakeKube, Context]) -> None:
    kube, ctx = settled
    kube.put(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "chat-1", "labels": {
        "app.kubernetes.io/name": "llama-server", "llamacpp.dev/server": "chat"}}, "status": {"phase": "Pending"}})
    kube.edit("deployments", "chat", lambda d: d.setdefault("status", {}).update(replicas=1), spec=False)
    await _reconcile(kube, ctx)
    assert kube.count("apply") == 0
    assert kube.count("patch_status") == 1  # the status did change: one pod, Pending


@pytest.mark.parametrize("drift", ["spec edited", "label removed", "deleted", "server changed"])
async def test_drift_and_changes_are_applied(settled: tuple[FakeKube, Context], drift: str) -> None:
    kube, ctx = settled

    def edit_spec(dep: dict[str, Any]) -> None:
        dep["spec"]["replicas"] = 5

    def drop_label(dep: dict[str, Any]) -> None:
        del dep["metadata"]["labels"]["app.kubernetes.io/managed-by"]

    if drift == "spec edited":
        kube.edit("deployments", "chat", edit_spec)
    elif drift == "label removed":
        kube.edit("deployments", "chat", drop_label, spec=False)
    elif drift == "deleted":
        del kube.objects[("deployments", "default", "chat")]
    else:
        kube.edit("llamaservers", "chat", lambda s: s["spec"].update(contextSize=4096))
    await _reconcile(kube, ctx)
    assert kube.count("apply", "deployments") == 1 and kube.count("apply", "services") == 0
    dep = kube.objects[("deployments", "default", "chat")]
    assert dep["spec"]["replicas"] == 1 and dep["metadata"]["labels"]["app.kubernetes.io/managed-by"]


async def test_a_restarted_operator_applies_once_then_settles(settled: tuple[FakeKube, Context]) -> None:
    kube, _ = settled
    restarted = FakeKube()
    restarted.objects, restarted._versions = kube.objects, kube._versions  # same cluster, empty memory
    ctx = _context(restarted)
    await _reconcile(restarted, ctx)
    assert restarted.count("apply") == 2  # it cannot know what it applied before; SSA of the same object is a no-op
    versions = {k: v["metadata"]["resourceVersion"] for k, v in restarted.objects.items()}
    restarted.calls.clear()
    await _reconcile(restarted, ctx)
    assert restarted.count("apply") == 0
    assert versions == {k: v["metadata"]["resourceVersion"] for k, v in restarted.objects.items()}


# ------------------------------------------------------------------------------------------------- models

PVC_MODEL = {"source": {"http": {"url": "https://h/m.gguf"}},
             "cache": {"type": "PersistentVolumeClaim", "size": "2Gi"}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """[calls, outcomes]: every network resolution is appended to calls; the next one raises outcomes[0] if any."""
    from llama_operator import sources
    from llama_operator.api.v1beta1 import ModelFile

    calls: list[Any] = []
    outcomes: list[BaseException] = []

    async def resolve(spec: Any, **_: Any) -> sources.ResolvedModel:
        calls.append(spec)
        if outcomes:
            raise outcomes.pop(0)
        return sources.ResolvedModel([ModelFile(name="m.gguf", url="https://h/m.gguf", size=100)], 100, None,
                                     None, sources.cache_key(spec, None))

    monkeypatch.setattr(sources, "resolve", resolve)
    return [calls, outcomes]


async def _model_reconcile(kube: FakeKube, ctx: Context) -> None:
    from llama_operator.reconcile.model import reconcile_model

    await reconcile_model(kube.objects[("llamamodels", "default", "qwen")], ctx)


async def test_model_sources_resolve_once_per_generation_and_when_due(resolver: list[Any]) -> None:
    calls, _ = resolver
    kube, clock = FakeKube(), Clock()
    kube.put(LLAMA_MODELS, model_body("qwen", spec=PVC_MODEL))
    ctx = Context(kube=kube, settings=Settings(model_resync_seconds=3600), record_event=Events(), clock=clock)
    await _model_reconcile(kube, ctx)
    status = kube.objects[("llamamodels", "default", "qwen")]["status"]
    assert status["phase"] == "Ready" and status["lastResolvedTime"] and len(calls) == 1
    kube.calls.clear()

    for _ in range(3):  # cache-PVC events, the resync before it is due, a status echo
        await _model_reconcile(kube, ctx)
    assert len(calls) == 1
    assert kube.count("apply") == 0 and kube.count("patch_status") == 0

    clock.now += 3600  # the periodic re-resolution is due
    await _model_reconcile(kube, ctx)
    assert len(calls) == 2

    kube.edit("llamamodels", "qwen", lambda m: m["spec"].update(sha256="a" * 64))  # a new generation
    await _model_reconcile(kube, ctx)
    assert len(calls) == 3


async def test_a_failed_source_is_not_retried_until_due_or_changed(resolver: list[Any]) -> None:
    from llama_operator.errors import SourceNotFound

    calls, outcomes = resolver
    kube, clock = FakeKube(), Clock()
    kube.put(LLAMA_MODELS, model_body("qwen", spec=PVC_MODEL))
    ctx = Context(kube=kube, settings=Settings(model_resync_seconds=3600), record_event=Events(), clock=clock)
    outcomes.append(SourceNotFound("m.gguf: not found (HTTP 404)"))
    await _model_reconcile(kube, ctx)
    assert kube.objects[("llamamodels", "default", "qwen")]["status"]["phase"] == "Failed"
    await _model_reconcile(kube, ctx)
    assert len(calls) == 1
    clock.now += 3600
    await _model_reconcile(kube, ctx)  # the file may have been uploaded since
    assert len(calls) == 2
    assert kube.objects[("llamamodels", "default", "qwen")]["status"]["phase"] == "Ready"


async def test_an_unreachable_source_is_resolved_again_on_the_retry(resolver: list[Any]) -> None:
    from llama_operator.errors import RetryLater, SourceUnreachable

    calls, outcomes = resolver
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", spec=PVC_MODEL))
    ctx = Context(kube=kube, settings=Settings(), record_event=Events())
    outcomes.append(SourceUnreachable("connection refused"))
    with pytest.raises(RetryLater):
        await _model_reconcile(kube, ctx)
    assert kube.objects[("llamamodels", "default", "qwen")]["status"]["phase"] == "Resolving"
    await _model_reconcile(kube, ctx)
    assert len(calls) == 2
    assert kube.objects[("llamamodels", "default", "qwen")]["status"]["phase"] == "Ready"


async def test_own_cache_pvc_writes_do_not_wake_the_model_reconcile(resolver: list[Any]) -> None:
    import kopf

    from llama_operator import handlers

    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", spec=PVC_MODEL))
    runtime = handlers.Runtime(Context(kube=kube, settings=Settings(), record_event=Events()))
    memo = kopf.Memo(runtime=runtime)
    try:
        await runtime.reconcile_model("default", "qwen")
        pvc = kube.objects[("persistentvolumeclaims", "default", "qwen-cache")]
        kube.calls.clear()
        labels = pvc["metadata"]["labels"]
        # the watch echo of our own apply: nothing at all happens
        await handlers.cache_pvc_event(type="ADDED", name="qwen-cache", namespace="default", labels=labels,
                                       meta=pvc["metadata"], memo=memo)
        assert kube.calls == []
        # someone else changed it (the PV controller binding it): one reconcile, reads only, no resolution
        kube.edit("persistentvolumeclaims", "qwen-cache", lambda p: p.setdefault("status", {}).update(
            phase="Bound"), spec=False)
        pvc = kube.objects[("persistentvolumeclaims", "default", "qwen-cache")]
        await handlers.cache_pvc_event(type="MODIFIED", name="qwen-cache", namespace="default", labels=labels,
                                       meta=pvc["metadata"], memo=memo)
        assert kube.count("get", "llamamodels") == 1 and kube.count("apply") == 0
        assert len(resolver[0]) == 1  # resolved once, at the start
    finally:
        runtime.close()
