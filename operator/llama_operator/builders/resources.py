"""Compute resources and scheduling of the llama-server container: threads, memory request, GPUs, tolerations."""

from __future__ import annotations

import math
from typing import Any

from ..api.v1beta1 import LlamaServer
from ..config import Settings
from ..fit import Estimate, request_quantity
from .quantity import parse_quantity

GPU_RESOURCES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "intel": "gpu.intel.com/i915"}


def derived_threads(server: LlamaServer) -> int | None:
    """--threads: the user's, else (CPU only) the CPU limit, else the request, rounded down, at least 1.

    llama-server's own default is the host's physical core count, which ignores the container's limit and
    makes throttled pods crawl.
    """
    spec = server.spec
    if spec.threads is not None:
        return spec.threads
    if spec.gpu is not None or spec.resources is None:
        return None
    for bucket in (spec.resources.limits, spec.resources.requests):
        if bucket and "cpu" in bucket:
            return max(1, math.floor(parse_quantity(bucket["cpu"])))
    return None


def default_memory_request(server: LlamaServer, settings: Settings, fit: Estimate | None) -> str | None:
    """The memory request of a llama-server container whose spec sets neither a memory request nor a limit:
    the memory estimate `fit` plus headroom (docs/memory-fit.md), so the scheduler places it on a node that can
    hold the model. None when disabled or when there is no estimate (the model's status has no memory shape)."""
    resources = server.spec.resources
    for bucket in (resources.requests, resources.limits) if resources is not None else ():
        if bucket and "memory" in bucket:
            return None
    if not settings.memory_request_from_estimate:
        return None
    if fit is None:
        return None
    return request_quantity(fit.host.total, headroom_percent=settings.memory_request_headroom_percent)


def container_resources(server: LlamaServer, *, memory: str | None) -> dict[str, Any]:
    """The llama-server container's resources: the spec's, the default memory request, the GPU limit."""
    spec = server.spec
    resources: dict[str, Any] = spec.resources.to_wire() if spec.resources else {}
    if memory is not None:
        resources["requests"] = {**resources.get("requests", {}), "memory": memory}
    if spec.gpu is not None:
        gpu_key = GPU_RESOURCES[spec.gpu.vendor]
        # Extended resources must be set as limits (requests default to them).
        resources["limits"] = {**resources.get("limits", {}), gpu_key: spec.gpu.count}
    return resources


def pod_tolerations(server: LlamaServer, gpu_vendor: str | None = None) -> list[dict[str, Any]]:
    """The spec's tolerations and the GPU vendor's (`gpu_vendor`, else spec.gpu's): GPU nodes are usually tainted
    with their resource name."""
    tolerations = [t.to_wire() for t in server.spec.tolerations or []]
    vendor = gpu_vendor or (server.spec.gpu.vendor if server.spec.gpu is not None else None)
    if vendor is not None:
        gpu = {"key": GPU_RESOURCES[vendor], "operator": "Exists", "effect": "NoSchedule"}
        if gpu not in tolerations:
            tolerations.append(gpu)
    return tolerations
