"""Operator settings: one immutable object built once at startup (from environment variables) and injected.

Every setting is documented in docs/configuration.md; the Helm chart sets them as env vars.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import __version__
from .llamacpp import LLAMA_CPP_BUILD
from .llamacpp import LLAMA_CPP_IMAGE_REPO as _IMAGE_REPO

DEFAULT_IMAGES: Mapping[str, str] = {
    "cpu": f"{_IMAGE_REPO}:server-{LLAMA_CPP_BUILD}",
    "nvidia": f"{_IMAGE_REPO}:server-cuda-{LLAMA_CPP_BUILD}",
    "amd": f"{_IMAGE_REPO}:server-rocm-{LLAMA_CPP_BUILD}",
    "intel": f"{_IMAGE_REPO}:server-intel-{LLAMA_CPP_BUILD}",
}
DEFAULT_OPERATOR_IMAGE = f"ghcr.io/llama-operator/llama-operator:{__version__}"
DEFAULT_HOSTPATH_ROOT = "/var/lib/llama-operator/models"
"""Where HostPath caches live on a node (the chart's hostPathRoot has the same default)."""

CacheType = Literal["EmptyDir", "PersistentVolumeClaim", "HostPath"]
_CACHE_TYPES = ("EmptyDir", "PersistentVolumeClaim", "HostPath")


class SettingsError(ValueError):
    """An operator setting has a value the operator cannot use."""


ANY = "*"
"""In an allow-list setting: any value."""


@dataclass(frozen=True)
class TenantPolicy:
    """What a LlamaModel or LlamaServer may ask of the pods the operator runs for it (docs/security.md, "Node
    filesystem and pod policy"); policy.py enforces it in the webhook and in every reconcile."""

    host_path_cache: bool = False
    """LlamaModels may use cache.type HostPath (a directory below host_path_root on each node)."""
    custom_images: bool = True
    """LlamaServers may set spec.image (else only the operator's images run)."""
    image_prefixes: tuple[str, ...] = (ANY,)
    """spec.image must start with one of these (each ends in '/', ':' or '@'); ANY: any image."""
    runtime_class_names: tuple[str, ...] = (ANY,)
    """Allowed spec.runtimeClassName values; ANY: any; empty: none."""
    priority_class_names: tuple[str, ...] = (ANY,)
    """Allowed spec.priorityClassName values; ANY: any; empty: none."""


InferencePoolMode = Literal["auto", "true", "false"]
FailureMode = Literal["FailClose", "FailOpen"]
SERVER_PLACEHOLDER = "{server}"
"""Stands for the LlamaServer's name in the endpoint picker's Service name."""


@dataclass(frozen=True)
class InferencePoolSettings:
    """The InferencePool (Gateway API Inference Extension) next to each LlamaServer (docs/inference-extension.md)."""

    mode: InferencePoolMode = "auto"
    """auto: made when the cluster serves inference.networking.k8s.io/v1 (seen at startup); true, false: forced."""
    served: bool = False
    """The cluster served the InferencePool API when the operator started (discovery, handlers.configure)."""
    endpoint_picker: str = f"{SERVER_PLACEHOLDER}-epp"
    """The Service of the endpoint picker (EPP) each pool names, in the server's namespace; {server} is replaced
    by the server's name (upstream's inferencepool chart names its EPP Service `<release>-epp`)."""
    endpoint_picker_port: int = 9002
    """The EPP Service's ext-proc (gRPC) port."""
    failure_mode: FailureMode = "FailClose"
    """What the gateway does when the EPP does not answer: refuse (FailClose) or pick any pod (FailOpen)."""

    @property
    def enabled(self) -> bool:
        return self.mode == "true" or (self.mode == "auto" and self.served)


@dataclass(frozen=True)
class Settings:
    """Everything configurable about the operator. Builders receive it as a plain argument."""

    namespaces: tuple[str, ...] = ()
    """Watched namespaces; empty means all namespaces."""
    images: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    """llama-server image per accelerator: cpu, nvidia, amd, intel."""
    rpc_images: Mapping[str, str] = field(default_factory=dict)
    """Per accelerator, an llama.cpp image built with GGML_RPC=ON (llama-server with --rpc and ggml-rpc-server,
    both under /app): what a distributed server's leader and workers run (docs/distributed.md). Upstream's images
    are built without it, so none is assumed: an accelerator missing here has no distributed servers."""
    fetcher_image: str = DEFAULT_OPERATOR_IMAGE
    """Image of the init container that downloads models (this operator's image)."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    default_cache_type: CacheType = "EmptyDir"
    host_path_root: str = DEFAULT_HOSTPATH_ROOT
    """Node directory under which HostPath caches live."""
    huggingface_endpoint: str = "https://huggingface.co"
    """Hugging Face hub (or mirror) base URL."""
    log_format: Literal["text", "json"] = "text"
    resync_seconds: float = 300.0
    """Safety-net interval at which every LlamaServer is reconciled even without events."""
    model_resync_seconds: float = 3600.0
    """Interval at which every LlamaModel's source is resolved again (a moved `revision: main` rolls servers
    only when its sha256 changes)."""
    model_status_seconds: float = 10.0
    """Interval at which router-mode servers' pods are asked which models they have loaded (status.models)."""
    metrics_port: int | None = 8000
    """Port of the Prometheus /metrics endpoint; None disables it."""
    webhook_port: int | None = None
    """Port of the HTTPS validating admission webhook; None disables it."""
    webhook_cert_dir: str = "/var/run/llama-operator/webhook-certs"
    """Directory holding tls.crt and tls.key for the webhook server."""
    memory_request_from_estimate: bool = True
    """A llama-server container without a memory request or limit gets the memory estimate as its request."""
    memory_request_headroom_percent: float = 10.0
    """Added to the estimate for that default request."""
    source_egress_guard: bool = True
    """The operator refuses loopback, link-local and `source_blocked_cidrs` addresses as model sources (egress.py);
    off only where sources are served from loopback on purpose (tests, the sandbox)."""
    source_blocked_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    """Further ranges refused as model sources while the guard is on: the cluster's pod and Service ranges."""

    policy: TenantPolicy = field(default_factory=TenantPolicy)
    """What tenants may ask of the operator's pods."""
    server_network_policy_from: tuple[Mapping[str, Any], ...] | None = None
    """Who may reach llama-server pods besides the pods of their own namespace: NetworkPolicyPeer objects, put
    into the NetworkPolicy the operator makes next to each server (builders/network_policy.py). None: no policy."""

    inference_pool: InferencePoolSettings = field(default_factory=InferencePoolSettings)
    """Whether, and with which endpoint picker, each LlamaServer gets an InferencePool."""

    def image_for(self, vendor: str | None) -> str:
        return self.images[vendor or "cpu"]

    def rpc_image_for(self, vendor: str | None) -> str | None:
        return self.rpc_images.get(vendor or "cpu") or None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build the settings from LLAMA_OPERATOR_* variables; unknown values raise SettingsError."""
        env = os.environ if environ is None else environ
        images = dict(DEFAULT_IMAGES)
        for accel in images:
            override = env.get(f"LLAMA_OPERATOR_IMAGE_{accel.upper()}")
            if override:
                images[accel] = override
        rpc_images = {accel: env[f"LLAMA_OPERATOR_RPC_IMAGE_{accel.upper()}"] for accel in images
                      if env.get(f"LLAMA_OPERATOR_RPC_IMAGE_{accel.upper()}")}
        namespaces = tuple(ns.strip() for ns in env.get("LLAMA_OPERATOR_NAMESPACES", "").split(",") if ns.strip())
        cache_type = env.get("LLAMA_OPERATOR_DEFAULT_CACHE_TYPE", "EmptyDir")
        if cache_type not in _CACHE_TYPES:
            raise SettingsError(
                f"LLAMA_OPERATOR_DEFAULT_CACHE_TYPE={cache_type!r}: must be one of {', '.join(_CACHE_TYPES)}"
            )
        log_format = env.get("LLAMA_OPERATOR_LOG_FORMAT", "text")
        if log_format not in ("text", "json"):
            raise SettingsError(f"LLAMA_OPERATOR_LOG_FORMAT={log_format!r}: must be text or json")
        pull_policy = env.get("LLAMA_OPERATOR_IMAGE_PULL_POLICY", "IfNotPresent")
        if pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise SettingsError(
                f"LLAMA_OPERATOR_IMAGE_PULL_POLICY={pull_policy!r}: must be Always, IfNotPresent or Never"
            )
        resync = _seconds(env, "LLAMA_OPERATOR_RESYNC_SECONDS", 300)
        model_resync = _seconds(env, "LLAMA_OPERATOR_MODEL_RESYNC_SECONDS", 3600)
        model_status = _seconds(env, "LLAMA_OPERATOR_MODEL_STATUS_SECONDS", 10)
        from_estimate = env.get("LLAMA_OPERATOR_MEMORY_REQUEST_FROM_ESTIMATE", "true").strip().lower()
        if from_estimate not in ("true", "false"):
            raise SettingsError(
                f"LLAMA_OPERATOR_MEMORY_REQUEST_FROM_ESTIMATE={from_estimate!r}: must be true or false"
            )
        headroom = _percent(env, "LLAMA_OPERATOR_MEMORY_REQUEST_HEADROOM_PERCENT", 10.0)
        egress_guard = env.get("LLAMA_OPERATOR_SOURCE_EGRESS_GUARD", "true").strip().lower()
        if egress_guard not in ("true", "false"):
            raise SettingsError(f"LLAMA_OPERATOR_SOURCE_EGRESS_GUARD={egress_guard!r}: must be true or false")
        policy = _tenant_policy(env)
        if cache_type == "HostPath" and not policy.host_path_cache:
            raise SettingsError("LLAMA_OPERATOR_DEFAULT_CACHE_TYPE=HostPath needs HostPath caches enabled "
                                "(LLAMA_OPERATOR_HOSTPATH_CACHE=true)")
        return cls(
            policy=policy,
            metrics_port=_optional_port(env, "LLAMA_OPERATOR_METRICS_PORT", default=8000),
            webhook_port=_optional_port(env, "LLAMA_OPERATOR_WEBHOOK_PORT", default=None),
            webhook_cert_dir=env.get("LLAMA_OPERATOR_WEBHOOK_CERT_DIR", "/var/run/llama-operator/webhook-certs"),
            namespaces=namespaces,
            images=images,
            rpc_images=rpc_images,
            fetcher_image=env.get("LLAMA_OPERATOR_FETCHER_IMAGE", DEFAULT_OPERATOR_IMAGE),
            image_pull_policy=pull_policy,  # type: ignore[arg-type]
            default_cache_type=cache_type,  # type: ignore[arg-type]
            host_path_root=env.get("LLAMA_OPERATOR_HOSTPATH_ROOT", DEFAULT_HOSTPATH_ROOT),
            huggingface_endpoint=env.get("LLAMA_OPERATOR_HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
            log_format=log_format,  # type: ignore[arg-type]
            resync_seconds=resync,
            model_resync_seconds=model_resync,
            model_status_seconds=model_status,
            memory_request_from_estimate=from_estimate == "true",
            memory_request_headroom_percent=headroom,
            server_network_policy_from=_peers(env, "LLAMA_OPERATOR_SERVER_NETWORK_POLICY_FROM"),
            source_egress_guard=egress_guard == "true",
            source_blocked_cidrs=_networks(env, "LLAMA_OPERATOR_SOURCE_BLOCKED_CIDRS"),
            inference_pool=_inference_pool(env),
        )


def _optional_port(env: Mapping[str, str], name: str, *, default: int | None) -> int | None:
    """A port number from the environment; empty or "0" disables the feature."""
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip() in ("", "0"):
        return None
    if not raw.strip().isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(f"{name}={raw!r}: must be a port number 1-65535, or 0 to disable")
    return int(raw)


def _number(env: Mapping[str, str], name: str, default: float, valid: Callable[[float], bool], expected: str
            ) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1  # not a number: refused with the same message as an out-of-range one
    if not valid(value):
        raise SettingsError(f"{name}={raw!r}: must be {expected}")
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated CIDRs (10.0.0.0/8,fd00::/8)."""
    networks = []
    for item in filter(None, (part.strip() for part in env.get(name, "").split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise SettingsError(f"{name}: {item!r} is not a CIDR range (e.g. 10.96.0.0/12)") from None
    return tuple(networks)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, lambda v: v > 0, "a positive number of seconds")


def _percent(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, lambda v: 0 <= v <= 1000, "a percentage from 0 to 1000")


_PEER_KEYS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})


def _peers(env: Mapping[str, str], name: str) -> tuple[Mapping[str, Any], ...] | None:
    """A JSON array of NetworkPolicyPeer objects; unset or empty: None (no policy)."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        peers = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: not JSON ({exc})") from None
    if not isinstance(peers, list) or not all(isinstance(p, dict) and p and p.keys() <= _PEER_KEYS for p in peers):
        raise SettingsError(f"{name}: must be a JSON array of NetworkPolicy peers (objects with podSelector, "
                            "namespaceSelector or ipBlock)")
    return tuple(peers)


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _inference_pool(env: Mapping[str, str]) -> InferencePoolSettings:
    mode = env.get("LLAMA_OPERATOR_INFERENCE_POOL", "auto").strip().lower()
    if mode not in ("auto", "true", "false"):
        raise SettingsError(f"LLAMA_OPERATOR_INFERENCE_POOL={mode[:40]!r}: must be auto, true or false")
    picker = env.get("LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER", f"{SERVER_PLACEHOLDER}-epp").strip()
    # A sample server name stands in for {server}: what is left must be a Service name (a DNS label).
    sample = picker.replace(SERVER_PLACEHOLDER, "a")
    if len(picker) > 200 or not _DNS_LABEL.match(sample):
        raise SettingsError(f"LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER={picker[:200]!r}: must be a Service "
                            "name (lowercase letters, digits, '-'), optionally with {server} for the server's name")
    port = _optional_port(env, "LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER_PORT", default=9002)
    if port is None:
        raise SettingsError("LLAMA_OPERATOR_INFERENCE_POOL_ENDPOINT_PICKER_PORT: the endpoint picker needs a port")
    failure = env.get("LLAMA_OPERATOR_INFERENCE_POOL_FAILURE_MODE", "FailClose").strip()
    if failure not in ("FailClose", "FailOpen"):
        raise SettingsError(f"LLAMA_OPERATOR_INFERENCE_POOL_FAILURE_MODE={failure[:40]!r}: "
                            "must be FailClose or FailOpen")
    return InferencePoolSettings(mode=mode, endpoint_picker=picker, endpoint_picker_port=port,  # type: ignore[arg-type]
                                 failure_mode=failure)  # type: ignore[arg-type]


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, str(default).lower()).strip().lower()
    if raw not in ("true", "false"):
        raise SettingsError(f"{name}={raw!r}: must be true or false")
    return raw == "true"


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated allow-list; unset: ANY; set but empty: nothing allowed."""
    raw = env.get(name)
    return (ANY,) if raw is None else tuple(item.strip() for item in raw.split(",") if item.strip())


def _tenant_policy(env: Mapping[str, str]) -> TenantPolicy:
    prefixes = _names(env, "LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES")
    # "ghcr.io/org/llama" would also admit "ghcr.io/org/llama-evil": a prefix must end where a name part does.
    loose = [prefix for prefix in prefixes if prefix != ANY and not prefix.endswith(("/", ":", "@"))]
    if loose:
        raise SettingsError(f"LLAMA_OPERATOR_ALLOWED_IMAGE_PREFIXES: {', '.join(loose)}: each prefix must end "
                            "with '/', ':' or '@' (e.g. registry.example.com/llama/)")
    return TenantPolicy(
        host_path_cache=_flag(env, "LLAMA_OPERATOR_HOSTPATH_CACHE", False),
        custom_images=_flag(env, "LLAMA_OPERATOR_CUSTOM_IMAGES", True),
        image_prefixes=prefixes,
        runtime_class_names=_names(env, "LLAMA_OPERATOR_ALLOWED_RUNTIME_CLASSES"),
        priority_class_names=_names(env, "LLAMA_OPERATOR_ALLOWED_PRIORITY_CLASSES"),
    )
