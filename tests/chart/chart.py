"""The chart as `helm template` renders it, for the chart tests: the value sets (scenarios) it is rendered
with, cached renders, and small finders over the rendered objects."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from tests.helm import CHART, REPO  # noqa: F401  (the chart tests find both here, next to the scenarios)

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
        "type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
        "maxConnections": 64, "cors": {"allowedOrigins": ["https://chat.example", "*"]}},
        "watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                       "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}}},
        "memoryRequest": {"fromEstimate": False, "headroomPercent": 25},
    },
    "monitoring-namespaced": {"monitoring": {"podMonitor": {"enabled": True}}, "watchNamespaces": ["team-a"]},
    "network-policy": {
        "gateway": {"enabled": True},
        "networkPolicy": {"operator": {"webhookFrom": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]},
                          "llamaServers": {"enabled": True}},
        "watchNamespaces": ["team-a"],
    },
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
        "inferencePool": {"enabled": False,
                          "endpointPicker": {"service": "epp-{server}", "port": 9100, "failureMode": "FailOpen"}},
    },
}


def run_helm(helm: str, *args: str, values: Mapping[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump(dict(values or {}), fh)
        fh.flush()
        return subprocess.run([helm, *args, "-f", fh.name], capture_output=True, text=True, timeout=120)


_RENDERED: dict[tuple[str, str], str] = {}


def render_text(helm: str, scenario: str, kube_version: str = KUBE_VERSIONS[-1]) -> str:
    key = (scenario, kube_version)
    if key not in _RENDERED:
        proc = run_helm(
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


def the_gateway(objects: list[dict[str, Any]]) -> Mapping[str, Any]:
    (deployment,) = [d for d in find(objects, "Deployment") if d["metadata"]["name"].endswith("-gateway")]
    return deployment


def env_of(deployment: Mapping[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


_QUALIFIED_PINNED = re.compile(
    r"^(?P<registry>[a-z0-9-]+(\.[a-z0-9-]+)+(:[0-9]+)?|[a-z0-9-]+:[0-9]+)/[a-z0-9._/-]+"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(@sha256:[a-f0-9]{64})?$"
)


def assert_qualified_and_pinned(image: str) -> None:
    match = _QUALIFIED_PINNED.match(image)
    assert match, f"image {image!r} is not fully qualified (registry host first)"
    assert match.group("tag") != "latest" and (match.group("tag") or "@sha256:" in image), f"{image!r} is not pinned"
