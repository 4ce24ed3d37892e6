"""The CRDs: generated from the pydantic models, checked in, structural, and rejecting bad input."""

from __future__ import annotations

import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llama_operator.api.crd import CRD_FILES, all_crds, to_yaml
from llama_operator.cli import main
from tests import crdschema
from tests.conftest import model_body, server_body

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("file_name", CRD_FILES)
def test_checked_in_crds_match_the_models(file_name: str) -> None:
    generated = to_yaml(CRD_FILES[file_name]())
    assert (REPO / "crds" / file_name).read_text() == generated, "run `make crds` and commit crds/"


def test_cli_prints_the_same_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == all_crds()


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_is_a_valid_kubernetes_object(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.31.0", strict=True)


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        found += _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_is_structural_and_documented(crd: dict[str, Any]) -> None:
    version = crd["spec"]["versions"][0]
    text = yaml.safe_dump(crd)
    assert "$ref" not in text and "anyOf: null" not in text
    for path, node in _walk(version["schema"]["openAPIV3Schema"]):
        assert node.get("type") or node.get("x-kubernetes-int-or-string"), f"untyped node {path}"
        assert not (node.get("properties") and node.get("additionalProperties") is not None), path
        if path.startswith(".spec") or path.startswith(".status"):
            if not path.endswith(("[]", "{}")):
                assert node.get("description"), f"no description for kubectl explain: {path}"


def test_names_columns_and_subresources() -> None:
    model, server = all_crds()
    assert model["spec"]["names"]["shortNames"] == ["lmodel"]
    assert server["spec"]["names"]["shortNames"] == ["lserver"]
    assert model["spec"]["names"]["categories"] == server["spec"]["names"]["categories"] == ["llama"]
    sv = server["spec"]["versions"][0]
    assert sv["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas",
                                           "statusReplicasPath": ".status.replicas",
                                           "labelSelectorPath": ".status.selector"}
    columns = [c["name"] for c in sv["additionalPrinterColumns"]]
    assert columns == ["Model", "Phase", "Ready", "Endpoint", "Memory", "Age"]


def test_good_objects_pass_the_schema() -> None:
    assert crdschema.errors(model_body()) == []
    assert crdschema.errors(server_body(replicas=3, gpu={"vendor": "nvidia", "count": 2}, gpuLayers="all",
                                        resources={"limits": {"cpu": "4", "memory": "8Gi"}},
                                        tolerations=[{"key": "k", "operator": "Exists"}])) == []


BAD_SERVERS = {
    "unknown field": ({"contextWindow": 4096}, "Additional properties are not allowed ('contextWindow'"),
    "negative replicas": ({"replicas": -1}, "-1 is less than the minimum of 0"),
    "gpu count 0": ({"gpu": {"vendor": "nvidia", "count": 0}}, "0 is less than the minimum of 1"),
    "gpu vendor unknown": ({"gpu": {"vendor": "nvidai"}}, "'nvidai' is not one of ['nvidia', 'amd', 'intel']"),
    "contextSize not a number": ({"contextSize": "4k"}, "'4k' is not of type 'integer'"),
    "bad flash attention": ({"flashAttention": "yes"}, "'yes' is not one of ['auto', 'on', 'off']"),
    "toleration typo": ({"tolerations": [{"key": "k", "operater": "Exists"}]}, "('operater' was unexpected)"),
}


@pytest.mark.parametrize(("spec", "message"), BAD_SERVERS.values(), ids=BAD_SERVERS.keys())
def test_schema_rejects_bad_servers(spec: dict[str, Any], message: str) -> None:
    problems = crdschema.errors(server_body(**spec))
    assert any(message in p for p in problems), problems


BAD_MODELS = {
    "no source": ({"source": {}}, "should be non-empty"),
    "two sources": ({"source": {"http": {"url": "https://h/m.gguf"},
                                "volume": {"persistentVolumeClaim": "p", "path": "m.gguf"}}},
                    "has too many properties"),
    "bad sha": ({"source": {"http": {"url": "https://h/m.gguf"}}, "sha256": "XYZ"}, "does not match"),
    "not a url": ({"source": {"http": {"url": "ftp://h/m.gguf"}}}, "does not match"),
}


@pytest.mark.parametrize(("spec", "message"), BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_schema_rejects_bad_models(spec: dict[str, Any], message: str) -> None:
    problems = crdschema.errors(model_body(spec=spec))
    assert any(message in p for p in problems), problems


def test_cross_namespace_model_ref_is_not_expressible_in_the_schema_and_caught_by_the_operator() -> None:
    # The schema cannot compare with metadata.namespace; the operator (and the webhook) reject it.
    body = server_body(modelRef={"name": "qwen", "namespace": "other"})
    assert crdschema.errors(body) == []
    from llama_operator.api.v1alpha1 import LlamaServer
    from llama_operator.reconcile.server import spec_problems

    assert "its own namespace" in spec_problems(LlamaServer.model_validate(body).spec, "default")[0]
