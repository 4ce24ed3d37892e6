"""`contextSize: auto` resolved to a number of tokens, before anything is rendered or estimated from the spec.

The plan calls `resolve_context` once: the server it returns carries the number (args, the estimate, the pod
and the Fits condition all see the same one); a string is why no number can be chosen. The search itself is
the memory estimate's (fit.auto_context), the budgets are the spec's: resources.limits.memory for the host,
gpu.memory for each GPU (the operator does not know which node the pods land on).
"""

from __future__ import annotations

from ..api.v1beta1 import LlamaModel, LlamaServer, LlamaServerSpec
from ..fit import auto_context, estimate_server, format_bytes
from ..fit.estimate import CELL_PAD
from .quantity import parse_quantity


def memory_limit(spec: LlamaServerSpec) -> int | None:
    """resources.limits.memory in bytes, None when unset."""
    limits = spec.resources.limits if spec.resources is not None else None
    if not limits or "memory" not in limits:
        return None
    return int(parse_quantity(limits["memory"]))


def gpu_memory(spec: LlamaServerSpec) -> int | None:
    """gpu.memory (one GPU's) in bytes, None when unset or without a GPU."""
    return int(parse_quantity(spec.gpu.memory)) if spec.gpu is not None and spec.gpu.memory is not None else None


def with_context(server: LlamaServer, context_size: int) -> LlamaServer:
    """The server as planned: contextSize replaced by the number it resolved to."""
    return server.model_copy(update={"spec": server.spec.model_copy(update={"context_size": context_size})})


def _budgets(spec: LlamaServerSpec) -> str:
    host, gpu = memory_limit(spec), gpu_memory(spec)
    parts = ([f"resources.limits.memory {format_bytes(host)}"] if host is not None else []) + (
        [f"gpu.memory {format_bytes(gpu)}"] if gpu is not None else [])
    return " and ".join(parts)


def resolve_context(server: LlamaServer, model: LlamaModel, draft: LlamaModel | None = None) -> LlamaServer | str:
    """The server with contextSize auto replaced by the largest context that fits (unchanged when it is not
    auto), or why none can be chosen. The spec's rules guarantee a budget (`context-auto-needs-budget`)."""
    spec = server.spec
    if spec.context_size != "auto":
        return server
    gguf = model.status.gguf
    if gguf is None or gguf.memory is None:
        return (f"contextSize auto: LlamaModel {model.metadata.name} has no memory shape in its status (volume "
                "sources are not inspected): give contextSize a number")
    draft_gguf = draft.status.gguf if draft is not None else None
    if draft is not None and (draft_gguf is None or draft_gguf.memory is None):
        return (f"contextSize auto: the draft LlamaModel {draft.metadata.name} has no memory shape in its status: "
                "give contextSize a number")
    context = auto_context(spec, gguf, host_budget=memory_limit(spec), gpu_budget=gpu_memory(spec),
                           draft=draft_gguf)
    if context == 0:
        smallest = estimate_server(with_context(server, CELL_PAD).spec, gguf, draft_gguf)
        assert smallest is not None  # the memory shapes are there
        need = f"host {format_bytes(smallest.host.total)}" + (
            f", {format_bytes(smallest.gpu_max)} per GPU" if smallest.gpus else "")
        return (f"contextSize auto: not even {CELL_PAD} tokens fit {_budgets(spec)} (the estimate with "
                f"{CELL_PAD}: {need}): raise it, or use a smaller model or quantization")
    return with_context(server, context)
