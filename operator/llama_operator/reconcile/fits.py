"""The `Fits` condition and the memory estimate of a LlamaServer's status (pure, except `gpu_nodes`).

Fits compares the estimate (`llama_operator.fit`) with what the replica is given:
- `False/MemoryLimitTooLow`: the container's memory limit is below the host estimate: the pod would be
  OOM-killed while loading or at its first long prompt. The message names both numbers and what would fit.
- `False/GpuMemoryTooSmall`: a GPU server whose share of VRAM is larger than the GPU memory every candidate
  node reports (label `nvidia.com/gpu.memory`, MiB, set by NVIDIA GPU feature discovery).
- `True/ContextExceedsTraining`: it fits, but each slot gets more tokens than the model was trained on.
- `True/Fits`, or `Unknown/NoEstimate` when the model's status carries no memory shape (volume sources).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..api.v1beta1 import Condition, GgufInfo, LlamaServer, MemoryEstimate
from ..builders.context import memory_limit
from ..fit import Estimate, estimate_server, format_bytes, largest_context, request_quantity
from ..fit.estimate import MiB
from ..kube import NODES, KubeError
from .conditions import condition, problem_event
from .context import Context
from .server_status import OomKill

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
"""MiB of memory per GPU on a node, published by NVIDIA GPU feature discovery."""


def memory_status(fit: Estimate) -> MemoryEstimate:
    devices = fit.devices
    cache = fit.prompt_cache_max
    return MemoryEstimate(
        host=request_quantity(fit.host.total),
        gpu=request_quantity(fit.gpu_max) if fit.gpus else None,
        weights=request_quantity(sum(d.weights for d in devices)),
        kv_cache=request_quantity(sum(d.kv_cache + d.recurrent_state for d in devices)),
        compute=request_quantity(sum(d.compute for d in devices)),
        overhead=request_quantity(sum(d.overhead for d in devices)),
        context_size=fit.context_size,
        context_per_slot=fit.context_per_slot,
        slots=fit.slots,
        prompt_cache_max=None if cache == 0 else ("unbounded" if cache < 0 else request_quantity(cache)),
        checkpoints_max=request_quantity(fit.checkpoints_max) if fit.checkpoints_max else None,
    )


def _breakdown(fit: Estimate) -> str:
    host = fit.host
    return (f"weights {format_bytes(host.weights)}, KV cache {format_bytes(host.kv_cache + host.recurrent_state)}"
            f" for {fit.context_size} cells, compute {format_bytes(host.compute)}, overhead "
            f"{format_bytes(host.overhead)}")


def _growth(fit: Estimate) -> int:
    """What the host memory may grow by after load (-1: unbounded)."""
    if fit.prompt_cache_max < 0:
        return -1
    return fit.prompt_cache_max + fit.checkpoints_max


def _q8_total(server: LlamaServer, gguf: GgufInfo, device: str) -> int | None:
    spec = server.spec
    if spec.cache_type_k not in (None, "f16", "f32", "bf16") and spec.cache_type_v not in (None, "f16", "f32", "bf16"):
        return None
    spec = spec.model_copy(update={"cache_type_k": "q8_0", "cache_type_v": "q8_0"})
    fit = estimate_server(spec, gguf)
    if fit is None:
        return None
    return fit.host.total if device == "host" else fit.gpu_max


def _advice(server: LlamaServer, gguf: GgufInfo, budget: int, device: str) -> str:
    options = []
    context = largest_context(server.spec, gguf, budget, device=device)
    if context:
        options.append(f"contextSize {context} or less")
    q8 = _q8_total(server, gguf, device)
    if q8 is not None and q8 <= budget:
        options.append(f"cacheTypeK and cacheTypeV q8_0 ({format_bytes(q8)})")
    return (", or set " + " or ".join(options)) if options else ""


def _node_matches(node: Mapping[str, Any], selector: Mapping[str, str] | None) -> bool:
    labels = (node.get("metadata") or {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in (selector or {}).items())


def _gpu_mib(node: Mapping[str, Any]) -> int | None:
    value = ((node.get("metadata") or {}).get("labels") or {}).get(GPU_MEMORY_LABEL, "")
    return int(value) if value.isdigit() else None


def _router_fits(server: LlamaServer, estimates: Mapping[str, int], generation: int | None) -> Condition:
    """Router mode: which models are loaded together changes at run time, so no one estimate holds; with a
    memory limit (the budget the gateway keeps, docs/multi-model.md) each model must fit it alone."""
    limit = memory_limit(server.spec)
    if limit is None:
        return condition("Fits", None, "NoEstimate", "router mode: the memory needed depends on which models are "
                         "loaded together (at most maxLoaded); set resources.limits.memory to make it the budget "
                         "of the loaded models (each model's estimate is in status.models)", generation=generation)
    too_big = [(name, size) for name, size in estimates.items() if size > limit]
    if too_big:
        named = ", ".join(f"{name} needs an estimated {format_bytes(size)}" for name, size in too_big)
        return condition("Fits", False, "ModelLargerThanBudget", f"{named}: more than resources.limits.memory "
                         f"{format_bytes(limit)}, the budget of the loaded models, even alone (the gateway refuses "
                         f"its requests): raise the limit to at least "
                         f"{request_quantity(max(size for _, size in too_big))}", generation=generation)
    unknown = [m.served_name for m in server.spec.models or [] if m.served_name not in estimates]
    note = (f"; no estimate for {', '.join(unknown)} (no GGUF memory shape): only maxLoaded bounds "
            f"{'it' if len(unknown) == 1 else 'them'}" if unknown else "")
    if not estimates:
        return condition("Fits", None, "NoEstimate", "router mode: no model has a memory estimate (no GGUF memory "
                         "shape: volume sources are not inspected); only maxLoaded bounds them", generation=generation)
    name, size = max(estimates.items(), key=lambda item: item[1])
    return condition("Fits", True, "Fits", f"each model fits resources.limits.memory {format_bytes(limit)} alone "
                     f"(the largest: {name}, {format_bytes(size)}); the gateway unloads idle models to keep the "
                     f"loaded ones within it{note}", generation=generation)


def fits_condition(
    server: LlamaServer,
    fit: Estimate | None,
    gguf: GgufInfo | None,
    *,
    nodes: Sequence[Mapping[str, Any]] | None = None,
    nodes_note: str = "",
    context_auto: bool = False,
    estimates: Mapping[str, int] | None = None,
    generation: int | None,
) -> Condition:
    """The Fits condition; `nodes` are the labelled GPU nodes (None: not read, `nodes_note` says why);
    `context_auto`: the server's contextSize was auto and is now the number the plan chose; `estimates`: in
    router mode, each served model's (builders/router_memory.py)."""
    if server.spec.models is not None:
        return _router_fits(server, estimates or {}, generation)
    if fit is None or gguf is None:
        return condition("Fits", None, "NoEstimate", "no memory estimate: the LlamaModel's status has no GGUF "
                         "memory shape (volume sources are not inspected)", generation=generation)
    host = fit.host.total
    limit = memory_limit(server.spec)
    if limit is not None and limit < host:
        message = (f"estimated host memory {format_bytes(host)} ({_breakdown(fit)}) is more than "
                   f"resources.limits.memory {format_bytes(limit)}: raise the limit to at least "
                   f"{request_quantity(host)}{_advice(server, gguf, limit, 'host')}")
        return condition("Fits", False, "MemoryLimitTooLow", message, generation=generation)
    notes = []
    if context_auto:
        trained = f" (trained context {gguf.context_length})" if gguf.context_length else ""
        notes.append(f"contextSize auto: {server.spec.context_size} tokens, the largest that fits{trained}")
    if server.spec.gpu is not None:
        notes.append(f"{format_bytes(fit.gpu_max)} per GPU")
        if server.spec.gpu.vendor != "nvidia":
            notes.append("VRAM not checked: only NVIDIA nodes publish it (nvidia.com/gpu.memory)")
        elif nodes is None:
            notes.append(f"VRAM not checked: {nodes_note or 'nodes not read'}")
        else:
            sizes = [mib for n in nodes if _node_matches(n, server.spec.node_selector)
                     if (mib := _gpu_mib(n)) is not None]
            need_mib = -(-fit.gpu_max // MiB)
            if not sizes:
                notes.append(f"VRAM not checked: no node matching the nodeSelector has {GPU_MEMORY_LABEL}")
            elif max(sizes) < need_mib:
                message = (f"estimated VRAM {format_bytes(fit.gpu_max)} per GPU is more than the largest GPU on "
                           f"the {len(sizes)} candidate node(s) ({GPU_MEMORY_LABEL}={max(sizes)} MiB): "
                           f"use more GPUs (gpu.count) or fewer gpuLayers"
                           f"{_advice(server, gguf, max(sizes) * MiB, 'gpu')}")
                return condition("Fits", False, "GpuMemoryTooSmall", message, generation=generation)
            else:
                fitting = sum(1 for s in sizes if s >= need_mib)
                notes.append(f"fits the GPUs of {fitting} of {len(sizes)} candidate node(s)")
    within = (f"within resources.limits.memory {format_bytes(limit)}" if limit is not None
              else "no memory limit set")
    message = f"estimated host memory {format_bytes(host)} ({_breakdown(fit)}), {within}"
    growth = _growth(fit)
    if limit is not None and growth and (growth < 0 or host + growth > limit):
        notes.append(f"the prompt cache and context checkpoints may add "
                     f"{'unbounded memory' if growth < 0 else format_bytes(growth)} over time: bound them with "
                     "--cache-ram (MiB) and --ctx-checkpoints in args, or the pod may be OOM-killed later")
    if notes:
        message += "; " + "; ".join(notes)
    trained = gguf.context_length
    if trained and fit.context_per_slot > trained:
        message = (f"each slot gets {fit.context_per_slot} tokens but the model was trained on {trained}: "
                   f"output degrades past {trained} tokens; set contextSize to at most "
                   f"{trained * (fit.slots if not fit.kv_unified else 1)} ({message})")
        return condition("Fits", True, "ContextExceedsTraining", message, generation=generation)
    return condition("Fits", True, "Fits", message, generation=generation)


def oom_condition(server: LlamaServer, oom: OomKill, fit: Estimate | None, *, generation: int | None) -> Condition:
    """Fits=False/OOMKilled: the kernel killed llama-server at its memory limit, whatever the estimate said. The
    message names the limit, the estimate and the limit to set."""
    at = f"at its memory limit {oom.limit}" if oom.limit else "with no memory limit (the node ran out)"
    message = f"llama-server was OOM-killed {at} in pod {oom.pod}"
    limit = memory_limit(server.spec)
    if fit is None:
        return condition("Fits", False, "OOMKilled", f"{message}; no estimate (the LlamaModel's status has no "
                         "GGUF memory shape): raise resources.limits.memory", generation=generation)
    host = fit.host.total
    if limit is None or limit < host:
        advice = f"set resources.limits.memory to at least {request_quantity(host)}"
    else:  # it grew past an estimate that fitted: the prompt cache, checkpoints or more slots than it assumed
        advice = (f"it grew past the estimate at runtime: raise resources.limits.memory above {oom.limit}, or "
                  "bound --cache-ram and --ctx-checkpoints in args")
    return condition("Fits", False, "OOMKilled", f"{message}; estimated host memory {format_bytes(host)} "
                     f"({_breakdown(fit)}): {advice}", generation=generation)


async def gpu_nodes(ctx: Context, server: LlamaServer) -> dict[str, Any]:
    """The keyword arguments of `fits_condition` about nodes: the labelled GPU nodes for an NVIDIA server,
    or a note saying why they were not read (namespaced mode cannot read cluster-scoped Nodes)."""
    if server.spec.gpu is None or server.spec.gpu.vendor != "nvidia":
        return {}
    if ctx.settings.namespaces:
        return {"nodes_note": "namespaced mode cannot read Nodes"}
    try:
        return {"nodes": await ctx.kube.list(NODES, None, label_selector=GPU_MEMORY_LABEL)}
    except KubeError as exc:
        return {"nodes_note": f"cannot list Nodes: {exc}"}


def fits_event(ctx: Context, body: Mapping[str, Any], before: Sequence[Condition] | None,
               after: Sequence[Condition] | None) -> None:
    """A Warning Event when Fits turns to a problem (or to another one), so `kubectl describe` shows it."""
    problem_event(ctx, body, before, after, "Fits", quiet=("Fits", "NoEstimate"))
