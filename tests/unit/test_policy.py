"""The operator's tenant policy (policy.py): settings from the environment, what it refuses, where it is asked."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.admission import model_spec_problems, server_spec_problems
from llama_operator.api.v1beta1 import LlamaModelSpec, LlamaServerSpec
from llama_operator.config import DEFAULT_IMAGES, Settings, SettingsError, TenantPolicy
from llama_operator.flags.spec import spec_problems
from llama_operator.policy import model_policy_problems, tenant_problems
from llama_operator.render import RenderError, render
from llama_operator.sandbox.helm import values_from_env

STRICT = Settings(policy=TenantPolicy(custom_images=True, image_prefixes=("registry.example.com/llama/",),
                                      runtime_class_names=("nvidia",), priority_class_names=()))
HOST_PATH_MODEL = {"source": {"http": {"url": "https://h/m.gguf"}}, "cache": {"type": "HostPath", "path": "team-a"}}


def _server(**fields: Any) -> LlamaServerSpec:
    return LlamaServerSpec.model_validate({"modelRef": {"name": "m"}, **fields})


@pytest.mark.parametrize(("fields", "message"), [
    ({"image": "docker.io/evil/llama:latest"},
     "spec.image: 'docker.io/evil/llama:latest' is not under an image prefix the operator's policy allows "
     "(policy.allowedImagePrefixes: registry.example.com/llama/)"),
    # A prefix is matched as written, so a lookalike repository next to it is not under it.
    ({"image": "registry.example.com/llama-evil/x:1"}, "is not under an image prefix"),
    ({"runtimeClassName": "runc-privileged"},
     "spec.runtimeClassName: 'runc-privileged' is not allowed by the operator's policy "
     "(policy.allowedRuntimeClassNames: nvidia)"),
    ({"priorityClassName": "system-cluster-critical"},
     "spec.priorityClassName: 'system-cluster-critical' is not allowed by the operator's policy "
     "(policy.allowedPriorityClassNames: none)"),
    ({"podAnnotations": {"container.apparmor.security.beta.kubernetes.io/llama-server": "unconfined"}},
     "spec.podAnnotations: 'container.apparmor.security.beta.kubernetes.io/llama-server' is security-relevant"),
    ({"podAnnotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}}, "is security-relevant"),
    ({"podAnnotations": {"io.kubernetes.cri-o.Devices": "/dev/mem"}}, "is security-relevant"),
    ({"podAnnotations": {"llamacpp.dev/model-sha256": "0" * 64}}, "is security-relevant"),
])
def test_the_policy_refuses(fields: dict[str, Any], message: str) -> None:
    problems = tenant_problems(_server(**fields), STRICT)
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("fields", [
    {},
    {"image": "registry.example.com/llama/server:b11312"},
    {"image": DEFAULT_IMAGES["cpu"]},  # the operator's own image is never "custom"
    {"runtimeClassName": "nvidia"},
    {"podAnnotations": {"prometheus.io/scrape": "false", "team": "a"}},
])
def test_the_policy_admits(fields: dict[str, Any]) -> None:
    assert tenant_problems(_server(**fields), STRICT) == []


def test_custom_images_off() -> None:
    settings = Settings(policy=TenantPolicy(custom_images=False))
    assert tenant_problems(_server(image="ghcr.io/me/llama:1"), settings) == [
        "spec.image: custom images are turned off by the operator's policy (chart value policy.customImages); "
        "remove spec.image to run the operator's llama-server image"]
    assert tenant_problems(_server(), settings) == []


def test_the_default_policy_keeps_what_worked_except_host_path() -> None:
    default = Settings()
    assert tenant_problems(_server(image="ghcr.io/me/llama:1", runtimeClassName="nvidia",
                                   priorityClassName="high"), default) == []
    assert model_policy_problems(LlamaModelSpec.model_validate(HOST_PATH_MODEL), default) == [
        "spec.cache.type: HostPath caches are turned off by the operator's policy (chart value "
        "policy.hostPathCache); use EmptyDir or PersistentVolumeClaim"]
    enabled = Settings(policy=TenantPolicy(host_path_cache=True))
    assert model_policy_problems(LlamaModelSpec.model_validate(HOST_PATH_MODEL), enabled) == []


def test_every_entry_point_asks_the_policy(tmp_path: Any) -> None:
    """The webhook, the reconcile's spec validation and `render` all refuse what the policy refuses."""
    spec = {"modelRef": {"name": "m"}, "runtimeClassName": "runc-privileged"}
    assert any("runtimeClassName" in p for p in server_spec_problems(spec, namespace="default", settings=STRICT))
    assert any("runtimeClassName" in p for p in spec_problems(_server(**spec), "default", STRICT))
    assert model_spec_problems(HOST_PATH_MODEL, settings=Settings())[0].startswith("spec.cache.type: HostPath")
    path = tmp_path / "model.yaml"
    path.write_text("apiVersion: llamacpp.dev/v1beta1\nkind: LlamaModel\nmetadata: {name: m}\nspec:\n"
                    "  source: {http: {url: 'https://h/m.gguf'}}\n  cache: {type: HostPath, path: team-a}\n")
    with pytest.raises(RenderError, match="HostPath caches are turned off"):
        render([str(path)], Settings())
    assert render([str(path)], Settings(policy=TenantPolicy(host_path_cache=True))) == []


def test_settings_from_the_environment() -> None:
    assert Settings.from_env({}).policy == TenantPolicy()
    policy = Settings.from_env({
        "LLAMA_OPERATOR_HOSTPATH_CACHE": "true", "LLAMA_OPERATOR_CUSTOM_IMAGES": "false",
        "LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES": "registry.example.com/llama/, ghcr.io/ggml-org/llama.cpp:",
        "LLAMA_OPERATOR_ALLOWED_RUNTIME_CLASSES": "nvidia", "LLAMA_OPERATOR_ALLOWED_PRIORITY_CLASSES": ""}).policy
    assert policy == TenantPolicy(host_path_cache=True, custom_images=False,
                                  image_prefixes=("registry.example.com/llama/", "ghcr.io/ggml-org/llama.cpp:"),
                                  runtime_class_names=("nvidia",), priority_class_names=())
    with pytest.raises(SettingsError, match="each prefix must end with '/', ':' or '@'"):
        Settings.from_env({"LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES": "ghcr.io/org/llama"})
    with pytest.raises(SettingsError, match="needs HostPath caches enabled"):
        Settings.from_env({"LLAMA_OPERATOR_DEFAULT_CACHE_TYPE": "HostPath"})
    with pytest.raises(SettingsError, match="must be true or false"):
        Settings.from_env({"LLAMA_OPERATOR_HOSTPATH_CACHE": "yes"})


def test_the_sandbox_hands_the_policy_to_the_chart() -> None:
    assert values_from_env({"LLAMA_OPERATOR_HOSTPATH_CACHE": "true", "LLAMA_OPERATOR_CUSTOM_IMAGES": "false",
                            "LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES": "a.io/x/,b.io/",
                            "LLAMA_OPERATOR_ALLOWED_PRIORITY_CLASSES": ""}) == {
        "policy": {"hostPathCache": True, "customImages": False, "allowedImagePrefixes": ["a.io/x/", "b.io/"],
                   "allowedPriorityClassNames": []}}
