"""The real operator (kopf, in-process, with the chart's RBAC) against a real kube-apiserver and
kube-controller-manager: the reconcile loop end to end.

The real Deployment and ReplicaSet controllers make the pods; no kubelet runs, so a test that needs pod states
registers a Node, binds the pods to it and writes their status, exactly as a kubelet would.
"""

from __future__ import annotations

import base64
import pathlib
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from llama_operator.fetch.secrets import SOURCE_CREDENTIALS_LABEL
from tests.cluster import ApiError
from tests.conftest import model_body, server_body
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1beta1"


REPO_ID = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
FILE = "qwen2.5-0.5b-instruct-q4_k_m.gguf"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def hub(tiny_gguf: pathlib.Path) -> Iterator[FakeHub]:
    """The model source: a local stand-in for Hugging Face serving a real (tiny) GGUF."""
    fake = FakeHub(token="hf_secret")
    fake.add(REPO_ID, FILE, tiny_gguf)
    fake.add("org/gated-GGUF", "m.gguf", tiny_gguf, gated=True)
    with fake.running():
        yield fake


@pytest.fixture(autouse=True)
def operator_env(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", hub.url)


def _status(apiserver: Any, plural: str, name: str) -> dict[str, Any]:
    obj = apiserver.read(CRD, plural, apiserver.namespace, name)
    return (obj or {}).get("status") or {}


def _wait_phase(apiserver: Any, name: str, phase: str, *, contains: str = "", timeout: float = 15) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        status = _status(apiserver, "llamaservers", name)
        if status.get("phase") == phase and contains in (status.get("message") or ""):
            return status
        return None

    try:
        return apiserver.wait_for(ready, timeout=timeout, message=f"LlamaServer {name} phase {phase} {contains!r}")
    except TimeoutError:
        raise AssertionError(f"last status: {_status(apiserver, 'llamaservers', name)}") from None


def _deployment(apiserver: Any, name: str = "chat") -> dict[str, Any] | None:
    return apiserver.read("apps/v1", "deployments", apiserver.namespace, name)


def _args(dep: dict[str, Any]) -> list[str]:
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


def _node(apiserver: Any, name: str) -> None:
    """A Node for pods to be bound to (no kubelet runs: the test writes pod status itself)."""
    if apiserver.read("v1", "nodes", None, name) is None:
        apiserver.create("v1", "nodes", None, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})


def _bound_pod(apiserver: Any, server: str, node: str) -> str:
    """The pod the real ReplicaSet controller made for `server`, bound to `node` the way the scheduler would."""
    pod = apiserver.wait_for(lambda: next(iter(apiserver.list(
        "v1", "pods", apiserver.namespace, label_selector=f"llamacpp.dev/server={server}")), None),
        message=f"a pod of {server} from the ReplicaSet controller")
    name = pod["metadata"]["name"]
    apiserver.request("POST", f"/api/v1/namespaces/{apiserver.namespace}/pods/{name}/binding",
                      body={"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                            "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
    return name


def test_create_update_drift_and_delete(apiserver: Any, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        server = apiserver.create_llama("llamaservers", server_body(replicas=2, contextSize=4096))

        dep = apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
        svc = apiserver.wait_for(lambda: apiserver.read("v1", "services", apiserver.namespace, "chat"),
                                 message="Service")
        for owned in (dep, svc):
            ref = owned["metadata"]["ownerReferences"][0]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("LlamaServer", "chat",
                                                                                 server["metadata"]["uid"], True)
        assert dep["spec"]["replicas"] == 2
        assert "--ctx-size" in _args(dep) and _args(dep)[_args(dep).index("--ctx-size") + 1] == "4096"

        status = _wait_phase(apiserver, "chat", "Pending", contains="pod chat-")
        assert status["endpoint"] == f"http://chat.{apiserver.namespace}.svc:8080/v1"
        assert status["modelName"] == "qwen"
        assert status["observedGeneration"] == 1
        assert status["selector"] == "app.kubernetes.io/name=llama-server,llamacpp.dev/server=chat"
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["ModelResolved"]["status"] == "True"
        assert conditions["ArgsValid"]["status"] == "True"
        assert conditions["Available"]["status"] == "False"

        # update of a setting -> Deployment updated
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"contextSize": 8192}})
        apiserver.wait_for(lambda: "8192" in _args(_deployment(apiserver) or {"spec": {"template": {"spec": {
            "containers": [{"args": []}]}}}}), message="new ctx-size")
        apiserver.wait_for(lambda: _status(apiserver, "llamaservers", "chat").get("observedGeneration") == 2,
                           message="observedGeneration 2")

        # deleted by hand -> recreated; edited by hand -> put back
        apiserver.delete("apps/v1", "deployments", apiserver.namespace, "chat")
        dep = apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment recreated")
        assert "8192" in _args(dep)
        apiserver.patch("apps/v1", "deployments", apiserver.namespace, "chat", {"spec": {"replicas": 7}})
        apiserver.wait_for(lambda: (_deployment(apiserver) or {}).get("spec", {}).get("replicas") == 2,
                           message="replicas repaired")

        # delete -> owned objects garbage-collected
        apiserver.delete(CRD, "llamaservers", apiserver.namespace, "chat")
        apiserver.wait_for(lambda: _deployment(apiserver) is None and
                           apiserver.read("v1", "services", apiserver.namespace, "chat") is None,
                           message="owned objects gone by the garbage collector")


def test_missing_model_then_created(apiserver: Any, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamaservers", server_body())
        status = _wait_phase(apiserver, "chat", "Pending", contains=f"LlamaModel {apiserver.namespace}/qwen not found")
        assert {c["type"]: c["reason"] for c in status["conditions"]}["ModelResolved"] == "ModelNotFound"
        assert _deployment(apiserver) is None

        apiserver.create_llama("llamamodels", model_body())
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment after the model appeared")
        _wait_phase(apiserver, "chat", "Pending", contains="pod chat-")


def test_model_is_resolved_from_its_source(apiserver: Any, run_operator: Any, hub: FakeHub,
                                           tiny_gguf: pathlib.Path) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        status = apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "qwen").get("phase") == "Ready"
                                    and _status(apiserver, "llamamodels", "qwen"), message="model Ready")
    served = hub.repos[(REPO_ID, "main")][FILE]
    assert status["sha256"] == served.sha256 and status["size"] == tiny_gguf.stat().st_size
    assert status["files"][0]["name"] == FILE
    assert status["files"][0]["url"].endswith(f"/{REPO_ID}/resolve/main/{FILE}")
    assert status["gguf"]["architecture"] == "llama"
    assert status["cacheKey"].startswith("qwen2-5-0-5b-instruct-q4-k-m-")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert hub.served_bytes(FILE) < tiny_gguf.stat().st_size, "inspection reads the header, not the weights"


@pytest.mark.parametrize(("source", "reason", "text"), [
    ({"huggingFace": {"repo": REPO_ID, "file": "missing.gguf"}}, "NotFound", "missing.gguf"),
    ({"huggingFace": {"repo": "org/gated-GGUF", "file": "m.gguf"}}, "Unauthorized", "tokenSecretRef"),
])
def test_model_source_errors_are_precise(apiserver: Any, run_operator: Any, source: dict[str, Any], reason: str,
                                         text: str) -> None:
    with run_operator("llama_operator.handlers") as runner:
        apiserver.create_llama("llamamodels", model_body(spec={"source": source}))
        status = apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "qwen").get("phase") == "Failed"
                                    and _status(apiserver, "llamamodels", "qwen"), message="model Failed")
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == reason
    assert text in status["message"]
    assert "Traceback" not in runner.output


def _source_secret(apiserver: Any, name: str, data: dict[str, str], *, opted_in: bool = True) -> None:
    labels = {SOURCE_CREDENTIALS_LABEL: "true"} if opted_in else {}
    apiserver.create("v1", "secrets", apiserver.namespace, {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "labels": labels},
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}})


def test_gated_model_with_token_secret(apiserver: Any, run_operator: Any, hub: FakeHub) -> None:
    # `echo hf_secret > f; kubectl create secret generic hf --from-file=token=f` stores the newline too.
    _source_secret(apiserver, "hf", {"token": "hf_secret\n"})
    source = {"huggingFace": {"repo": "org/gated-GGUF", "file": "m.gguf",
                              "tokenSecretRef": {"name": "hf", "key": "token"}}}
    with run_operator("llama_operator.handlers") as runner:
        apiserver.create_llama("llamamodels", model_body(spec={"source": source}))
        apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "qwen").get("phase") == "Ready",
                           message="gated model Ready with the token")
    assert "hf_secret" not in runner.output
    assert {r.authorization for r in hub.requests if "gated" in r.path} == {"Bearer hf_secret"}


def test_source_secrets_must_opt_in_and_never_show(apiserver: Any, run_operator: Any, hub: FakeHub) -> None:
    """A Secret without the opt-in is not read; a value that cannot be a header is refused by Secret and key.
    Neither value reaches status, an Event, the log or the model host."""
    _source_secret(apiserver, "db", {"db-password": "hunter2-db"}, opted_in=False)
    _source_secret(apiserver, "broken", {"X-Api-Key": "k3y-VALUE\r\nX-Injected: yes"})
    url = f"{hub.url}/plain/m.gguf"
    with run_operator("llama_operator.handlers") as runner:
        for name in ("db", "broken"):
            apiserver.create_llama("llamamodels", model_body(name, spec={"source": {"http": {
                "url": url, "headersSecretRef": {"name": name}}}}))
        reasons = apiserver.wait_for(lambda: (
            all(_status(apiserver, "llamamodels", n).get("phase") == "Failed" for n in ("db", "broken"))
            and {n: {c["type"]: c for c in _status(apiserver, "llamamodels", n)["conditions"]}["Ready"]
                 for n in ("db", "broken")}), message="both models Failed")
        events = apiserver.list("v1", "events", apiserver.namespace)
    assert reasons["db"]["reason"] == "SecretNotAllowed"
    assert f"{SOURCE_CREDENTIALS_LABEL}=true" in reasons["db"]["message"]
    assert reasons["broken"]["reason"] == "InvalidSecret" and "key 'X-Api-Key'" in reasons["broken"]["message"]
    shown = runner.output + str(events) + str([_status(apiserver, "llamamodels", n) for n in ("db", "broken")])
    assert "hunter2" not in shown and "k3y-VALUE" not in shown
    assert not [r for r in hub.requests if r.path.startswith("/plain/")]


def test_unreachable_source_stays_resolving_with_backoff(apiserver: Any, run_operator: Any, hub: FakeHub,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with run_operator("llama_operator.handlers") as runner:
        apiserver.create_llama("llamamodels", model_body())
        status = apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "qwen").get("phase") == "Resolving"
                                    and "unreachable" in (_status(apiserver, "llamamodels", "qwen").get("message")
                                                          or "") and _status(apiserver, "llamamodels", "qwen"),
                                    message="Resolving with the error")
        assert "127.0.0.1:9" in status["message"]
    assert "failed (attempt 1): source unreachable" in runner.output  # the Runtime schedules the retry (issue 11)
    assert runner.output.count("Handler 'model_changed' is invoked") == 1, "retried after a delay, not at once"


def test_pod_states_drive_phase_and_message(apiserver: Any, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")

        _node(apiserver, "node-a")
        pod = _bound_pod(apiserver, "chat", "node-a")
        apiserver.patch("v1", "pods", apiserver.namespace, pod, {"status": {"phase": "Pending",
                                                                            "initContainerStatuses": [
            {"name": "fetch-model", "state": {"running": {"startedAt": "2026-11-22T00:00:00Z"}}}]}},
            subresource="status")
        _wait_phase(apiserver, "chat", "Downloading", contains="downloading the model")

        apiserver.patch("v1", "pods", apiserver.namespace, pod, {"status": {"initContainerStatuses": [
            {"name": "fetch-model", "restartCount": 3,
             "state": {"waiting": {"reason": "CrashLoopBackOff"}},
             "lastState": {"terminated": {"exitCode": 3,
                                          "message": "sha256 mismatch for m.gguf: expected 0a, got 1b"}}},
        ]}}, subresource="status")
        status = _wait_phase(apiserver, "chat", "Failed", contains="sha256 mismatch for m.gguf")
        assert "fetch-model exited with code 3" in status["message"]

        apiserver.patch("v1", "pods", apiserver.namespace, pod, {"status": {
            "initContainerStatuses": [{"name": "fetch-model", "state": {"terminated": {"exitCode": 0}}}],
            "containerStatuses": [{"name": "llama-server", "ready": False, "state": {"running": {}}}]}},
            subresource="status")
        _wait_phase(apiserver, "chat", "Loading", contains="loading the model")

        # Ready as a kubelet reports it; the real ReplicaSet and Deployment controllers count it.
        now = "2026-11-22T00:00:10Z"
        apiserver.patch("v1", "pods", apiserver.namespace, pod, {"status": {
            "phase": "Running",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": "llama-server", "ready": True, "restartCount": 0, "image": "x",
                                   "imageID": "", "state": {"running": {"startedAt": now}}}]}},
            subresource="status")
        status = _wait_phase(apiserver, "chat", "Ready")
        assert status["readyReplicas"] == 1 and status["ready"] == "1/1"
        assert {c["type"]: c["status"] for c in status["conditions"]}["Available"] == "True"


@pytest.mark.parametrize(("spec", "field", "text"), [
    ({"contextSize": "4k"}, "spec.contextSize", "must be a number of tokens or 'auto'"),
    ({"replicas": -1}, "spec.replicas", "should be greater than or equal to 0"),
    ({"gpu": {"vendor": "nvidia", "count": 0}}, "spec.gpu.count", "should be greater than or equal to 1"),
    ({"disruption": {"maxUnavailable": 1, "minAvailable": 1}}, "spec.disruption",
     "set exactly one of maxUnavailable and minAvailable"),
    ({"disruption": {"minAvailable": "150%"}}, "spec.disruption.minAvailable", "must be a number >= 0 or a percentage"),
    ({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                     "whenUnsatisfiable": "Maybe"}]},
     "spec.topologySpreadConstraints[0].whenUnsatisfiable", "Unsupported value"),
])
def test_schema_errors_are_refused_by_the_api_server(apiserver: Any, spec: dict[str, Any], field: str,
                                                     text: str) -> None:
    with pytest.raises(ApiError) as refused:
        apiserver.create_llama("llamaservers", server_body(**spec))
    assert refused.value.status == 422
    assert field in str(refused.value) and text in str(refused.value)


@pytest.mark.parametrize(("spec", "field", "text"), [
    ({"args": ["--ctx-size", "4096"]}, "spec.args[0]", "contextSize"),
    ({"args": ["--no-such-flag"]}, "spec.args[0]", "unknown flag"),
])
def test_bad_server_spec_gets_a_status_not_a_crash(apiserver: Any, run_operator: Any, spec: dict[str, Any],
                                                   field: str, text: str) -> None:
    # What only the flag catalog can say, with no admission webhook registered: the operator's status path.
    with run_operator("llama_operator.handlers") as runner:
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(**spec))
        status = _wait_phase(apiserver, "chat", "Failed", contains=field)
        assert text in status["message"]
        assert {c["type"]: c["status"] for c in status["conditions"]}["ArgsValid"] == "False"
        assert _deployment(apiserver) is None
    assert "Traceback" not in runner.output


@pytest.mark.parametrize("source", [
    {},
    {"http": {"url": "https://h/m.gguf"}, "volume": {"persistentVolumeClaim": "p", "path": "m.gguf"}},
])
def test_bad_model_source_is_refused_by_the_api_server(apiserver: Any, source: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as refused:
        apiserver.create_llama("llamamodels", model_body(spec={"source": source}))
    assert refused.value.status == 422 and "spec.source" in str(refused.value)


def test_restart_converges_without_duplicates(apiserver: Any, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
    # while the operator is down: a spec change and a lost Service
    apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"parallel": 3}})
    apiserver.delete("v1", "services", apiserver.namespace, "chat")
    with run_operator("llama_operator.handlers"):
        apiserver.wait_for(lambda: "--parallel" in _args(_deployment(apiserver) or {"spec": {"template": {"spec": {
            "containers": [{"args": []}]}}}}), message="converged after restart")
        apiserver.wait_for(lambda: apiserver.read("v1", "services", apiserver.namespace, "chat"),
                           message="Service back")
    assert len(apiserver.list("apps/v1", "deployments", apiserver.namespace)) == 1
    assert len(apiserver.list("v1", "services", apiserver.namespace)) == 1


def test_moved_revision_rolls_servers_only_when_the_sha256_changes(apiserver: Any, run_operator: Any, hub: FakeHub,
                                                                   tiny_gguf: pathlib.Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_MODEL_RESYNC_SECONDS", "1")
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        first = apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
        sha_before = first["spec"]["template"]["metadata"]["annotations"]["llamacpp.dev/model-sha256"]

        # Several re-resolutions of an unchanged `main`: the pod template stays as it was.
        requests_before = len(hub.requests)
        apiserver.wait_for(lambda: len(hub.requests) >= requests_before + 4, timeout=15, message="re-resolution")
        assert _deployment(apiserver)["spec"]["template"] == first["spec"]["template"]

        # `main` moves to other bytes: the next re-resolution notices and the servers roll.
        moved = tiny_gguf.read_bytes() + b"\0" * 64
        hub.add(REPO_ID, FILE, moved)

        def rolled() -> bool:
            annotations = _deployment(apiserver)["spec"]["template"]["metadata"].get("annotations", {})
            return annotations.get("llamacpp.dev/model-sha256") not in (None, sha_before)

        apiserver.wait_for(rolled, timeout=15, message="pods rolled to the new sha256")
        status = _status(apiserver, "llamamodels", "qwen")
        assert status["sha256"] != sha_before and status["size"] == len(moved)


def test_bad_args_on_a_running_server_keep_the_running_pods(apiserver: Any, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers") as runner:
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(args=["--top-k", "20"]))
        good = apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat",
                        {"spec": {"args": ["--mlock"], "contextSize": 8192}})
        status = _wait_phase(apiserver, "chat", "Failed", contains="spec.args[0]")
        assert "--load-mode" in status["message"], "a removed flag names its replacement"
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["ArgsValid"]["status"] == "False" and conditions["ArgsValid"]["observedGeneration"] == 2
        assert _deployment(apiserver)["spec"] == good["spec"], "the bad spec is not rolled out"
        # fixing the spec rolls out the fix
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"args": ["--top-k", "40"]}})
        apiserver.wait_for(lambda: "40" in _args(_deployment(apiserver)), message="fixed spec rolled out")
    assert "Traceback" not in runner.output


def test_owned_kinds_are_watched_with_a_server_side_label_selector(apiserver: Any, run_operator: Any,
                                                                   control_plane: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
    # The API server's audit log: what the operator's ServiceAccount really asked for.
    watches = [urllib.parse.urlsplit(event["requestURI"]) for event in control_plane.audit_events()
               if event["verb"] == "watch" and event["user"]["username"].endswith(":llama-llama-operator")]
    watched = {url.path: dict(urllib.parse.parse_qsl(url.query)) for url in watches}
    for path in ("/api/v1/pods", "/apis/apps/v1/deployments", "/api/v1/services", "/api/v1/persistentvolumeclaims"):
        assert watched[path]["labelSelector"] == "app.kubernetes.io/managed-by=llama-operator", path


def _budget(apiserver: Any, name: str = "chat") -> dict[str, Any] | None:
    return apiserver.read("policy/v1", "poddisruptionbudgets", apiserver.namespace, name)


def test_a_two_replica_server_gets_a_disruption_budget_removed_at_one_replica(
        apiserver: Any, run_operator: Any, kubectl_admin: Any) -> None:
    # Namespaced mode: the chart's Role in the namespace is enough to make and delete the budget.
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace):
        apiserver.create_llama("llamamodels", model_body())
        server = apiserver.create_llama("llamaservers", server_body(replicas=2))
        budget = apiserver.wait_for(lambda: _budget(apiserver), message="PodDisruptionBudget")
        dep = apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
        assert budget["spec"]["maxUnavailable"] == 1
        assert budget["spec"]["selector"] == dep["spec"]["selector"]
        assert budget["metadata"]["ownerReferences"][0]["uid"] == server["metadata"]["uid"]
        assert dep["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["whenUnsatisfiable"] == \
            "ScheduleAnyway"

        # What the gateway's autoscaler does: the scale subresource; the budget follows spec.replicas.
        kubectl_admin("scale", "llamaserver/chat", "--replicas=1", check=True)
        apiserver.wait_for(lambda: _budget(apiserver) is None, message="PodDisruptionBudget removed at 1 replica")
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat",
                        {"spec": {"replicas": 3, "disruption": {"minAvailable": "50%"}}})
        apiserver.wait_for(lambda: (_budget(apiserver) or {}).get("spec", {}).get("minAvailable") == "50%",
                           message="PodDisruptionBudget from spec.disruption")
        apiserver.delete(CRD, "llamaservers", apiserver.namespace, "chat")
        apiserver.wait_for(lambda: _budget(apiserver) is None, message="garbage-collected with the server")


def test_a_gpu_server_rolls_one_at_a_time_and_recreates_at_one_replica(apiserver: Any, run_operator: Any) -> None:
    # The strategy follows spec.replicas both ways: server-side apply drops rollingUpdate again for Recreate
    # (the API server refuses Recreate with rollingUpdate set).
    def strategy() -> dict[str, Any]:
        return ((_deployment(apiserver) or {}).get("spec") or {}).get("strategy") or {}

    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(replicas=2, gpu={"vendor": "nvidia"}))
        apiserver.wait_for(lambda: strategy().get("rollingUpdate") == {"maxSurge": 0, "maxUnavailable": 1},
                           message="one at a time")
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"replicas": 1}})
        apiserver.wait_for(lambda: strategy() == {"type": "Recreate"}, message="Recreate at one replica")
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"replicas": 3}})
        apiserver.wait_for(lambda: strategy().get("rollingUpdate") == {"maxSurge": 0, "maxUnavailable": 1},
                           message="one at a time again")
        status = _status(apiserver, "llamaservers", "chat")
        assert "Traceback" not in str(status) and status.get("phase") != "Failed", status
