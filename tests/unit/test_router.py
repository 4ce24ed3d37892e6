"""Router mode (spec.models): the API rules, the preset renderer, the Deployment and ConfigMap builders."""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import pytest
import yaml

from llama_operator.admission import server_spec_problems
from llama_operator.api.cel import violations
from llama_operator.api.v1beta1 import (
    ROUTER_RULES,
    SERVED_MODEL_RULES,
    LlamaModel,
    LlamaServer,
    LlamaServerSpec,
)
from llama_operator.builders.router import (
    PRESET_ANNOTATION,
    build_preset,
    build_preset_configmap,
    build_router_deployment,
    router_args,
)
from llama_operator.config import Settings
from llama_operator.errors import InvalidSpec
from llama_operator.flags.preset import Section, entries, render_ini
from llama_operator.flags.spec import spec_problems
from llama_operator.reconcile.server_status import summarize_pod
from llama_operator.render import render
from tests import crdschema, pss
from tests.conftest import model_body

REPO = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = pathlib.Path(__file__).parent / "golden" / "multi-model.yaml"


def router_body(models: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer",
            "metadata": {"name": "fleet", "namespace": "default", "generation": 1, "uid": "uid-fleet"},
            "spec": {"models": models, **spec}}


def router(models: list[dict[str, Any]], **spec: Any) -> LlamaServer:
    return LlamaServer.model_validate(router_body(models, **spec))


def ready_model(name: str, key: str, **spec: Any) -> LlamaModel:
    status = {"phase": "Ready", "cacheKey": key, "files": [{"name": f"{name}.gguf"}]}
    if "mmproj" in spec:
        status["mmproj"] = {"name": spec["mmproj"]["file"].rsplit("/", 1)[-1], "sha256": "b" * 64,
                            "url": f"https://h/{spec['mmproj']['file']}"}
    source = {"huggingFace": {"repo": "org/repo", "file": f"{name}.gguf"}}
    return LlamaModel.model_validate(model_body(name, spec={"source": source, **spec}, status=status))


MODELS = {
    "a": ready_model("a", "a-111"),
    "b": ready_model("b", "b-222", source={"http": {"url": "https://h/b.gguf"}}, sha256="c" * 64,
                     cache={"type": "PersistentVolumeClaim"}),
    "c": ready_model("c", "c-333", source={"volume": {"persistentVolumeClaim": "shelf", "path": "m/c.gguf"}}),
}
THREE = [{"modelRef": {"name": "a"}, "contextSize": 2048, "loadOnStartup": True},
         {"modelRef": {"name": "b"}, "alias": "bee", "cacheTypeV": "q8_0", "flashAttention": "on"},
         {"modelRef": {"name": "c"}, "mode": "embedding", "idleUnloadSeconds": 30}]


# ---------------------------------------------------------------------------------------------- preset


def test_preset_has_one_section_per_model_with_its_files_and_settings(settings: Settings) -> None:
    ini = build_preset(router(THREE, maxLoaded=2), MODELS, settings)
    assert ini.split("\n", 1)[1] == (
        "\n[a]\n"
        "model = /run/llama-server/model-cache-0/a-111/a.gguf\n"
        "ctx-size = 2048\n"
        "load-on-startup = true\n"
        "\n[bee]\n"
        "model = /run/llama-server/model-cache-1/b-222/b.gguf\n"
        "flash-attn = on\n"
        "cache-type-v = q8_0\n"
        "\n[c]\n"
        "model = /run/llama-server/model-source-0/m/c.gguf\n"
        "embedding = true\n"
        "sleep-idle-seconds = 30\n")


def test_gpu_servers_offload_every_model_unless_it_says_otherwise(settings: Settings) -> None:
    models = [{"modelRef": {"name": "a"}}, {"modelRef": {"name": "a"}, "alias": "a-cpu", "gpuLayers": 0}]
    ini = build_preset(router(models, gpu={"vendor": "nvidia"}), MODELS, settings)
    assert "[a]\nmodel = /run/llama-server/model-cache-0/a-111/a.gguf\ngpu-layers = all\n" in ini
    assert "[a-cpu]\nmodel = /run/llama-server/model-cache-0/a-111/a.gguf\ngpu-layers = 0\n" in ini


def test_flags_become_preset_lines_through_the_catalog() -> None:
    assert entries(["--ctx-size", "4096", "--reranking", "-fa", "on", "--no-kv-offload"]) == [
        ("ctx-size", "4096"), ("rerank", "true"), ("flash-attn", "on"), ("kv-offload", "false")]
    with pytest.raises(ValueError, match="unknown flag"):
        entries(["--ctx-sise", "1"])


@pytest.mark.parametrize("value", ["/models/a;b.gguf", "/models/a#b.gguf", "a\nmodel = /etc/passwd", " x"])
def test_values_an_ini_line_cannot_carry_are_refused_not_escaped(value: str) -> None:
    with pytest.raises(InvalidSpec, match="cannot be written to the preset file"):
        render_ini([Section("m", (("model", value),))])
    with pytest.raises(InvalidSpec, match="cannot be a preset section"):
        render_ini([Section("m]x", ())])


# ---------------------------------------------------------------------------------------------- deployment


def _pod(dep: dict[str, Any]) -> dict[str, Any]:
    return dep["spec"]["template"]["spec"]


def test_every_distinct_model_is_fetched_once_into_its_cache(settings: Settings) -> None:
    models = [*THREE, {"modelRef": {"name": "a"}, "alias": "a-long", "contextSize": 8192}]
    pod = _pod(build_router_deployment(router(models), MODELS, settings))
    fetchers = [(c["name"], c["args"][c["args"].index("--cache-key") + 1], c["volumeMounts"][0])
                for c in pod["initContainers"][:-1]]  # the last is the drain sidecar
    # c is on the user's volume: nothing to download; a is used twice and fetched once.
    assert fetchers == [("fetch-model-0", "a-111", {"name": "model-cache-0", "mountPath": "/models"}),
                        ("fetch-model-1", "b-222", {"name": "model-cache-1", "mountPath": "/models"})]
    volumes = {v["name"]: {k: x for k, x in v.items() if k != "name"} for v in pod["volumes"]}
    assert volumes["model-cache-1"] == {"persistentVolumeClaim": {"claimName": "b-cache"}}
    assert volumes["model-source-0"] == {"persistentVolumeClaim": {"claimName": "shelf", "readOnly": True}}
    assert volumes["models-preset"] == {"configMap": {"name": "fleet-models"}}
    # Sized from status.size when known; unknown here: room for the fetcher's cap on downloads of unknown size.
    assert volumes["model-cache-0"] == {"emptyDir": {"sizeLimit": "72Gi"}}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts == {"model-cache-0": "/run/llama-server/model-cache-0",
                      "model-cache-1": "/run/llama-server/model-cache-1",
                      "model-source-0": "/run/llama-server/model-source-0",
                      "models-preset": "/run/llama-server/preset", "tmp": "/tmp"}
    assert pss.violations(pod) == []


def test_models_on_one_pvc_share_one_volume_and_emptydirs_do_not(settings: Settings) -> None:
    pvc = {"type": "PersistentVolumeClaim"}
    shared = {"a": ready_model("a", "a-1", cache={"type": "HostPath", "path": "srv/llm"}),
              "b": ready_model("b", "b-2", cache={"type": "HostPath", "path": "srv/llm"}),
              "c": ready_model("c", "c-3", cache=pvc), "d": ready_model("d", "d-4"), "e": ready_model("e", "e-5")}
    models = [{"modelRef": {"name": n}} for n in "abcde"]
    pod = _pod(build_router_deployment(router(models), shared, settings))
    assert [c["volumeMounts"][0]["name"] for c in pod["initContainers"][:-1]] == \
        ["model-cache-0", "model-cache-0", "model-cache-1", "model-cache-2", "model-cache-3"]
    assert [v["name"] for v in pod["volumes"]] == \
        ["model-cache-0", "model-cache-1", "model-cache-2", "model-cache-3", "models-preset", "tmp"]
    assert pod["volumes"][0]["hostPath"] == {"path": "/var/lib/llama-operator/models/srv/llm",
                                             "type": "DirectoryOrCreate"}
    # The node's cache directory is shared: llama-server sees each of its models' directories, nothing else.
    host_mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model-cache-0"]
    assert host_mounts == [
        {"name": "model-cache-0", "mountPath": "/run/llama-server/model-cache-0/a-1", "subPath": "a-1",
         "readOnly": True},
        {"name": "model-cache-0", "mountPath": "/run/llama-server/model-cache-0/b-2", "subPath": "b-2",
         "readOnly": True}]
    preset = build_preset(router(models), shared, settings)
    assert "model = /run/llama-server/model-cache-0/a-1/a.gguf" in preset


def test_router_arguments(settings: Settings) -> None:
    spec = {"maxLoaded": 2, "args": ["--top-k", "20"], "resources": {"limits": {"cpu": "3"}}}
    main = _pod(build_router_deployment(router(THREE, **spec), MODELS, settings))["containers"][0]
    assert main["args"] == ["--models-preset", "/run/llama-server/preset/models.ini", "--host", "0.0.0.0",
                            "--port", "8080", "--metrics", "--models-max", "2", "--threads", "3", "--no-slots",
                            "--top-k", "20"]
    assert main["args"] == router_args(router(THREE, **spec))
    assert "--model" not in main["args"]


def test_a_change_of_one_models_settings_rolls_the_pods(settings: Settings) -> None:
    def template(models: list[dict[str, Any]]) -> dict[str, Any]:
        return build_router_deployment(router(models), MODELS, settings)["spec"]["template"]

    before = template(THREE)
    changed = [dict(THREE[0], contextSize=4096), *THREE[1:]]
    assert template(THREE) == before
    annotation = before["metadata"]["annotations"][PRESET_ANNOTATION]
    assert template(changed)["metadata"]["annotations"][PRESET_ANNOTATION] != annotation
    # The annotation is the preset's own hash: the ConfigMap's content and the template move together.
    data = build_preset_configmap(router(changed), MODELS, settings)["data"]["models.ini"]
    assert template(changed)["metadata"]["annotations"][PRESET_ANNOTATION] == hashlib.sha256(data.encode()).hexdigest()


def test_router_pods_are_not_scraped_without_a_model_name(settings: Settings) -> None:
    annotations = build_router_deployment(router(THREE), MODELS, settings)["spec"]["template"]["metadata"]
    assert "prometheus.io/scrape" not in annotations["annotations"]


def test_a_custom_image_dry_runs_the_router_arguments(settings: Settings) -> None:
    pod = _pod(build_router_deployment(router(THREE, image="registry.example/llama:mine"), MODELS, settings))
    dry = pod["initContainers"][-2]  # before the drain sidecar
    assert dry["name"] == "validate-args"
    assert dry["args"][:2] == ["--models-preset", "/run/llama-server/preset/models.ini"]
    assert dry["volumeMounts"] == pod["containers"][0]["volumeMounts"]


def test_the_configmap_is_owned_by_the_server(settings: Settings) -> None:
    cm = build_preset_configmap(router(THREE), MODELS, settings)
    assert cm["metadata"]["name"] == "fleet-models"
    assert cm["metadata"]["ownerReferences"][0]["kind"] == "LlamaServer"
    assert "llamacpp.dev/model" not in cm["metadata"]["labels"]  # several models: no one model label


def test_downloading_a_router_model_is_named_in_status() -> None:
    pod = {"metadata": {"name": "p"},
           "spec": {"initContainers": [{"name": "fetch-model-1", "args": ["fetch", "--cache-key", "b-222"]}]},
           "status": {"initContainerStatuses": [{"name": "fetch-model-0", "state": {"terminated": {"exitCode": 0}}},
                                                {"name": "fetch-model-1", "state": {"running": {}}}]}}
    assert summarize_pod(pod).message == "pod p: downloading model b-222"


def test_golden_multi_model_example() -> None:
    rendered = yaml.safe_dump_all(render([str(REPO / "examples" / "multi-model.yaml")], Settings()), sort_keys=False)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text(), "rendered objects changed; review, then UPDATE_GOLDEN=1 to accept"


# ---------------------------------------------------------------------------------------------- validation

BAD = [
    # (spec, the one message every layer says)
    ({"modelRef": {"name": "a"}, "models": [{"modelRef": {"name": "b"}}]},
     "spec: exactly one of modelRef, models must be set (got modelRef, models)"),
    ({"models": THREE, "contextSize": 4096},
     "spec.contextSize: with spec.models, contextSize is set per model: use spec.models[].contextSize"),
    ({"models": THREE, "mode": "embedding"},
     "spec.mode: with spec.models, mode is set per model: use spec.models[].mode"),
    ({"modelRef": {"name": "a"}, "maxLoaded": 2},
     "spec.maxLoaded: maxLoaded applies to spec.models (router mode) only"),
    ({"models": [{"modelRef": {"name": "a"}}, {"modelRef": {"name": "b"}, "alias": "a"}]},
     "spec.models: model name a is served twice: give each entry of spec.models its own alias"),
    ({"models": [{"modelRef": {"name": "a"}}, {"modelRef": {"name": "b"}, "cacheTypeV": "q4_0"}]},
     "spec.models[1].cacheTypeV: model b: a quantized V cache (q4_0) needs flash attention: set flashAttention: on"),
    ({"models": [{"modelRef": {"name": "a"}, "alias": "small", "batchSize": 2, "parallel": 4}]},
     "spec.models[0].batchSize: model small: batchSize (2) must be >= parallel (4): every slot needs room in a "
     "batch"),
    ({"models": [{"modelRef": {"name": "a"}, "mode": "rerank", "batchSize": 64, "ubatchSize": 32}]},
     "spec.models[0].ubatchSize: model a: mode rerank encodes each input in one physical batch: ubatchSize must "
     "equal batchSize (or leave ubatchSize unset and it follows batchSize)"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[m.split(":")[0] + " " + m.split(": ")[1][:30] for _, m in BAD])
def test_a_bad_router_spec_gets_the_same_message_from_cel_the_webhook_and_the_reconcile(
    spec: dict[str, Any], message: str
) -> None:
    body = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer", "metadata": {"name": "x"}, "spec": spec}
    assert crdschema.errors(body) == [message]
    assert server_spec_problems(spec, namespace="default", settings=Settings()) == [message]
    try:
        parsed = LlamaServerSpec.model_validate(spec)
    except ValueError as exc:  # the one rule everything downstream needs is a parse error
        assert f"spec: {exc.errors()[0]['msg'].removeprefix('Value error, ')}" == message
    else:
        assert spec_problems(parsed, "default", Settings()) == [message]


WEBHOOK_ONLY = [
    ({"models": [{"modelRef": {"name": "a"}}], "args": ["--sleep-idle-seconds", "60"]},
     "spec.args[0]: --sleep-idle-seconds is set per model with spec.models: use spec.models[].idleUnloadSeconds"),
    ({"models": [{"modelRef": {"name": "a", "namespace": "other"}}]},
     "spec.models[0].modelRef.namespace: must be omitted or 'default'; a LlamaServer can only use LlamaModels in "
     "its own namespace (got 'other')"),
    ({"modelRef": {"name": "a"}, "args": ["--mmproj", "/models/x.gguf"]},
     "spec.args[0]: --mmproj is managed by the operator: the multimodal projector comes from the LlamaModel's "
     "spec.mmproj"),
    ({"modelRef": {"name": "a"}, "args": ["--models-max", "2"]},
     "spec.args[0]: --models-max is managed by the operator: router mode is spec.models (one section per "
     "LlamaModel) and spec.maxLoaded"),
]


@pytest.mark.parametrize(("spec", "message"), WEBHOOK_ONLY, ids=[m.split(":")[0] for _, m in WEBHOOK_ONLY])
def test_what_cel_cannot_say_the_webhook_and_the_reconcile_say(spec: dict[str, Any], message: str) -> None:
    body = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer", "metadata": {"name": "x"}, "spec": spec}
    assert crdschema.errors(body) == []
    assert server_spec_problems(spec, namespace="default", settings=Settings()) == [message]
    assert spec_problems(LlamaServerSpec.model_validate(spec), "default", Settings()) == [message]


def test_a_good_router_spec_passes_everything() -> None:
    spec = {"models": THREE, "maxLoaded": 2, "gpu": {"vendor": "nvidia", "count": 2}, "tensorSplit": [1, 1],
            "args": ["--top-k", "20"]}
    body = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer", "metadata": {"name": "x"}, "spec": spec}
    assert crdschema.errors(body) == []
    assert spec_problems(LlamaServerSpec.model_validate(spec), "default", Settings()) == []


ROUTER_CORPUS = [spec for spec, _ in BAD if "models" in spec and "modelRef" not in spec] + [
    {"models": THREE},
    {"models": [{"modelRef": {"name": "a"}}, {"modelRef": {"name": "a"}, "alias": "b"}, {"modelRef": {"name": "b"}}]},
    {"models": [{"modelRef": {"name": "a"}, "alias": "x"}, {"modelRef": {"name": "x"}}]},
    {"models": [{"modelRef": {"name": "a"}, "cacheTypeV": "q8_0", "flashAttention": "on", "batchSize": 8,
                 "parallel": 8, "ubatchSize": 8, "mode": "embedding"}]},
]


@pytest.mark.parametrize("spec", ROUTER_CORPUS, ids=[str(i) for i in range(len(ROUTER_CORPUS))])
def test_router_cel_rules_say_what_their_python_says(spec: dict[str, Any]) -> None:
    body = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer", "metadata": {"name": "x"}, "spec": spec}
    parsed = LlamaServerSpec.model_validate(spec)
    found = violations(ROUTER_RULES, parsed, "spec")
    for index, entry in enumerate(parsed.models or []):
        found += violations(SERVED_MODEL_RULES, entry, f"spec.models[{index}]")
    assert sorted(crdschema.cel_errors(body)) == sorted(f"{path}: {message}" for path, message, _ in found)
