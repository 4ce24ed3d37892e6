"""The InferencePool next to a LlamaServer (Gateway API Inference Extension, `inference.networking.k8s.io/v1`), and
the engine-type labels its endpoint picker reads on the pods (docs/inference-extension.md).

A Gateway API implementation with the extension (Istio, NGINX Gateway Fabric, Agentgateway...) routes an HTTPRoute
whose backend is the pool: it asks the pool's endpoint picker (EPP) which pod to send each request to, and the EPP
scrapes every pod's /metrics (llama-server always runs with `--metrics`). The EPP finds a pod's metric names by the
pod's engine-type label: ENGINE_TYPE names llama.cpp's mapping, which the user's EPP configuration declares
(LLAMA_CPP_METRICS). The operator makes the pool; the user deploys the EPP, the Gateway and the HTTPRoute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api.v1beta1 import LlamaServer
from ..config import SERVER_PLACEHOLDER, InferencePoolSettings
from ..flags.render import SERVER_PORT
from .objects import object_meta, selector_labels, server_labels

API_VERSION = "inference.networking.k8s.io/v1"
KIND = "InferencePool"

ENGINE_TYPE = "llama-cpp"
"""The engine name the pods carry; the EPP's `core-metrics-extractor` maps it to LLAMA_CPP_METRICS."""
ENGINE_TYPE_LABELS = ("llm-d.ai/engine-type", "inference.networking.k8s.io/engine-type")
"""Where EPPs look for it: llm-d's inference scheduler (where upstream's EPP moved) reads the first and falls back to
the second, which the EPP of the gateway-api-inference-extension releases v1.4-v1.5 read."""

LLAMA_CPP_METRICS: Mapping[str, str] = {
    "queuedRequestsSpec": "llamacpp:requests_deferred",
    "runningRequestsSpec": "llamacpp:requests_processing",
    # llama-server exports no KV-cache utilisation, LoRA or cache-config metric: empty specs are not scraped.
    "kvUsageSpec": "",
    "loraSpec": "",
    "cacheInfoSpec": "",
}
"""The `engineConfigs` entry (besides its `name`) that the EPP's `core-metrics-extractor` needs for ENGINE_TYPE."""


def endpoint_picker_name(server: LlamaServer, settings: InferencePoolSettings) -> str:
    return settings.endpoint_picker.replace(SERVER_PLACEHOLDER, server.metadata.name)


def build_inference_pool(server: LlamaServer, settings: InferencePoolSettings) -> dict[str, Any] | None:
    """The server's InferencePool, or None when pools are off (or the cluster does not serve them) and for a
    router-mode server: its /metrics answers only with `?model=` (400 without), which the EPP does not send, so the
    picker would route blind."""
    if not settings.enabled or server.spec.models is not None:
        return None
    labels = {**server_labels(server), **dict.fromkeys(ENGINE_TYPE_LABELS, ENGINE_TYPE)}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": object_meta(server, name=server.metadata.name, labels=labels),
        "spec": {
            # The Deployment's selector: exactly this server's pods, ready or not (the EPP filters by readiness).
            "selector": {"matchLabels": selector_labels(server.metadata.name)},
            "targetPorts": [{"number": SERVER_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": endpoint_picker_name(server, settings),
                "port": {"number": settings.endpoint_picker_port},
                "failureMode": settings.failure_mode,
            },
        },
    }


def with_engine_type(deployment: dict[str, Any]) -> dict[str, Any]:
    """The Deployment with the engine-type labels on its pods, for the EPP. Only servers that get a pool carry them:
    a changed pod template rolls every pod, so turning pools on rolls the servers once (documented)."""
    template = deployment["spec"]["template"]
    labels = {**template["metadata"].get("labels", {}), **dict.fromkeys(ENGINE_TYPE_LABELS, ENGINE_TYPE)}
    metadata = {**template["metadata"], "labels": labels}
    return {**deployment, "spec": {**deployment["spec"], "template": {**template, "metadata": metadata}}}
