"""What only a real kube-apiserver + kube-controller-manager show: controllers, printer
columns, OpenAPI, the scale subresource, server-side apply ownership, immutable fields, watches surviving an
API-server restart, and the chart's namespaced RBAC.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cluster import APPLY_PATCH, ApiError, ClusterApi
from tests.conftest import model_body, server_body
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1beta1"
REPO_ID = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
FILE = "qwen2.5-0.5b-instruct-q4_k_m.gguf"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(autouse=True)
def operator_env(monkeypatch: pytest.MonkeyPatch, tiny_gguf: pathlib.Path) -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.add(REPO_ID, FILE, tiny_gguf)
    with hub.running():
        monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", hub.url)
        yield hub


def _status(api: ClusterApi, plural: str, name: str) -> dict[str, Any]:
    return (api.read(CRD, plural, api.namespace, name) or {}).get("status") or {}


def _deployment(api: ClusterApi, name: str = "chat") -> dict[str, Any] | None:
    return api.read("apps/v1", "deployments", api.namespace, name)


def _owner(obj: dict[str, Any]) -> tuple[str, str]:
    ref = obj["metadata"]["ownerReferences"][0]
    return ref["kind"], ref["name"]


def test_deployment_replicaset_pod_by_the_real_controllers(apiserver: ClusterApi, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(replicas=2))
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
        replica_sets = apiserver.wait_for(lambda: apiserver.list("apps/v1", "replicasets", apiserver.namespace),
                                          message="a ReplicaSet from the Deployment controller")
        assert _owner(replica_sets[0]) == ("Deployment", "chat")
        pods = apiserver.wait_for(lambda: (lambda p: p if len(p) == 2 else None)(apiserver.list(
            "v1", "pods", apiserver.namespace, label_selector="llamacpp.dev/server=chat")), message="2 pods")
        assert {_owner(pod) for pod in pods} == {("ReplicaSet", replica_sets[0]["metadata"]["name"])}
        # The pods are the operator's template, admitted by the real API server (defaults filled in).
        assert pods[0]["spec"]["containers"][0]["name"] == "llama-server"
        assert pods[0]["spec"]["securityContext"]["runAsNonRoot"] is True
        status = apiserver.wait_for(lambda: (lambda s: s if s.get("replicas") == 2 else None)(
            _status(apiserver, "llamaservers", "chat")), message="status counts the pods")
        assert status["phase"] == "Pending" and status["readyReplicas"] == 0

        # Delete the server: the real garbage collector removes Deployment -> ReplicaSet -> pods.
        apiserver.delete(CRD, "llamaservers", apiserver.namespace, "chat")
        apiserver.wait_for(lambda: not apiserver.list("apps/v1", "replicasets", apiserver.namespace)
                           and not apiserver.list("v1", "pods", apiserver.namespace), timeout=30,
                           message="the garbage collector removed ReplicaSets and pods")


def test_kubectl_get_llama_prints_the_columns_and_explain_works(apiserver: ClusterApi, run_operator: Any,
                                                               kubectl_admin: Callable[..., Any]) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        apiserver.wait_for(lambda: _status(apiserver, "llamaservers", "chat").get("endpoint")
                           and _status(apiserver, "llamamodels", "qwen").get("phase") == "Ready", message="statuses")
    table = kubectl_admin("get", "llama", check=True).stdout
    lines = table.splitlines()
    model_header = next(line for line in lines if line.startswith("NAME") and "ARCH" in line)
    server_header = next(line for line in lines if line.startswith("NAME") and "ENDPOINT" in line)
    assert model_header.split() == ["NAME", "PHASE", "ARCH", "QUANT", "SIZE", "AGE"]
    assert server_header.split() == ["NAME", "MODEL", "PHASE", "READY", "DOWNLOAD", "LOADED", "WORKERS", "ENDPOINT",
                                     "AGE"]
    model_row = next(line for line in lines if line.startswith("llamamodel.llamacpp.dev/qwen"))
    assert model_row.split()[1:3] == ["Ready", "llama"]
    server_row = next(line for line in lines if line.startswith("llamaserver.llamacpp.dev/chat"))
    assert server_row.split()[1:5] == ["qwen", "Pending", "0/1", f"http://chat.{apiserver.namespace}.svc:8080/v1"]

    explained = kubectl_admin("explain", "llamaserver.spec.contextSize", check=True).stdout
    # int-or-string (a number or "auto"): kubectl explain prints such a field as <Object>
    assert "FIELD: contextSize <Object>" in explained and "--ctx-size" in explained and "auto" in explained
    short = kubectl_admin("get", "lserver,lmodel", "-o", "name", check=True).stdout.split()
    assert sorted(short) == ["llamamodel.llamacpp.dev/qwen", "llamaserver.llamacpp.dev/chat"]


def test_kubectl_scale_goes_through_the_scale_subresource(apiserver: ClusterApi, run_operator: Any,
                                                         kubectl_admin: Callable[..., Any]) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        apiserver.wait_for(lambda: _status(apiserver, "llamaservers", "chat").get("selector"), message="selector")
        kubectl_admin("scale", "lserver", "chat", "--replicas", "3", check=True)
        apiserver.wait_for(lambda: (_deployment(apiserver) or {}).get("spec", {}).get("replicas") == 3,
                           message="Deployment scaled to 3")
        scale = apiserver.read(CRD, "llamaservers", apiserver.namespace, "chat", subresource="scale")
        assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
        assert scale["status"]["selector"] == "app.kubernetes.io/name=llama-server,llamacpp.dev/server=chat"


def test_server_side_apply_conflicts_name_the_operator(apiserver: ClusterApi, run_operator: Any,
                                                      kubectl_admin: Callable[..., Any]) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(replicas=1))
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
        managers = {entry["manager"] for entry in _deployment(apiserver)["metadata"]["managedFields"]}
        assert "llama-operator" in managers

        # Another manager applying a field the operator owns is refused with a conflict naming it ...
        edit = {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "chat", "namespace": apiserver.namespace}, "spec": {"replicas": 5}}
        with pytest.raises(ApiError) as conflict:
            apiserver.patch("apps/v1", "deployments", apiserver.namespace, "chat", json.dumps(edit),
                            content_type=APPLY_PATCH, field_manager="someone-else")
        assert conflict.value.status == 409 and 'conflict with "llama-operator"' in str(conflict.value)
        refused = kubectl_admin("apply", "--server-side", "--field-manager", "someone-else", "-f", "-",
                                input=json.dumps(edit))
        assert refused.returncode != 0 and "llama-operator" in refused.stderr

        # ... and a forced apply takes the field, until the operator's next apply takes it back (drift repaired).
        apiserver.patch("apps/v1", "deployments", apiserver.namespace, "chat", json.dumps(edit),
                        content_type=APPLY_PATCH, field_manager="someone-else", force=True)
        apiserver.wait_for(lambda: _deployment(apiserver)["spec"]["replicas"] == 1, message="replicas repaired")


def test_immutable_cache_pvc_change_is_a_clear_status(apiserver: ClusterApi, run_operator: Any) -> None:
    cache = {"type": "PersistentVolumeClaim", "size": "1Gi", "storageClassName": "none"}
    with run_operator("llama_operator.handlers") as runner:
        spec = {**model_body()["spec"], "cache": cache}
        apiserver.create_llama("llamamodels", model_body(spec=spec))
        pvc = apiserver.wait_for(lambda: next(iter(apiserver.list("v1", "persistentvolumeclaims",
                                                                  apiserver.namespace)), None), message="cache PVC")
        assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
        apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "qwen").get("phase") == "Ready",
                           message="Ready")

        # An unbound PVC's requests are immutable: the API server refuses the change, the user is told what to do.
        apiserver.patch(CRD, "llamamodels", apiserver.namespace, "qwen", {"spec": {"cache": {"size": "2Gi"}}})
        status = apiserver.wait_for(lambda: (lambda s: s if s.get("phase") == "Failed" else None)(
            _status(apiserver, "llamamodels", "qwen")), message="Failed with the reason")
        assert "cannot be changed to match spec.cache" in status["message"]
        assert "immutable" in status["message"] and "delete the PVC" in status["message"]
        assert {c["type"]: c["reason"] for c in status["conditions"]}["Ready"] == "CachePVCImmutable"
        assert status["observedGeneration"] == 2
    assert "Traceback" not in runner.output


def test_watches_resume_after_an_apiserver_restart(apiserver: ClusterApi, run_operator: Any,
                                                   control_plane: Any) -> None:
    with run_operator("llama_operator.handlers") as runner:
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body(contextSize=4096))
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment")
        control_plane.restart("kube-apiserver", down_for=2)
        back = time.monotonic()
        # Written after the restart: only a resumed (or re-listed, after 410 Gone) watch can see it.
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"contextSize": 8192}})
        apiserver.wait_for(lambda: "8192" in (_deployment(apiserver) or {}).get("spec", {}).get("template", {})
                           .get("spec", {}).get("containers", [{}])[0].get("args", []), timeout=60,
                           message="the change after the restart reconciled")
        took = time.monotonic() - back
    print(f"kube-apiserver down 2 s: a change after it came back reconciled in {took:.1f}s")
    # The new API server's watch cache starts after the versions kopf had seen: 410 Gone, and kopf re-lists.
    assert "Restarting the watch-stream" in runner.output


def test_namespaced_mode_runs_on_the_charts_role_alone(apiserver: ClusterApi, run_operator: Any) -> None:
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace) as runner:
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        apiserver.wait_for(lambda: _deployment(apiserver), message="Deployment in namespaced mode")
        apiserver.wait_for(lambda: _status(apiserver, "llamaservers", "chat").get("endpoint"), message="status")
    assert [line for line in runner.output.splitlines() if "Forbidden" in line] == []
