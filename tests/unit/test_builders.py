"""Table tests of the pure builders: one row per situation users hit."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator import __version__
from llama_operator.api.v1beta1 import LlamaModel
from llama_operator.builders import build_cache_pvc, build_deployment, build_service
from llama_operator.builders.resources import derived_threads
from llama_operator.config import Settings
from llama_operator.contract import DRAIN_CONTAINER, OPERATOR_VERSION_ANNOTATION
from tests.conftest import resolved_model, server


def _containers(dep: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = dep["spec"]["template"]["spec"]
    return pod["initContainers"][0], pod["containers"][0]


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


CASES = {
    "cpu": dict(
        spec={"resources": {"limits": {"cpu": "3500m", "memory": "4Gi"}}},
        image="ghcr.io/ggml-org/llama.cpp:server-b11312",
        gpu_key=None, strategy="RollingUpdate", threads="3", ngl=None,
    ),
    "nvidia-1": dict(
        spec={"gpu": {"vendor": "nvidia", "count": 1}, "resources": {"limits": {"cpu": "8"}}},
        image="ghcr.io/ggml-org/llama.cpp:server-cuda-b11312",
        gpu_key=("nvidia.com/gpu", 1), strategy="Recreate", threads=None, ngl="all",
    ),
    "amd-2": dict(
        spec={"gpu": {"vendor": "amd", "count": 2}, "splitMode": "layer", "tensorSplit": [3, 1]},
        image="ghcr.io/ggml-org/llama.cpp:server-rocm-b11312",
        gpu_key=("amd.com/gpu", 2), strategy="Recreate", threads=None, ngl="all",
    ),
    "intel-custom-image": dict(
        spec={"gpu": {"vendor": "intel"}, "image": "registry.example/llama:mine", "gpuLayers": 20},
        image="registry.example/llama:mine",
        gpu_key=("gpu.intel.com/i915", 1), strategy="Recreate", threads=None, ngl="20",
    ),
    "cpu-request-only": dict(
        spec={"resources": {"requests": {"cpu": "2"}}},
        image="ghcr.io/ggml-org/llama.cpp:server-b11312",
        gpu_key=None, strategy="RollingUpdate", threads="2", ngl=None,
    ),
    "cpu-explicit-threads": dict(
        spec={"threads": 6, "resources": {"limits": {"cpu": "2"}}},
        image="ghcr.io/ggml-org/llama.cpp:server-b11312",
        gpu_key=None, strategy="RollingUpdate", threads="6", ngl=None,
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_deployment_table(case: dict[str, Any], settings: Settings) -> None:
    dep = build_deployment(server(**case["spec"]), resolved_model(), settings)
    fetch, main = _containers(dep)
    args = main["args"]
    assert main["image"] == case["image"]
    assert dep["spec"]["strategy"]["type"] == case["strategy"]
    assert _flag(args, "--threads") == case["threads"]
    assert _flag(args, "--n-gpu-layers") == case["ngl"]
    limits = main["resources"].get("limits", {})
    tolerations = dep["spec"]["template"]["spec"].get("tolerations", [])
    if case["gpu_key"]:
        key, count = case["gpu_key"]
        assert limits[key] == count
        assert {"key": key, "operator": "Exists", "effect": "NoSchedule"} in tolerations
    else:
        assert not any(k.endswith("gpu") or "i915" in k for k in limits)
        assert tolerations == []
    # managed flags, each exactly once
    for flag in ("--model", "--host", "--port", "--alias", "--metrics"):
        assert args.count(flag) == 1, flag
    model_file = "/models/qwen2-5-0-5b-instruct-q4-k-m-0123456789ab/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    assert _flag(args, "--model") == model_file
    assert fetch["name"] == "fetch-model" and fetch["args"][0] == "fetch"


def test_tolerations_are_merged_not_duplicated(settings: Settings) -> None:
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    user = {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
    dep = build_deployment(server(gpu={"vendor": "nvidia"}, tolerations=[user, gpu_toleration]), resolved_model(),
                           settings)
    assert dep["spec"]["template"]["spec"]["tolerations"] == [user, gpu_toleration]


def test_security_context_is_restricted(settings: Settings) -> None:
    pod = build_deployment(server(), resolved_model(), settings)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["initContainers"] + pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["readOnlyRootFilesystem"] is True


def test_probes_give_loading_a_budget_and_readiness_is_fast(settings: Settings) -> None:
    main = _containers(build_deployment(server(startupTimeoutSeconds=3600), resolved_model(), settings))[1]
    startup, readiness = main["startupProbe"], main["readinessProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] == 3600
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 15


def test_secrets_travel_only_as_secret_refs(settings: Settings) -> None:
    model = resolved_model(spec={"source": {"huggingFace": {
        "repo": "org/gated-GGUF", "file": "m.gguf", "tokenSecretRef": {"name": "hf", "key": "token"}}}})
    dep = build_deployment(server(apiKeySecretRef={"name": "api", "key": "k"}), model, settings)
    fetch, main = _containers(dep)
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in fetch["env"]
    assert {"name": "LLAMA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "api", "key": "k"}}} in main["env"]
    assert not any("token" in a.lower() or "api-key" in a for a in fetch["args"] + main["args"])


def test_http_headers_come_from_secret_env(settings: Settings) -> None:
    model = resolved_model(spec={"source": {"http": {"url": "https://h/m.gguf", "headersSecretRef": {"name": "hdr"}}}})
    fetch = _containers(build_deployment(server(), model, settings))[0]
    assert fetch["envFrom"] == [{"prefix": "LLAMA_FETCH_HEADER_", "secretRef": {"name": "hdr"}}]
    assert "--url" in fetch["args"] and "https://h/m.gguf" in fetch["args"]


def test_volume_source_mounts_read_only_and_skips_fetch(settings: Settings) -> None:
    model = resolved_model(spec={"source": {"volume": {"persistentVolumeClaim": "shared", "path": "a/m.gguf"}}})
    pod = build_deployment(server(), model, settings)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == [DRAIN_CONTAINER]
    source = {"name": "model-source", "persistentVolumeClaim": {"claimName": "shared", "readOnly": True}}
    assert source in pod["volumes"]
    assert _flag(pod["containers"][0]["args"], "--model") == "/model-source/a/m.gguf"


def test_sha_change_rolls_pods(settings: Settings) -> None:
    one = build_deployment(server(), resolved_model(status={"sha256": "a" * 64}), settings)
    two = build_deployment(server(), resolved_model(status={"sha256": "b" * 64}), settings)
    assert one["spec"]["template"] != two["spec"]["template"]


def test_setting_change_changes_template(settings: Settings) -> None:
    one = build_deployment(server(contextSize=4096), resolved_model(), settings)
    two = build_deployment(server(contextSize=8192), resolved_model(), settings)
    assert one["spec"]["template"] != two["spec"]["template"]
    assert one["spec"]["selector"] == two["spec"]["selector"]  # immutable on a real cluster


@pytest.mark.parametrize(("cache", "expected"), [
    ({"type": "EmptyDir", "size": "5Gi"}, {"name": "model-cache", "emptyDir": {"sizeLimit": "5Gi"}}),
    ({"type": "HostPath"}, {"name": "model-cache",
                            "hostPath": {"path": "/var/lib/llama-operator/models", "type": "DirectoryOrCreate"}}),
    ({"type": "HostPath", "path": "team-a/llm"},
     {"name": "model-cache", "hostPath": {"path": "/var/lib/llama-operator/models/team-a/llm",
                                          "type": "DirectoryOrCreate"}}),
    ({"type": "EmptyDir"}, {"name": "model-cache", "emptyDir": {"sizeLimit": "72Gi"}}),  # size unknown: the cap
    ({"type": "PersistentVolumeClaim", "size": "20Gi"},
     {"name": "model-cache", "persistentVolumeClaim": {"claimName": "qwen-cache"}}),
])
def test_cache_volume(cache: dict[str, Any], expected: dict[str, Any], settings: Settings) -> None:
    spec = {"source": {"http": {"url": "https://h/m.gguf"}}, "cache": cache}
    pod = build_deployment(server(), resolved_model(spec=spec), settings)["spec"]["template"]["spec"]
    assert expected in pod["volumes"]


def test_host_path_cache_server_mounts_only_its_models_directories(settings: Settings) -> None:
    """The fetcher writes into the node directory; llama-server (maybe a tenant's image) sees only the served
    and draft models' own subdirectories, read-only."""
    spec = {"source": {"http": {"url": "https://h/m.gguf"}}, "cache": {"type": "HostPath", "path": "team-a"}}
    model = resolved_model(spec=spec)
    draft = resolved_model(name="draft", spec=spec, status={"cacheKey": "draft-key-0123"})
    pod = build_deployment(server(speculative={"draftModelRef": {"name": "draft"}}), model, settings,
                           draft)["spec"]["template"]["spec"]
    main = pod["containers"][0]
    key = model.status.cache_key
    assert [m for m in main["volumeMounts"] if m["name"] == "model-cache"] == [
        {"name": "model-cache", "mountPath": f"/models/{key}", "subPath": key, "readOnly": True},
        {"name": "model-cache", "mountPath": "/models/draft-key-0123", "subPath": "draft-key-0123",
         "readOnly": True}]
    assert f"/models/{key}/qwen2.5-0.5b-instruct-q4_k_m.gguf" in main["args"]
    for fetcher in pod["initContainers"][:-1]:  # the last is the drain sidecar
        assert {"name": "model-cache", "mountPath": "/models"} in fetcher["volumeMounts"], fetcher["name"]


def test_fetchers_have_an_ephemeral_storage_request_and_limit(settings: Settings) -> None:
    """Every EmptyDir of the pod counts against the fetcher's limit: the caches' sizeLimits plus /tmp and logs;
    the scheduler reserves only what is known."""
    def fetcher(model: LlamaModel) -> dict[str, Any]:
        pod = build_deployment(server(), model, settings)["spec"]["template"]["spec"]
        assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
        return pod["initContainers"][0]["resources"]

    known = fetcher(resolved_model(status={"size": 10 * 2**30}))  # 12Gi cache
    assert known["requests"]["ephemeral-storage"] == known["limits"]["ephemeral-storage"] == "14Gi"
    unknown = fetcher(resolved_model())
    assert unknown["requests"]["ephemeral-storage"] == "2Gi"
    assert unknown["limits"]["ephemeral-storage"] == "74Gi"
    pvc = fetcher(resolved_model(spec={"source": {"http": {"url": "https://h/m.gguf"}},
                                       "cache": {"type": "PersistentVolumeClaim"}}, status={"size": 2**40}))
    assert pvc["requests"]["ephemeral-storage"] == pvc["limits"]["ephemeral-storage"] == "2Gi"


def test_a_draft_in_the_served_models_emptydir_counts_in_its_size(settings: Settings) -> None:
    model = resolved_model(status={"size": 10 * 2**30})  # 12Gi cache
    draft = resolved_model(name="draft", status={"size": 2**30, "cacheKey": "draft-key-0123"})  # 3Gi
    pod = build_deployment(server(speculative={"draftModelRef": {"name": "draft"}}), model, settings,
                           draft)["spec"]["template"]["spec"]
    assert {"name": "model-cache", "emptyDir": {"sizeLimit": "15Gi"}} in pod["volumes"]
    for fetcher in pod["initContainers"][:-1]:  # the last is the drain sidecar
        assert fetcher["resources"]["limits"]["ephemeral-storage"] == "17Gi", fetcher["name"]
        assert fetcher["resources"]["requests"]["ephemeral-storage"] == "17Gi", fetcher["name"]


def test_the_projector_counts_in_the_cache_size(settings: Settings) -> None:
    spec = {"source": {"http": {"url": "https://h/m.gguf"}}, "mmproj": {"file": "mmproj.gguf", "sha256": "b" * 64}}
    model = resolved_model(spec=spec, status={"size": 10 * 2**30, "mmproj": {
        "name": "mmproj.gguf", "url": "https://h/mmproj.gguf", "size": 3 * 2**30, "sha256": "b" * 64}})
    pod = build_deployment(server(), model, settings)["spec"]["template"]["spec"]
    assert {"name": "model-cache", "emptyDir": {"sizeLimit": "16Gi"}} in pod["volumes"]


def test_emptydir_size_defaults_to_model_size_plus_headroom(settings: Settings) -> None:
    model = resolved_model(status={"size": 10 * 2**30})
    pod = build_deployment(server(), model, settings)["spec"]["template"]["spec"]
    assert {"name": "model-cache", "emptyDir": {"sizeLimit": "12Gi"}} in pod["volumes"]


def test_cache_pvc(settings: Settings) -> None:
    spec = {"source": {"http": {"url": "https://h/m.gguf"}},
            "cache": {"type": "PersistentVolumeClaim", "accessModes": ["ReadWriteMany"], "storageClassName": "nfs"}}
    assert build_cache_pvc(resolved_model(spec=spec), settings) is None  # size unknown yet
    pvc = build_cache_pvc(resolved_model(spec=spec, status={"size": 4 * 2**30}), settings)
    assert pvc is not None
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "6Gi"}},
                           "storageClassName": "nfs"}
    assert pvc["metadata"]["ownerReferences"][0]["kind"] == "LlamaModel"


def test_service(settings: Settings) -> None:
    svc = build_service(server(service={"type": "LoadBalancer", "port": 80, "annotations": {"a": "b"}}))
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == {"app.kubernetes.io/name": "llama-server", "llamacpp.dev/server": "chat"}
    assert svc["metadata"]["annotations"] == {"a": "b", OPERATOR_VERSION_ANNOTATION: __version__}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-server"


@pytest.mark.parametrize(("resources", "expected"), [
    (None, None),
    ({"limits": {"cpu": "500m"}}, 1),
    ({"limits": {"cpu": 4}, "requests": {"cpu": "1"}}, 4),
    ({"requests": {"cpu": "2.5"}}, 2),
    ({"limits": {"memory": "1Gi"}}, None),
])
def test_threads_from_cpu(resources: dict[str, Any] | None, expected: int | None) -> None:
    spec = {"resources": resources} if resources else {}
    assert derived_threads(server(**spec)) == expected
