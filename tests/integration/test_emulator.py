"""Proves the API emulator against its two real clients: the `kubernetes` client and a kopf operator."""

from __future__ import annotations

import asyncio
import json
import pathlib
import textwrap
import time
import urllib.error
import urllib.request
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from llama_operator.emulator import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, EmulatorThread, patches

pytestmark = pytest.mark.integration

NS = "default"


def call(api: kubernetes.client.ApiClient, method: str, path: str, body: Any = None, *,
         content_type: str = "application/json", query: list[tuple[str, str]] | None = None) -> Any:
    """A raw API call through the kubernetes client, the way llama_operator.kube makes them."""
    headers = {"Accept": "application/json", "Content-Type": content_type}
    _, url, headers, body, _ = api.param_serialize(method=method, resource_path=path, query_params=query or [],
                                                header_params=headers, body=body, auth_settings=["BearerToken"])
    response = api.call_api(method, url, header_params=headers, body=body, _request_timeout=10)
    data = response.read()
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=response.reason, body=data.decode())
    return json.loads(data) if data else None


def deployment(name: str, replicas: int = 1, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
    }


DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"


def test_create_get_list_with_selectors(k8s_api: kubernetes.client.ApiClient) -> None:
    apps = kubernetes.client.AppsV1Api(k8s_api)
    created = call(k8s_api, "POST", DEPLOYMENTS, deployment("a", labels={"tier": "web"}))
    call(k8s_api, "POST", DEPLOYMENTS, deployment("b", labels={"tier": "db"}))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert meta["namespace"] == NS  # taken from the URL

    got = apps.read_namespaced_deployment("a", NS)
    assert got.metadata.uid == meta["uid"] and got.spec.replicas == 1

    with pytest.raises(ApiException) as exc:
        call(k8s_api, "POST", DEPLOYMENTS, deployment("a"))
    assert exc.value.status == 409 and json.loads(exc.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(ApiException) as exc:
        apps.read_namespaced_deployment("missing", NS)
    assert exc.value.status == 404 and json.loads(exc.value.body)["kind"] == "Status"

    def names(selector: str) -> list[str]:
        return [d.metadata.name for d in apps.list_namespaced_deployment(NS, label_selector=selector).items]

    assert names("tier=web") == ["a"]
    assert names("tier!=web") == ["b"]
    assert names("tier in (web,db)") == ["a", "b"]
    assert names("tier notin (web)") == ["b"]
    assert names("tier") == ["a", "b"] and names("!tier") == []
    listed = call(k8s_api, "GET", DEPLOYMENTS, query=[("fieldSelector", "metadata.name=b")])
    assert [d["metadata"]["name"] for d in listed["items"]] == ["b"]
    assert int(listed["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])
    assert apps.list_deployment_for_all_namespaces().items  # cluster-wide list


def test_patches_generation_and_status(k8s_api: kubernetes.client.ApiClient) -> None:
    call(k8s_api, "POST", DEPLOYMENTS, deployment("web"))
    url = f"{DEPLOYMENTS}/web"

    merged = call(k8s_api, "PATCH", url, {"metadata": {"labels": {"x": "1"}}}, content_type=MERGE_PATCH)
    assert merged["metadata"]["generation"] == 1  # metadata only
    merged = call(k8s_api, "PATCH", url, {"spec": {"replicas": 3}, "status": {"replicas": 99}},
                  content_type=MERGE_PATCH)
    assert merged["metadata"]["generation"] == 2 and merged["spec"]["replicas"] == 3
    assert "status" not in merged  # the main resource never writes the status subresource
    merged = call(k8s_api, "PATCH", url, {"metadata": {"labels": {"x": None}}}, content_type=MERGE_PATCH)
    assert "x" not in merged["metadata"]["labels"]

    rv = merged["metadata"]["resourceVersion"]
    patched = call(k8s_api, "PATCH", url, [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
    ], content_type=JSON_PATCH)
    assert patched["metadata"]["finalizers"] == ["x/y"]
    assert int(patched["metadata"]["resourceVersion"]) > int(rv)
    with pytest.raises(ApiException) as exc:  # a stale `test` is a conflict kopf retries, not a 500
        call(k8s_api, "PATCH", url, [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}],
             content_type=JSON_PATCH)
    assert exc.value.status == 422

    status = call(k8s_api, "PATCH", f"{url}/status", {"status": {"readyReplicas": 3}, "spec": {"replicas": 7}},
                  content_type=MERGE_PATCH)
    assert status["status"] == {"readyReplicas": 3}
    assert status["spec"]["replicas"] == 3 and status["metadata"]["generation"] == 2

    scale = call(k8s_api, "PATCH", f"{url}/scale", {"spec": {"replicas": 5}}, content_type=MERGE_PATCH)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 5

    # PUT with a stale resourceVersion conflicts; with none it replaces (status kept as it was).
    current = call(k8s_api, "GET", url)
    stale = dict(current, metadata=dict(current["metadata"], resourceVersion=rv))
    with pytest.raises(ApiException) as exc:
        call(k8s_api, "PUT", url, stale)
    assert exc.value.status == 409
    replaced = call(k8s_api, "PUT", url, dict(current, spec=dict(current["spec"], replicas=2)))
    assert replaced["spec"]["replicas"] == 2 and replaced["status"] == {"readyReplicas": 3}


def test_server_side_apply_creates_then_updates(k8s_api: kubernetes.client.ApiClient) -> None:
    url = f"/api/v1/namespaces/{NS}/configmaps/cfg"
    query = [("fieldManager", "llama-operator"), ("force", "true")]
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "labels": {"a": "1"}},
            "data": {"one": "1", "two": "2"}}
    created = call(k8s_api, "PATCH", url, body, content_type=APPLY_PATCH, query=query)
    assert created["data"] == {"one": "1", "two": "2"} and created["metadata"]["uid"]

    call(k8s_api, "PATCH", url, {"metadata": {"labels": {"other": "x"}}}, content_type=MERGE_PATCH)
    body["data"] = {"one": "1"}  # dropping a field this manager applied removes it
    updated = call(k8s_api, "PATCH", url, body, content_type=APPLY_PATCH, query=query)
    assert updated["data"] == {"one": "1"}
    assert updated["metadata"]["labels"] == {"a": "1", "other": "x"}  # other writers' fields stay
    with pytest.raises(ApiException) as exc:
        call(k8s_api, "PATCH", url, body, content_type=APPLY_PATCH)
    assert exc.value.status == 400  # fieldManager is required for apply


def test_delete_with_finalizers_and_garbage_collection(k8s_api: kubernetes.client.ApiClient,
                                                       apiserver: EmulatorThread) -> None:
    core = kubernetes.client.CoreV1Api(k8s_api)
    owner = call(k8s_api, "POST", DEPLOYMENTS, deployment("owner"))
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner", "uid": owner["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    for name in ("child", "grandchild"):
        refs = [ref] if name == "child" else [{**ref, "kind": "ConfigMap", "name": "child",
                                                "uid": apiserver.read("v1", "configmaps", NS, "child")
                                                ["metadata"]["uid"]}]
        core.create_namespaced_config_map(NS, {"metadata": {"name": name, "ownerReferences": refs}})
    core.create_namespaced_config_map(NS, {"metadata": {"name": "held", "finalizers": ["test/hold"],
                                                        "ownerReferences": [ref]}})

    call(k8s_api, "DELETE", f"{DEPLOYMENTS}/owner")
    assert apiserver.read("apps/v1", "deployments", NS, "owner") is None
    assert apiserver.read("v1", "configmaps", NS, "child") is None
    assert apiserver.read("v1", "configmaps", NS, "grandchild") is None  # cascades
    held = apiserver.read("v1", "configmaps", NS, "held")
    assert held is not None and held["metadata"]["deletionTimestamp"]  # waits for its finalizer
    apiserver.patch("v1", "configmaps", NS, "held", {"metadata": {"finalizers": None}})
    assert apiserver.read("v1", "configmaps", NS, "held") is None


def test_watch_resumes_from_resource_version(apiserver: EmulatorThread, kubeconfig: pathlib.Path) -> None:
    apiserver.create("v1", "configmaps", NS, {"metadata": {"name": "before", "labels": {"w": "1"}}})
    listed = json.load(urllib.request.urlopen(f"{apiserver.url}/api/v1/namespaces/{NS}/configmaps"))
    rv = listed["metadata"]["resourceVersion"]
    apiserver.create("v1", "configmaps", NS, {"metadata": {"name": "after", "labels": {"w": "1"}}})
    apiserver.create("v1", "configmaps", NS, {"metadata": {"name": "unlabelled"}})
    apiserver.patch("v1", "configmaps", NS, "before", {"data": {"k": "v"}})
    apiserver.delete("v1", "configmaps", NS, "after")

    url = (f"{apiserver.url}/api/v1/namespaces/{NS}/configmaps?watch=true&resourceVersion={rv}"
           f"&labelSelector=w%3D1&timeoutSeconds=1")
    started = time.monotonic()
    lines = urllib.request.urlopen(url).read().decode().splitlines()
    assert time.monotonic() - started < 5  # timeoutSeconds ended the stream
    events = [(e["type"], e["object"]["metadata"]["name"]) for e in map(json.loads, lines)]
    assert events == [("ADDED", "after"), ("MODIFIED", "before"), ("DELETED", "after")]

    fresh = urllib.request.urlopen(f"{apiserver.url}/api/v1/namespaces/{NS}/configmaps?watch=true"
                                   "&timeoutSeconds=1").read().decode().splitlines()
    assert sorted(json.loads(line)["object"]["metadata"]["name"] for line in fresh) == ["before", "unlabelled"]


OPERATOR = '''
import pathlib

import kopf
import kubernetes

LOG = pathlib.Path({log!r})


def record(event: str, name: str) -> None:
    with LOG.open("a") as f:
        f.write(f"{{event}} {{name}}\\n")


@kopf.on.create("llamacpp.dev", "v1alpha1", "llamamodels")
def created(name, namespace, patch, **_):
    record("create", name)
    child = {{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {{"name": f"{{name}}-child"}}, "data": {{}}}}
    kopf.adopt(child)
    kubernetes.config.load_kube_config()
    with kubernetes.client.ApiClient() as api:
        kubernetes.client.CoreV1Api(api).create_namespaced_config_map(namespace, child)
    patch.status["phase"] = "Ready"


@kopf.on.update("llamacpp.dev", "v1alpha1", "llamamodels")
def updated(name, **_):
    record("update", name)
'''


def model(name: str) -> dict[str, Any]:
    return {"apiVersion": "llamacpp.dev/v1alpha1", "kind": "LlamaModel", "metadata": {"name": name},
            "spec": {"source": {"http": {"url": "https://example.com/m.gguf"}}}}


def test_kopf_operator_against_the_emulator(apiserver: EmulatorThread, run_operator: Any,
                                            tmp_path: pathlib.Path) -> None:
    log = tmp_path / "handled.log"
    log.touch()
    module = tmp_path / "tiny_operator.py"
    module.write_text(textwrap.dedent(OPERATOR.format(log=str(log))))

    def handled() -> list[str]:
        return log.read_text().splitlines()

    def model_status(name: str) -> Any:
        obj = apiserver.read("llamacpp.dev/v1alpha1", "llamamodels", NS, name)
        return obj and obj.get("status", {}).get("phase")

    with run_operator(module):
        apiserver.create("llamacpp.dev/v1alpha1", "llamamodels", NS, model("m1"))
        apiserver.wait_for(lambda: model_status("m1") == "Ready", message="the create handler")
        parent = apiserver.read("llamacpp.dev/v1alpha1", "llamamodels", NS, "m1")
        child = apiserver.read("v1", "configmaps", NS, "m1-child")
        assert child is not None
        assert child["metadata"]["ownerReferences"][0]["uid"] == parent["metadata"]["uid"]

        apiserver.patch("llamacpp.dev/v1alpha1", "llamamodels", NS, "m1", {"spec": {"sha256": "0" * 64}})
        apiserver.wait_for(lambda: "update m1" in handled(), message="the update handler")
        # kopf records the handled spec (an annotation patch) just after the handler returns: wait for that.
        settled = apiserver.wait_for(
            lambda: "0" * 64 in json.dumps(apiserver.read("llamacpp.dev/v1alpha1", "llamamodels", NS, "m1")
                                           .get("metadata", {}).get("annotations", {}))
            and apiserver.read("llamacpp.dev/v1alpha1", "llamamodels", NS, "m1"),
            message="kopf's last-handled annotation")
        time.sleep(1.5)  # no handling loop: nothing writes the object again
        assert apiserver.read("llamacpp.dev/v1alpha1", "llamamodels", NS, "m1") == settled
        assert handled() == ["create m1", "update m1"]

    # A restarted operator finds kopf's annotations and does not handle m1 again.
    with run_operator(module):
        apiserver.create("llamacpp.dev/v1alpha1", "llamamodels", NS, model("m2"))
        apiserver.wait_for(lambda: model_status("m2") == "Ready", message="m2 handled after restart")
        time.sleep(1.0)
        assert handled() == ["create m1", "update m1", "create m2"]

        apiserver.delete("llamacpp.dev/v1alpha1", "llamamodels", NS, "m1")
        apiserver.wait_for(lambda: apiserver.read("v1", "configmaps", NS, "m1-child") is None,
                           message="the child garbage-collected")
        assert apiserver.read("v1", "configmaps", NS, "m2-child") is not None


@pytest.mark.parametrize(("ops", "expected"), [
    ([{"op": "add", "path": "/a/-", "value": 3}], {"a": [1, 2, 3], "b": {"c~/": 1}}),
    ([{"op": "add", "path": "/a/0", "value": 0}], {"a": [0, 1, 2], "b": {"c~/": 1}}),
    ([{"op": "remove", "path": "/b/c~0~1"}], {"a": [1, 2], "b": {}}),
    ([{"op": "replace", "path": "/a/1", "value": 9}], {"a": [1, 9], "b": {"c~/": 1}}),
    ([{"op": "move", "from": "/b", "path": "/d"}], {"a": [1, 2], "d": {"c~/": 1}}),
    ([{"op": "copy", "from": "/a/0", "path": "/e"}], {"a": [1, 2], "b": {"c~/": 1}, "e": 1}),
    ([{"op": "test", "path": "/a", "value": [1, 2]}], {"a": [1, 2], "b": {"c~/": 1}}),
])
def test_json_patch_operations(ops: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    assert patches.json_patch({"a": [1, 2], "b": {"c~/": 1}}, ops) == expected


@pytest.mark.parametrize("ops", [
    [{"op": "test", "path": "/a", "value": 1}],
    [{"op": "test", "path": "/missing", "value": 1}],
    [{"op": "remove", "path": "/missing"}],
    [{"op": "replace", "path": "/a/5", "value": 1}],
])
def test_json_patch_failures_are_patch_errors(ops: list[dict[str, Any]]) -> None:
    with pytest.raises(patches.PatchError):
        patches.json_patch({"a": [1, 2]}, ops)


def test_selector_errors_answer_400(apiserver: EmulatorThread) -> None:
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{apiserver.url}/api/v1/configmaps?labelSelector=a%20in%20b")
    assert exc.value.code == 400 and json.load(exc.value)["kind"] == "Status"


async def test_async_tests_run_the_operator_through_threads(apiserver: EmulatorThread, run_operator: Any,
                                                            tmp_path: pathlib.Path) -> None:
    log = tmp_path / "handled.log"
    module = tmp_path / "tiny_async_operator.py"
    module.write_text(textwrap.dedent(OPERATOR.format(log=str(log))))
    async with run_operator(module):
        await apiserver.acall(lambda e: e.create_object("llamacpp.dev/v1alpha1", "llamamodels", NS, model("a1")))
        await asyncio.to_thread(apiserver.wait_for, lambda: apiserver.read("v1", "configmaps", NS, "a1-child"))


def test_request_log_limit_keeps_the_newest_requests() -> None:
    with EmulatorThread(request_log_limit=5) as server:
        for i in range(12):
            server.create("v1", "configmaps", "default", {"apiVersion": "v1", "kind": "ConfigMap",
                                                          "metadata": {"name": f"c{i}"}})
        for _ in range(12):
            with urllib.request.urlopen(f"{server.url}/api/v1/namespaces/default/configmaps") as response:
                assert len(json.loads(response.read())["items"]) == 12
        log = server.call(lambda e: list(e))  # kmock's request log
        assert 5 <= len(log) <= 6  # the limit, plus the request being served when it was trimmed
