"""Rendered objects validate strictly for the oldest and newest Kubernetes the chart supports;
the operator's pod: restricted Pod Security, its shape, pinned images, and the environment the operator reads."""

from __future__ import annotations

import json
import re
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llama_operator import config
from tests.chart.chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    assert_qualified_and_pinned,
    env_of,
    render,
    the_deployment,
)
from tests.pss import pod_specs, violations

# Objects of CRD-defined kinds are not in kubernetes-validate's built-in schemas. They are validated against
# these minimal structural schemas instead (the fields the chart relies on), so a template typo still fails.
_STRUCTURAL = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}},
            }}},
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "minProperties": 1,
                                      "maxProperties": 1, "properties": {
                                          "any": {"type": "boolean"},
                                          "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}},
            }}},
    },
    ("cert-manager.io/v1", "Issuer"): {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False, "minProperties": 1,
                                "properties": {"selfSigned": {"type": "object"}, "ca": {"type": "object"}}}},
    },
    ("cert-manager.io/v1", "Certificate"): {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "additionalProperties": False,
            "required": ["secretName", "dnsNames", "issuerRef"],
            "properties": {
                "secretName": {"type": "string"}, "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                "duration": {"type": "string"}, "renewBefore": {"type": "string"},
                "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                    "rotationPolicy": {"enum": ["Never", "Always"]}}},
                "usages": {"type": "array", "items": {"type": "string"}},
                "issuerRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                              "properties": {"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                                             "group": {"type": "string"}}},
            }}},
    },
}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_validate_strictly(helm: str, scenario: str, kube_version: str) -> None:
    objects = render(helm, scenario, kube_version)
    assert objects
    for obj in objects:
        ident = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        structural = _STRUCTURAL.get((obj["apiVersion"], obj["kind"]))
        if structural is not None:
            # CRD-typed (cert-manager, prometheus-operator): not in the upstream schemas; checked structurally.
            jsonschema.validate(obj, structural)
            continue
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{scenario}: {ident} is invalid for Kubernetes {kube_version}: {exc.message} at {exc.path}")
        except kubernetes_validate.utils.SchemaNotFoundError:
            pytest.fail(f"{scenario}: {ident}: no schema for {obj['apiVersion']} {obj['kind']} in {kube_version}")


def test_names_fit_kubernetes_limits(helm: str) -> None:
    long_release = "a-release-name-that-is-long-on-purpose-" + "x" * 14  # Helm's maximum: 53 characters
    assert len(long_release) == 53
    proc = subprocess.run(
        [helm, "template", long_release, str(CHART), "-n", NAMESPACE], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for obj in filter(None, yaml.safe_load_all(proc.stdout)):
        name = obj["metadata"]["name"]
        if obj["kind"] == "Service":  # a DNS label: it is the first part of the webhook's host name
            assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), f"bad Service name {name!r}"
        assert len(name) <= 253, f"{obj['kind']} name too long: {name}"
        for label in obj["metadata"].get("labels", {}).values():
            assert len(label) <= 63, f"label value too long: {label}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pods_pass_restricted_pod_security(helm: str, scenario: str) -> None:
    specs = pod_specs(render(helm, scenario))
    assert specs, "no pod specs rendered"
    for name, spec in specs:
        assert violations(spec) == [], f"{scenario}: {name}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_deployment_shape(helm: str, scenario: str) -> None:
    deployment = the_deployment(render(helm, scenario))
    spec = deployment["spec"]
    # Two replicas under leader election (tests/chart/test_operator_ha.py): a surge pod waits as a standby.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["run", "--liveness", "http://0.0.0.0:8080/healthz"]
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # kopf's identity from the pod name: its fallback, getpass.getuser(), raises for a uid without a passwd entry
    (pod_id,) = [e for e in container["env"] if e["name"] == "POD_ID"]
    assert pod_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    tmp_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (tmp,) = tmp_mounts
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    # Numeric non-root user, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert pod["serviceAccountName"] == (
        "existing-sa" if scenario == "minimal" else f"{RELEASE}-llama-operator"
    )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_images_are_fully_qualified_and_pinned(helm: str, scenario: str) -> None:
    deployment = the_deployment(render(helm, scenario))
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        assert_qualified_and_pinned(container["image"])
    env = env_of(deployment)
    for name in ("LLAMA_OPERATOR_IMAGE_CPU", "LLAMA_OPERATOR_IMAGE_NVIDIA", "LLAMA_OPERATOR_IMAGE_AMD",
                 "LLAMA_OPERATOR_IMAGE_INTEL", "LLAMA_OPERATOR_FETCHER_IMAGE"):
        assert_qualified_and_pinned(env[name])


def test_default_images_equal_the_operators_defaults(helm: str) -> None:
    """The chart and config.py pin the same llama.cpp build and operator release."""
    env = env_of(the_deployment(render(helm, "default")))
    for vendor, image in config.DEFAULT_IMAGES.items():
        assert env[f"LLAMA_OPERATOR_IMAGE_{vendor.upper()}"] == image
    assert env["LLAMA_OPERATOR_FETCHER_IMAGE"] == config.DEFAULT_OPERATOR_IMAGE
    assert config.LLAMA_CPP_BUILD in env["LLAMA_OPERATOR_IMAGE_CPU"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert config.DEFAULT_OPERATOR_IMAGE.endswith(":" + chart["appVersion"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_environment_is_what_the_operator_reads(helm: str, scenario: str) -> None:
    """Every LLAMA_OPERATOR_* variable the chart sets parses into the Settings field it is meant for."""
    env = env_of(the_deployment(render(helm, scenario)))
    settings = config.Settings.from_env(env)
    port = lambda raw: None if raw == "0" else int(raw)  # noqa: E731
    expected = {
        "LLAMA_OPERATOR_NAMESPACES": lambda raw: settings.namespaces == tuple(filter(None, raw.split(","))),
        "LLAMA_OPERATOR_FETCHER_IMAGE": lambda raw: settings.fetcher_image == raw,
        "LLAMA_OPERATOR_IMAGE_PULL_POLICY": lambda raw: settings.image_pull_policy == raw,
        "LLAMA_OPERATOR_DEFAULT_CACHE_TYPE": lambda raw: settings.default_cache_type == raw,
        "LLAMA_OPERATOR_HOSTPATH_ROOT": lambda raw: settings.host_path_root == raw,
        "LLAMA_OPERATOR_HF_ENDPOINT": lambda raw: settings.huggingface_endpoint == raw,
        "LLAMA_OPERATOR_LOG_FORMAT": lambda raw: settings.log_format == raw,
        "LLAMA_OPERATOR_RESYNC_SECONDS": lambda raw: settings.resync_seconds == float(raw),
        "LLAMA_OPERATOR_METRICS_PORT": lambda raw: settings.metrics_port == port(raw),
        "LLAMA_OPERATOR_WEBHOOK_PORT": lambda raw: settings.webhook_port == port(raw),
        "LLAMA_OPERATOR_WEBHOOK_CERT_DIR": lambda raw: settings.webhook_cert_dir == raw,
        "LLAMA_OPERATOR_MEMORY_REQUEST_FROM_ESTIMATE": lambda raw: settings.memory_request_from_estimate == (
            raw == "true"),
        "LLAMA_OPERATOR_MEMORY_REQUEST_HEADROOM_PERCENT": lambda raw: settings.memory_request_headroom_percent == float(
            raw),
        "LLAMA_OPERATOR_SOURCE_EGRESS_GUARD": lambda raw: settings.source_egress_guard == (raw == "true"),
        "LLAMA_OPERATOR_HOSTPATH_CACHE": lambda raw: settings.policy.host_path_cache == (raw == "true"),
        "LLAMA_OPERATOR_CUSTOM_IMAGES": lambda raw: settings.policy.custom_images == (raw == "true"),
        "LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES": lambda raw: ",".join(settings.policy.image_prefixes) == raw,
        "LLAMA_OPERATOR_ALLOWED_RUNTIME_CLASSES": lambda raw: ",".join(settings.policy.runtime_class_names) == raw,
        "LLAMA_OPERATOR_ALLOWED_PRIORITY_CLASSES": lambda raw: ",".join(settings.policy.priority_class_names) == raw,
        "LLAMA_OPERATOR_SOURCE_BLOCKED_CIDRS": lambda raw: [str(n) for n in settings.source_blocked_cidrs] == [
            c for c in raw.split(",") if c],
        "LLAMA_OPERATOR_SERVER_NETWORK_POLICY_FROM": lambda raw: settings.server_network_policy_from == tuple(
            json.loads(raw)),
        "LLAMA_OPERATOR_INFERENCE_POOL": lambda raw: settings.inference_pool.mode == raw,
        "LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER": lambda raw: settings.inference_pool.endpoint_picker == raw,
        "LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER_PORT": lambda raw: (
            settings.inference_pool.endpoint_picker_port == int(raw)),
        "LLAMA_OPERATOR_INFERENCE_POOL_FAILURE_MODE": lambda raw: settings.inference_pool.failure_mode == raw,
        **{
            f"LLAMA_OPERATOR_IMAGE_{vendor.upper()}": (lambda raw, v=vendor: settings.images[v] == raw)
            for vendor in config.DEFAULT_IMAGES
        },
        **{
            f"LLAMA_OPERATOR_RPC_IMAGE_{vendor.upper()}": (lambda raw, v=vendor: settings.rpc_image_for(v) == (
                raw or None))
            for vendor in config.DEFAULT_IMAGES
        },
    }
    # Leader election is read by leader.ElectionConfig, not Settings (tests/chart/test_operator_ha.py checks it).
    expected.update({name: lambda raw: True for name in env if name.startswith(("LLAMA_OPERATOR_LEADER_",
                                                                               "LLAMA_OPERATOR_LEASE_"))})
    for name, raw in env.items():
        if name.startswith("LLAMA_OPERATOR_"):
            assert name in expected, f"the chart sets {name}, which the operator does not read"
            assert expected[name](raw), f"{name}={raw!r} did not reach the operator's settings"
    values = SCENARIOS[scenario]
    assert settings.namespaces == tuple(values.get("watchNamespaces", ()))
    assert (settings.webhook_port is not None) == values.get("webhook", {}).get("enabled", True)
    assert (settings.metrics_port is not None) == values.get("metrics", {}).get("enabled", True)
    assert settings.log_format == values.get("logFormat", "text")
    assert settings.default_cache_type == values.get("defaultCacheType", "EmptyDir")
    policy = values.get("policy", {})
    assert settings.policy.host_path_cache == policy.get("hostPathCache", False)
    assert settings.policy.image_prefixes == tuple(policy.get("allowedImagePrefixes", ["*"]))
    memory = values.get("memoryRequest", {})
    assert settings.memory_request_from_estimate == memory.get("fromEstimate", True)
    assert settings.memory_request_headroom_percent == memory.get("headroomPercent", 10)
