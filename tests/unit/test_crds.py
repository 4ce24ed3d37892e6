"""The CRDs: generated from the pydantic models, checked in, structural, and rejecting bad input.

Bad input is checked against the generated schema with tests/crdschema.py standing in for the API server
(JSON schema + CEL); tests/integration/test_bad_input_apply.py has the real API server's verdicts.
"""

from __future__ import annotations

import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llama_operator.api.base import CONTEXT_SIZE_RULES, GPU_LAYERS_RULES
from llama_operator.api.cel import CEL_KEY, Rule, violations
from llama_operator.api.crd import CRD_FILES, all_crds, to_yaml
from llama_operator.api.k8s import TOLERATION_RULES
from llama_operator.api.v1beta1 import (
    ARGS_RULES,
    BUDGET_RULES,
    DISRUPTION_RULES,
    GGUF_FILE_RULES,
    HOST_PATH_RULES,
    SERVER_RULES,
    SOURCE_RULES,
    SPECULATIVE_RULES,
    LlamaModelSpec,
    LlamaServerSpec,
)
from llama_operator.cli import main
from tests import crdschema
from tests.conftest import model_body, server_body

from .flag_cases import BAD_CASES, GOOD_CASES

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
        # OpenAPI v3 as the API server reads it: exclusive bounds are booleans beside minimum/maximum (a number,
        # JSON Schema 2020's form that pydantic writes for gt/lt, makes the API server refuse the whole CRD).
        for bound, beside in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            assert bound not in node or (node[bound] is True and beside in node), f"{path}.{bound}: {node[bound]}"


@pytest.mark.parametrize("crd", all_crds(), ids=lambda c: c["metadata"]["name"])
def test_every_spec_string_list_and_map_is_bounded(crd: dict[str, Any]) -> None:
    """maxLength on every string (or an enum), maxItems on every list, maxProperties and a key rule on every map,
    a length rule on every int-or-string: what a tenant writes is bounded before it reaches the operator."""
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(spec, ".spec"):
        kind = node.get("type")
        if kind == "string":
            assert "maxLength" in node or "enum" in node, f"unbounded string {path}"
        elif kind == "array":
            assert "maxItems" in node, f"unbounded list {path}"
        elif kind == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"unbounded map {path}"
            assert any("size(k)" in rule["rule"] for rule in node.get(CEL_KEY, [])), f"unbounded map keys {path}"
        elif node.get("x-kubernetes-int-or-string"):
            assert "maxLength" in node or node.get(CEL_KEY), f"unbounded int-or-string {path}"


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
    assert columns == ["Model", "Phase", "Ready", "Download", "Loaded", "Workers", "Endpoint", "Memory", "Age"]


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
    "contextSize not a number": ({"contextSize": "4k"}, "spec.contextSize: must be a number of tokens or 'auto'"),
    "contextSize autox": ({"contextSize": "autox"}, "spec.contextSize: must be a number of tokens or 'auto'"),
    "contextSize auto without a limit": ({"contextSize": "auto"}, "contextSize auto sizes the context to the memory"),
    "bad flash attention": ({"flashAttention": "yes"}, "'yes' is not one of ['auto', 'on', 'off']"),
    "toleration typo": ({"tolerations": [{"key": "k", "operater": "Exists"}]}, "('operater' was unexpected)"),
    "gpuLayers word": ({"gpuLayers": "most"}, "spec.gpuLayers: must be a number, 'auto' or 'all'"),
    "negative gpuLayers": ({"gpuLayers": -1}, "spec.gpuLayers: must be >= 0, 'auto' or 'all'"),
    "empty arg": ({"args": ["--jinja", ""]}, "spec.args: empty strings are not valid llama-server arguments"),
    "too many args": ({"args": ["--jinja"] * 129}, "is too long"),
    "oversized arg": ({"args": ["--grammar", "x" * 2049]}, "is too long"),
    "alias with a slash": ({"alias": "team-b/prod"}, "does not match"),
    "router alias with a slash": ({"models": [{"modelRef": {"name": "a"}, "alias": "b/c"}]},
                                  "does not match"),
    "oversized image": ({"image": "r.io/" + "x" * 600}, "is too long"),
    "oversized env value": ({"env": [{"name": "X", "value": "v" * 9000}]}, "is too long"),
    "too many tolerations": ({"tolerations": [{"key": f"k{i}", "operator": "Exists"} for i in range(33)]},
                             "is too long"),
    "Exists toleration without key": ({"tolerations": [{"operator": "Exists"}]},
                                      "spec.tolerations[0].key: operator Exists needs a key"),
    "oversized annotation key": ({"podAnnotations": {"k" * 400: "v"}}, "keys must be 1 to 317 characters long"),
    "too many pod labels": ({"podLabels": {f"l{i}": "v" for i in range(65)}}, "has too many properties"),
    "oversized quantity": ({"resources": {"limits": {"memory": "1" * 70}}}, "is too long"),
}


@pytest.mark.parametrize(("spec", "message"), BAD_SERVERS.values(), ids=BAD_SERVERS.keys())
def test_schema_rejects_bad_servers(spec: dict[str, Any], message: str) -> None:
    problems = crdschema.errors(server_body(**spec))
    assert any(message in p for p in problems), problems


BAD_MODELS = {
    "no source": ({"source": {}}, "spec.source: exactly one of huggingFace, http, volume must be set (got none)"),
    "two sources": ({"source": {"http": {"url": "https://h/m.gguf"},
                                "volume": {"persistentVolumeClaim": "p", "path": "m.gguf"}}},
                    "spec.source: exactly one of huggingFace, http, volume must be set (got http, volume)"),
    "absolute path": ({"source": {"volume": {"persistentVolumeClaim": "p", "path": "/models/m.gguf"}}},
                      "spec.source.volume.path: must be a relative path inside the repository or volume"),
    "not a gguf": ({"source": {"huggingFace": {"repo": "a/b", "file": "model.bin"}}},
                   "spec.source.huggingFace.file: must name a .gguf file"),
    "bad sha": ({"source": {"http": {"url": "https://h/m.gguf"}}, "sha256": "XYZ"}, "does not match"),
    "not a url": ({"source": {"http": {"url": "ftp://h/m.gguf"}}}, "does not match"),
    "host path /": ({"source": {"http": {"url": "https://h/m.gguf"}}, "cache": {"type": "HostPath", "path": "/"}},
                    "spec.cache.path: must be a relative directory below the operator's HostPath root"),
    "absolute host path": ({"source": {"http": {"url": "https://h/m.gguf"}},
                            "cache": {"type": "HostPath", "path": "/var/lib/kubelet"}},
                           "spec.cache.path: must be a relative directory below the operator's HostPath root"),
    "host path ..": ({"source": {"http": {"url": "https://h/m.gguf"}},
                      "cache": {"type": "HostPath", "path": "team-a/../../etc"}},
                     "spec.cache.path: must be a relative directory below the operator's HostPath root"),
    "oversized url": ({"source": {"http": {"url": "https://h/" + "m" * 2100 + ".gguf"}}}, "is too long"),
}


@pytest.mark.parametrize(("spec", "message"), BAD_MODELS.values(), ids=BAD_MODELS.keys())
def test_schema_rejects_bad_models(spec: dict[str, Any], message: str) -> None:
    problems = crdschema.errors(model_body(spec=spec))
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize(("title", "fields", "messages", "rules"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_flag_table_rows_with_a_cel_rule_are_refused_by_the_schema(title: str, fields: dict[str, Any],
                                                                   messages: list[str], rules: list[str]) -> None:
    # A row whose rules are all CEL rules is refused at `kubectl apply` with the operator's very messages; the
    # others (the flag catalog) pass the schema and are the webhook's.
    problems = crdschema.errors(server_body(**fields))
    if set(rules) <= CEL_RULE_IDS:
        assert problems == messages
    else:
        assert problems == []


CEL_RULE_IDS = {rule.id for rule in SERVER_RULES + SPECULATIVE_RULES}

SERVER_CORPUS = [fields for _, fields, _, _ in BAD_CASES] + GOOD_CASES + [
    {"mode": "embedding", "batchSize": 512, "ubatchSize": 1024},
    {"mode": "rerank", "args": ["--pooling"]},
    {"mode": "rerank", "args": ["--top-k", "3", "--pooling", "rank"]},
    {"mode": "embedding", "args": ["--pooling", "cls"]},
    {"args": ["--jinja"]},
    {"gpu": {"vendor": "amd"}, "tensorSplit": [1]},
    {"gpu": {"vendor": "amd", "count": 3}, "tensorSplit": [1, -1, 1]},
    {"tensorSplit": []},
    {"cacheTypeV": "f16"},
    {"cacheTypeV": "q4_0", "flashAttention": "on"},
    {"speculative": {"draftModelRef": {"name": "d"}, "draftMin": 2}},
    {"speculative": {"draftModelRef": {"name": "d"}, "draftMin": 4, "draftMax": 4}},
    {"contextSize": "auto"},
    {"contextSize": "auto", "resources": {"limits": {"memory": "2Gi"}}},
    {"contextSize": "auto", "resources": {"requests": {"memory": "2Gi"}}},
    {"contextSize": "auto", "gpu": {"vendor": "nvidia"}, "resources": {"limits": {"memory": "2Gi"}}},
    {"contextSize": "auto", "gpu": {"vendor": "nvidia", "memory": "24Gi"}},
    {"contextSize": 4096},
]


@pytest.mark.parametrize("fields", SERVER_CORPUS, ids=[str(f) for f in SERVER_CORPUS])
def test_server_cel_rules_say_what_their_python_says(fields: dict[str, Any]) -> None:
    # Each rule is declared once with its CEL and its Python predicate: they must agree, messages included.
    body = server_body(**fields)
    spec = LlamaServerSpec.model_validate(body["spec"])
    found = violations(SERVER_RULES, spec, "spec")
    if spec.speculative is not None:
        found += violations(SPECULATIVE_RULES, spec.speculative, "spec.speculative")
    assert sorted(crdschema.cel_errors(body)) == sorted(f"{path}: {message}" for path, message, _ in found)


MODEL_CORPUS = [
    {"huggingFace": {"repo": "a/b", "file": "m.gguf"}},
    {"http": {"url": "https://h/m.gguf"}},
    {"volume": {"persistentVolumeClaim": "p", "path": "dir/m.gguf"}},
    {},
    {"huggingFace": {"repo": "a/b", "file": "m.gguf"}, "http": {"url": "https://h/m.gguf"}},
    {"huggingFace": {"repo": "a/b", "file": "m.gguf"}, "volume": {"persistentVolumeClaim": "p", "path": "m.gguf"}},
    {"huggingFace": {"repo": "a/b", "file": "m.gguf"}, "http": {"url": "https://h/m.gguf"},
     "volume": {"persistentVolumeClaim": "p", "path": "m.gguf"}},
]


@pytest.mark.parametrize("source", MODEL_CORPUS, ids=[",".join(s) or "none" for s in MODEL_CORPUS])
def test_model_cel_rules_say_what_their_python_says(source: dict[str, Any]) -> None:
    body = model_body(spec={"source": source})
    try:
        LlamaModelSpec.model_validate(body["spec"])
        python: list[str] = []
    except ValueError as exc:
        python = [f"spec.source: {error['msg'].removeprefix('Value error, ')}" for error in exc.errors()]
    assert crdschema.cel_errors(body) == python


SCALARS: list[tuple[tuple[Rule, ...], list[Any]]] = [
    (GPU_LAYERS_RULES, [0, 7, 999, -1, "auto", "all", "All", "", "12"]),
    (CONTEXT_SIZE_RULES, [0, 4096, 16777216, 16777217, -1, "auto", "autox", "Auto", "", "4096"]),
    (GGUF_FILE_RULES, ["m.gguf", "dir/m-00001-of-00002.gguf", "/m.gguf", "../m.gguf", "a/../m.gguf", "a/..",
                       "..", "m.bin", "a..b.gguf", "dir/..m.gguf"]),
    (ARGS_RULES, [["--jinja"], [], ["--top-k", ""], [""]]),
    (HOST_PATH_RULES, ["llm", "team-a/llm", "team-a/llm/", "/", "/etc", "..", "../x", "a/../b", "a/..", ".", "./a",
                       "a/./b", "a//b", "a b", "a\nb", "a..b", ".hidden", "x/.."]),
]


@pytest.mark.parametrize(("rules", "values"), SCALARS, ids=["gpuLayers", "contextSize", "ggufFile", "args",
                                                             "hostPath"])
def test_field_cel_rules_say_what_their_python_says(rules: tuple[Rule, ...], values: list[Any]) -> None:
    for rule in rules:
        for value in values:
            assert crdschema.evaluate(rule.cel, value) == rule.holds(value), (rule.id, value)
            if not rule.holds(value):
                expression = rule.to_schema().get("messageExpression")
                assert (crdschema.evaluate(expression, value) if expression else rule.message) \
                    == rule.violation(value)


def test_every_rule_is_in_the_crds() -> None:
    in_crds = [entry["rule"] for crd in all_crds()
               for _, node in _walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
               for entry in node.get(CEL_KEY) or []]
    for rules in (SERVER_RULES, SPECULATIVE_RULES, SOURCE_RULES, GGUF_FILE_RULES, GPU_LAYERS_RULES, ARGS_RULES,
                  HOST_PATH_RULES, TOLERATION_RULES, CONTEXT_SIZE_RULES, BUDGET_RULES, DISRUPTION_RULES):
        for rule in rules:
            assert rule.cel in in_crds, rule.id


def test_cross_namespace_model_ref_is_not_expressible_in_the_schema_and_caught_by_the_operator() -> None:
    # CEL in a CRD cannot read metadata.namespace (the API server refuses a rule that does: measured in
    # tests/integration/test_bad_input_apply.py); the operator and the webhook reject it.
    body = server_body(modelRef={"name": "qwen", "namespace": "other"})
    assert crdschema.errors(body) == []
    from llama_operator.api.v1beta1 import LlamaServer
    from llama_operator.config import Settings
    from llama_operator.flags.spec import spec_problems

    assert "its own namespace" in spec_problems(LlamaServer.model_validate(body).spec, "default", Settings())[0]
