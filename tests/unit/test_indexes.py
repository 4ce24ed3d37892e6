"""reconcile/indexes.py and watched.py: what the watch caches keep per object (only what the loops read) and how
the loops read them (copies, so a watch event mid-round changes nothing under them)."""

from __future__ import annotations

import sys
from typing import Any

from llama_operator.api.v1beta1 import LlamaModel
from llama_operator.config import Settings
from llama_operator.kube import DEPLOYMENTS, LLAMA_MODELS, LLAMA_SERVERS, PODS, SERVICES
from llama_operator.reconcile import indexes
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.runtime import Runtime
from llama_operator.reconcile.server_status import fleet_status
from llama_operator.reconcile.watched import MODEL_KEYS, READY_PODS, ROUTERS, SERVER_KEYS, Watched
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube
from tests.watch_cache import index_of, watched_over

ROUTER_SPEC = {"models": [{"modelRef": {"name": "alpha"}}], "maxLoaded": 1}


def _bulky(body: dict[str, Any]) -> dict[str, Any]:
    """A body as the API server sends it: managedFields, annotations, a long status the loops never read."""
    body["metadata"].update(managedFields=[{"manager": "x" * 2000}], annotations={"note": "y" * 2000})
    body["status"] = {**(body.get("status") or {}), "conditions": [{"type": "Ready", "message": "z" * 2000}]}
    return body


def _pod(name: str, server: str, *, ready: bool, ip: str = "10.0.0.7", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default",
                         "labels": {"app.kubernetes.io/name": "llama-server", "llamacpp.dev/server": server, **labels}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_the_key_indexes_hold_names_only() -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, _bulky(server_body("b")))
    kube.put(LLAMA_SERVERS, _bulky(server_body("a")))
    kube.put(LLAMA_MODELS, _bulky(model_body("m")))
    watched = watched_over(kube)
    assert watched.keys("llamaservers") == [("default", "a"), ("default", "b")]
    assert watched.keys("llamamodels") == [("default", "m")]
    assert index_of(("llamaservers",), indexes.llama_server_keys, lambda _: True, kube.objects) == {
        "default": ["a", "b"]}


def test_the_router_index_keeps_spec_and_the_pollers_status_fields_only() -> None:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, server_body("plain"))  # not router mode, no models in status: not indexed
    router = server_body("fleet")
    router["spec"] = dict(ROUTER_SPEC)
    router = _bulky(router)
    router["status"].update(models=[{"name": "alpha", "model": "alpha", "state": "Loaded"}], modelsLoaded="1/1")
    kube.put(LLAMA_SERVERS, router)
    left = server_body("left")  # left router mode: its status.models is still to be cleared by the poller
    left["status"] = {"models": [], "phase": "Ready"}
    kube.put(LLAMA_SERVERS, left)
    bodies = watched_over(kube).routers()
    assert [b["metadata"] for b in bodies] == [{"namespace": "default", "name": "fleet"},
                                               {"namespace": "default", "name": "left"}]
    assert bodies[0]["status"] == {"models": [{"name": "alpha", "model": "alpha", "state": "Loaded"}],
                                   "modelsLoaded": "1/1"}
    assert bodies[1]["status"] == {"models": []}
    assert bodies[0]["spec"]["models"] == ROUTER_SPEC["models"]
    # Nothing of the bulk the API server sent: the index is a small fraction of the body.
    assert len(repr(bodies[0])) < len(repr(router)) / 10


def test_the_model_index_keeps_all_but_conditions_and_bookkeeping() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, _bulky(model_body("alpha", status={"phase": "Ready", "gguf": {"architecture": "llama"},
                                                             "files": [{"name": "m.gguf"}] * 50})))
    kube.put(LLAMA_MODELS, {**model_body("other"), "metadata": {"name": "other", "namespace": "elsewhere"}})
    [body] = watched_over(kube).models("default")
    assert body["status"] == {"phase": "Ready", "gguf": {"architecture": "llama"}, "files": [{"name": "m.gguf"}] * 50}
    assert "managedFields" not in body["metadata"] and body["metadata"]["name"] == "alpha"
    assert watched_over(kube).model("default", "alpha") == body
    assert watched_over(kube).model("default", "nobody") is None
    # What a server's reconcile resolves from it parses as the LlamaModel the API server holds.
    model = LlamaModel.model_validate(body)
    assert model.status.phase == "Ready" and [f.name for f in model.status.files or []] == ["m.gguf"] * 50
    assert [b["metadata"]["name"] for b in watched_over(kube).models("elsewhere")] == ["other"]


def _owned(kind: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1" if kind == "Deployment" else "v1", "kind": kind,
            "metadata": {"name": name, "namespace": "default", "uid": "u-" + name, "generation": 3,
                         "resourceVersion": "41", "labels": {"app.kubernetes.io/managed-by": "llama-operator",
                                                             "llamacpp.dev/server": name},
                         "ownerReferences": [{"uid": "s-" + name}]}, **extra}


def test_the_owned_index_keeps_what_an_apply_compares_and_a_status_reads() -> None:
    kube = FakeKube()
    deployment = _bulky(_owned("Deployment", "chat", spec={"replicas": 2, "strategy": {"type": "Recreate"},
                                                           "template": {"spec": {"containers": [
                                                               {"name": "c", "image": "i:1", "x": "y" * 5000}]}}},
                               status={"readyReplicas": 1}))
    kube.put(DEPLOYMENTS, deployment)
    kube.put(SERVICES, _bulky(_owned("Service", "chat", spec={"ports": [{"port": 8080}]})))
    foreign = _owned("Service", "theirs")
    foreign["metadata"]["labels"] = {"llamacpp.dev/server": "theirs"}  # not made by us: not watched
    kube.put(SERVICES, foreign)
    watched = watched_over(kube)
    live = watched.owned("deployments", "default", "chat")
    assert live is not None
    # of the pod template, only each container's name and image (the helper image a pod keeps)
    assert live["spec"] == {"replicas": 2, "strategy": {"type": "Recreate"}, "template": {"spec": {
        "initContainers": [], "containers": [{"name": "c", "image": "i:1"}]}}}
    assert live["status"]["readyReplicas"] == 1
    stored = kube.objects[("deployments", "default", "chat")]["metadata"]
    assert {k: live["metadata"][k] for k in ("uid", "generation", "resourceVersion", "ownerReferences")} == {
        k: stored[k] for k in ("uid", "generation", "resourceVersion", "ownerReferences")}
    assert "managedFields" not in live["metadata"] and len(repr(live)) < len(repr(deployment)) / 2
    service = watched.owned("services", "default", "chat")
    assert service is not None and "spec" not in service
    assert watched.owned("services", "default", "theirs") is None
    live["metadata"]["labels"].clear()  # a copy: the index is untouched
    assert watched.owned("deployments", "default", "chat")["metadata"]["labels"]  # type: ignore[index]


def test_the_server_pod_index_keeps_what_the_fleet_status_reads() -> None:
    kube = FakeKube()
    pod = _pod("fleet-b", "fleet", ready=True)
    pod["spec"] = {"containers": [{"name": "llama-server", "image": "x", "resources": {"limits": {
        "memory": "1Gi", "cpu": "2"}}, "env": [{"name": "A", "value": "z" * 3000}]}],
        "initContainers": [{"name": "fetch-model", "args": ["fetch", "--cache-key", "k"], "image": "y"}]}
    pod["status"]["initContainerStatuses"] = [{"name": "fetch-model", "state": {"running": {}}}]
    kube.put(PODS, pod)
    kube.put(PODS, _pod("fleet-a", "fleet", ready=False))
    other = _pod("fetch-fleet", "fleet", ready=True)  # the server's label, not its Deployment's selector
    other["metadata"]["labels"]["app.kubernetes.io/name"] = "fetcher"
    kube.put(PODS, other)
    pods = watched_over(kube).server_pods("default", "fleet")
    assert [p["metadata"]["name"] for p in pods] == ["fleet-a", "fleet-b"]
    assert pods[1]["spec"] == {"containers": [{"name": "llama-server", "resources": {"limits": {"memory": "1Gi"}}}],
                               "initContainers": [{"name": "fetch-model", "args": ["fetch", "--cache-key", "k"]}]}
    assert pods[1]["status"] == pod["status"]
    assert fleet_status(1, None, pods) == fleet_status(1, None, [kube.objects[("pods", "default", n)]
                                                                 for n in ("fleet-a", "fleet-b")])


def test_the_pod_index_holds_ready_pods_of_the_servers_deployment_only() -> None:
    kube = FakeKube()
    kube.put(PODS, _pod("fleet-b", "fleet", ready=True, ip="10.0.0.2"))
    kube.put(PODS, _pod("fleet-a", "fleet", ready=True, ip="10.0.0.1"))
    kube.put(PODS, _pod("fleet-c", "fleet", ready=False))  # not ready: not asked
    terminating = _pod("fleet-d", "fleet", ready=True)
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    kube.put(PODS, terminating)
    other = _pod("fetch-fleet", "fleet", ready=True)  # the server's label, not its Deployment's selector
    other["metadata"]["labels"]["app.kubernetes.io/name"] = "fetcher"
    kube.put(PODS, other)
    watched = watched_over(kube)
    assert watched.ready_pods("default", "fleet") == [("fleet-a", "10.0.0.1"), ("fleet-b", "10.0.0.2")]
    assert watched.ready_pods("default", "nobody") == []


def test_reads_are_copies_taken_before_any_await() -> None:
    live: dict[str, Any] = {SERVER_KEYS: {"default": ["a", "b"]}, MODEL_KEYS: {}, ROUTERS: {},
                            READY_PODS: {("default", "s"): [("p", "10.0.0.1")]}}
    watched = Watched(live)
    keys = watched.keys("llamaservers")
    pods = watched.ready_pods("default", "s")
    live[SERVER_KEYS]["default"].append("c")  # a watch event after the read
    live[READY_PODS][("default", "s")].clear()
    assert keys == [("default", "a"), ("default", "b")] and pods == [("p", "10.0.0.1")]
    assert watched.keys("llamaservers")[-1] == ("default", "c")  # the next read sees it


def test_unattached_reads_are_empty_and_the_first_index_call_attaches_the_runtime() -> None:
    runtime = Runtime(Context(kube=FakeKube(), settings=Settings(), record_event=Events()))  # type: ignore[arg-type]
    watched = runtime.ctx.watched
    assert not watched.attached and watched.keys("llamaservers") == [] and watched.routers() == []
    live = {SERVER_KEYS: {"default": ["a"]}, "some_other_index": {}}
    assert indexes.llama_server_keys(namespace="default", name="a", memo={"runtime": runtime}, **live) == \
        {"default": "a"}
    assert watched.attached and watched.keys("llamaservers") == [("default", "a")]
    indexes.llama_model_keys(namespace="default", name="m", memo={"runtime": runtime}, **{SERVER_KEYS: {}})
    assert watched.keys("llamaservers") == [("default", "a")]  # attached once: kopf's indexes live on
    # A handler called before the Runtime exists (or in a test without one) attaches nothing and still indexes.
    assert indexes.llama_model_keys(namespace="default", name="m", memo={}) == {"default": "m"}


def test_an_index_entry_is_small() -> None:
    """What one LlamaServer costs in the key index, the sizes the docs' memory-per-server figure rests on."""
    entry = indexes.llama_server_keys(namespace="default", name="server-0001", memo={})
    assert sum(sys.getsizeof(x) for x in (*entry, *entry.values())) < 200


def test_the_worker_index_holds_a_split_servers_rpc_workers_only() -> None:
    kube = FakeKube()
    worker = _pod("fleet-workers-0", "fleet", ready=True)
    worker["metadata"]["labels"]["app.kubernetes.io/name"] = "llama-rpc-worker"
    worker["spec"] = {"nodeName": "node-a", "containers": [{"name": "rpc-worker"}]}
    kube.put(PODS, worker)
    kube.put(PODS, _pod("fleet-leader", "fleet", ready=True))  # the leader: the server's pods, not a worker
    watched = watched_over(kube)
    assert [p["metadata"]["name"] for p in watched.worker_pods("default", "fleet")] == ["fleet-workers-0"]
    assert watched.worker_pods("default", "fleet")[0]["spec"]["nodeName"] == "node-a"
    assert [p["metadata"]["name"] for p in watched.server_pods("default", "fleet")] == ["fleet-leader"]
