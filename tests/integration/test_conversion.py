"""Both API versions on the real API server, converted by the operator's own webhook server.

The CRDs get the conversion webhook the chart gives them, pointing at the operator run here (clientConfig.url at
127.0.0.1 with a CA made for the test instead of the chart's Service); objects are created in either version
and read in both, with kubectl, and the operator reconciles an object created in v1alpha1 through v1beta1. The
CRDs are put back as crds/ has them (strategy None) afterwards: the control plane is shared by the tier.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from llama_operator.api import v1alpha1, v1beta1
from llama_operator.api.crd import all_crds, conversion_client_config
from llama_operator.controlplane import ControlPlane
from llama_operator.controlplane.certs import CertificateAuthority
from llama_operator.controlplane.cluster import free_port
from tests.cluster import APPLY_PATCH, ApiError, ClusterApi, apply_objects, kubectl, tls_listening
from tests.conftest import model_body, server_body

VOLUME_MODEL = {"source": {"volume": {"persistentVolumeClaim": "models", "path": "m/model.gguf"}}}
CRDS = "apiextensions.k8s.io/v1"


def _plain_crds() -> list[dict[str, Any]]:
    return [{**crd, "spec": {**crd["spec"], "conversion": {"strategy": "None"}}} for crd in all_crds()]


def _serving(apiserver: ClusterApi) -> bool:
    # A CRD update reinitialises its storage: until then requests are answered 429 "storage is (re)initializing".
    try:
        for plural in ("llamamodels", "llamaservers"):
            for version in (v1alpha1.API_VERSION, v1beta1.API_VERSION):
                apiserver.list(version, plural, apiserver.namespace)
    except ApiError as exc:
        if exc.status == 429:
            return False
        raise
    return True


def _apply_crds(apiserver: ClusterApi, crds: list[dict[str, Any]]) -> None:
    apply_objects(apiserver, crds)
    apiserver.wait_for(lambda: _serving(apiserver), timeout=30, message="the CRDs' storage")


@pytest.fixture
def converting(apiserver: ClusterApi, run_operator: Any, monkeypatch: pytest.MonkeyPatch,
               tmp_path: pathlib.Path) -> Iterator[Any]:
    """The operator running with its webhook server, and the CRDs converting through it."""
    ca = CertificateAuthority(tmp_path / "pki", common_name="conversion-webhook-ca")
    ca.issue("tls", common_name="127.0.0.1", ip_addresses=["127.0.0.1"], server=True)  # tls.crt, tls.key
    port = free_port()
    monkeypatch.setenv("LLAMA_OPERATOR_WEBHOOK_PORT", str(port))
    monkeypatch.setenv("LLAMA_OPERATOR_WEBHOOK_CERT_DIR", str(ca.directory))
    crds = all_crds(conversion_client_config(ca_pem=ca.pem, url=f"https://127.0.0.1:{port}"))
    with run_operator("llama_operator.handlers", namespace=apiserver.namespace, timeout=60) as runner:
        apiserver.wait_for(lambda: tls_listening(port, ca.cert_path), timeout=30, message="webhook server")
        _apply_crds(apiserver, crds)
        try:
            yield runner
        finally:
            _apply_crds(apiserver, _plain_crds())


def _get(control_plane: ControlPlane, namespace: str, resource: str, name: str) -> dict[str, Any]:
    proc = kubectl(control_plane, "-n", namespace, "get", resource, name, "-o", "json", check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _column(control_plane: ControlPlane, namespace: str, resource: str, name: str, column: str) -> str:
    """One printer column of `kubectl get`, found by the header's position (empty cells are blank)."""
    header, row = kubectl(control_plane, "-n", namespace, "get", resource, name, check=True).stdout.splitlines()[:2]
    start = header.index(column)
    return row[start:].split(" ", 1)[0]


def _status(apiserver: ClusterApi, plural: str, name: str) -> dict[str, Any]:
    return (apiserver.read(v1beta1.API_VERSION, plural, apiserver.namespace, name) or {}).get("status") or {}


def _converted(apiserver: ClusterApi) -> bool:
    # The API server picks up a CRD change asynchronously: wait until v1alpha1 reads carry no humanSize field
    # and v1beta1 reads derive it (with strategy None a v1beta1 object would come back unchanged).
    return _status(apiserver, "llamamodels", "probe").get("humanSize") == "1Ki"


def test_both_versions_serve_the_same_objects(control_plane: ControlPlane, apiserver: ClusterApi,
                                              converting: Any) -> None:
    namespace = apiserver.namespace
    # A v1alpha1 status with a size: the conversion webhook derives v1beta1's humanSize from it.
    probe = model_body("probe", spec=VOLUME_MODEL) | {"apiVersion": v1alpha1.API_VERSION}
    apiserver.create(v1alpha1.API_VERSION, "llamamodels", namespace,
                     {**probe, "metadata": {"name": "probe", "namespace": namespace}})
    apiserver.wait_for(lambda: _status(apiserver, "llamamodels", "probe").get("phase"), timeout=30,
                       message="the operator resolved the probe")
    apiserver.patch(v1alpha1.API_VERSION, "llamamodels", namespace, "probe", {"status": {"size": 1024}},
                    subresource="status")
    apiserver.wait_for(lambda: _converted(apiserver), timeout=30, message="conversion through the webhook")

    # Created in v1alpha1 and in v1beta1; each read in both versions, with the same spec.
    alpha_body = server_body("in-alpha", modelRef={"name": "probe"}, contextSize=2048)
    beta_body = server_body("in-beta", modelRef={"name": "probe"}, contextSize=4096)
    for version, body in ((v1alpha1.API_VERSION, alpha_body), (v1beta1.API_VERSION, beta_body)):
        apiserver.create(version, "llamaservers", namespace, {
            "apiVersion": version, "kind": "LlamaServer", "metadata": {"name": body["metadata"]["name"]},
            "spec": body["spec"]})
    for name, spec in (("in-alpha", alpha_body["spec"]), ("in-beta", beta_body["spec"])):
        alpha = _get(control_plane, namespace, "llamaservers.v1alpha1.llamacpp.dev", name)
        beta = _get(control_plane, namespace, "llamaservers.v1beta1.llamacpp.dev", name)
        assert (alpha["apiVersion"], beta["apiVersion"]) == (v1alpha1.API_VERSION, v1beta1.API_VERSION)
        assert alpha["spec"] == beta["spec"] and alpha["spec"]["contextSize"] == spec["contextSize"]
        assert alpha["metadata"]["uid"] == beta["metadata"]["uid"]

    # The operator watches v1beta1 only: the server created in v1alpha1 is reconciled and gets a status.
    apiserver.wait_for(lambda: _status(apiserver, "llamaservers", "in-alpha").get("phase"), timeout=60,
                       message="in-alpha reconciled")
    in_alpha = _get(control_plane, namespace, "llamaservers.v1alpha1.llamacpp.dev", "in-alpha")
    assert in_alpha["status"]["phase"]

    # The SIZE column: raw bytes in v1alpha1, humanSize in v1beta1; v1alpha1 never shows the new field.
    assert _column(control_plane, namespace, "llamamodels.v1alpha1.llamacpp.dev", "probe", "SIZE") == "1024"
    assert _column(control_plane, namespace, "llamamodels.v1beta1.llamacpp.dev", "probe", "SIZE") == "1Ki"
    alpha_model = _get(control_plane, namespace, "llamamodels.v1alpha1.llamacpp.dev", "probe")
    assert "humanSize" not in alpha_model["status"]
    assert "llamacpp.dev/v1beta1-fields" not in (alpha_model["metadata"].get("annotations") or {})


def test_v1beta1_is_stored_and_v1alpha1_deprecated(control_plane: ControlPlane, apiserver: ClusterApi,
                                                   converting: Any) -> None:
    crd = apiserver.read(CRDS, "customresourcedefinitions", None, "llamaservers.llamacpp.dev")
    assert crd is not None
    assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == ["v1beta1"]
    assert "v1beta1" in crd["status"]["storedVersions"]
    assert crd["spec"]["conversion"]["strategy"] == "Webhook"
    proc = kubectl(control_plane, "-n", apiserver.namespace, "get", "llamaservers.v1alpha1.llamacpp.dev")
    assert proc.returncode == 0 and "llamacpp.dev/v1alpha1 is deprecated; use llamacpp.dev/v1beta1" in proc.stderr
    # Why `helm rollback` to a release without v1beta1 needs the stored objects moved back first
    # (docs/upgrading.md): the API server refuses a CRD that drops a version objects may be stored in.
    alpha_only = all_crds()[1]
    alpha_only["spec"]["versions"] = [{**v, "storage": True} for v in alpha_only["spec"]["versions"]
                                      if v["name"] == "v1alpha1"]
    alpha_only["spec"]["conversion"] = {"strategy": "None"}
    with pytest.raises(ApiError) as refused:
        apiserver.request("PATCH", f"/apis/{CRDS}/customresourcedefinitions/llamaservers.llamacpp.dev",
                          body=json.dumps(alpha_only), content_type=APPLY_PATCH,
                          params={"fieldManager": "tests", "force": "true", "dryRun": "All"})
    assert refused.value.status == 422 and "storedVersions" in str(refused.value)


def test_the_documented_way_back_to_a_v1alpha1_only_crd(control_plane: ControlPlane, apiserver: ClusterApi,
                                                        converting: Any) -> None:
    """docs/upgrading.md#api-versions-on-upgrade-and-rollback, step by step, for one namespace's objects."""
    namespace = apiserver.namespace
    body = server_body("stored", modelRef={"name": "m"})
    apiserver.create(v1beta1.API_VERSION, "llamaservers", namespace, {
        "apiVersion": v1beta1.API_VERSION, "kind": "LlamaServer", "metadata": {"name": "stored"},
        "spec": body["spec"]})
    before = _get(control_plane, namespace, "llamaservers.v1alpha1.llamacpp.dev", "stored")
    path = f"/apis/{CRDS}/customresourcedefinitions/llamaservers.llamacpp.dev"
    # 1. v1alpha1 stored again (versions[0] is v1beta1, [1] v1alpha1 in the generated CRDs).
    assert [v["name"] for v in all_crds()[1]["spec"]["versions"]] == ["v1beta1", "v1alpha1"]
    apiserver.request("PATCH", path, content_type="application/json-patch+json", body=json.dumps([
        {"op": "replace", "path": "/spec/versions/0/storage", "value": False},
        {"op": "replace", "path": "/spec/versions/1/storage", "value": True}]))
    apiserver.wait_for(lambda: _serving(apiserver), timeout=30, message="the CRDs' storage")
    # 2. every object rewritten through v1alpha1.
    listed = kubectl(control_plane, "-n", namespace, "get", "llamaservers.v1alpha1.llamacpp.dev", "-o", "json",
                     check=True).stdout
    kubectl(control_plane, "-n", namespace, "replace", "-f", "-", input=listed, check=True)
    # 3. recorded; now a CRD without v1beta1 is accepted, and the object reads in v1alpha1 as before.
    apiserver.request("PATCH", f"{path}/status", content_type="application/merge-patch+json",
                      body=json.dumps({"status": {"storedVersions": ["v1alpha1"]}}))
    alpha_only = _plain_crds()[1]
    alpha_only["spec"]["versions"] = [{**v, "storage": True} for v in alpha_only["spec"]["versions"]
                                      if v["name"] == "v1alpha1"]
    apiserver.request("PATCH", path, body=json.dumps(alpha_only), content_type=APPLY_PATCH,
                      params={"fieldManager": "tests", "force": "true", "dryRun": "All"})
    stored = _get(control_plane, namespace, "llamaservers.v1alpha1.llamacpp.dev", "stored")
    assert stored["spec"] == before["spec"] and stored["spec"]["modelRef"] == {"name": "m"}
    assert int(stored["metadata"]["resourceVersion"]) > int(before["metadata"]["resourceVersion"]), "rewritten"
