"""Memory fit: how much host memory and VRAM a llama-server needs, from the GGUF header and the settings.

`shape.py` turns GGUF metadata into a `ModelMemoryShape` (stored in LlamaModel status), `estimate.py` does
the arithmetic, this module connects them to a parsed header (`model_info`) and a LlamaServer spec and formats
the result, and searches the largest context that fits a budget (`contextSize: auto`, the Fits advice).
All pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from ..api.base import CONTEXT_SIZE_MAX
from ..api.v1beta1 import GgufInfo, LlamaServerSpec
from ..contract import CACHE_RAM_FLAGS, adapters_cache_ram, human
from ..gguf import GgufHeader
from ..llamacpp.ggml import TensorSummary
from .estimate import CELL_PAD, DEFAULT_SLOTS, DeviceEstimate, Estimate, FitSettings, MiB, estimate
from .shape import memory_shape

__all__ = [
    "DeviceEstimate",
    "Estimate",
    "FitSettings",
    "auto_context",
    "estimate",
    "estimate_server",
    "format_bytes",
    "largest_context",
    "model_info",
    "request_quantity",
    "settings_from_spec",
    "table",
]


def model_info(header: GgufHeader, tensors: TensorSummary | None = None) -> GgufInfo:
    """What status says about a model: the header's scalar facts and the memory shape. `tensors` (every
    shard's, for a split model) overrides the header's own. Pure CPU work: callers on the event loop run it
    in a thread. Raises `NotAGguf` for counts and widths no model has (fit/shape.py)."""
    tensors = tensors or header.tensors
    info = header.info(tensors=tensors)
    info.memory = memory_shape(header.metadata, tensors)
    return info


def _flag_value(args: Sequence[str], names: tuple[str, ...]) -> str | None:
    """The value of the last occurrence of a flag in llama-server arguments (the last one wins)."""
    value = None
    for index, arg in enumerate(args[:-1]):
        if arg in names:
            value = args[index + 1]
    return value


def _last_switch(args: Sequence[str], on: tuple[str, ...], off: tuple[str, ...]) -> bool | None:
    state = None
    for arg in args:
        if arg in on:
            state = True
        elif arg in off:
            state = False
    return state


def settings_from_spec(spec: LlamaServerSpec) -> FitSettings:
    """The memory-relevant settings of a LlamaServer, including the few `args` flags that change memory."""
    args = list(spec.args or [])
    cache_ram = _flag_value(args, CACHE_RAM_FLAGS)
    if spec.adapters:
        cache_ram = adapters_cache_ram(args, [env.name for env in spec.env or []]) or cache_ram
    checkpoints = _flag_value(args, ("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"))
    ubatch = spec.ubatch_size
    if ubatch is None and spec.mode != "chat":
        ubatch = spec.batch_size  # what flags/render.py passes for embedding and rerank
    return FitSettings(
        context_size=spec.context_size if isinstance(spec.context_size, int) else None,  # auto: resolved first
        parallel=spec.parallel,
        kv_unified=_last_switch(args, ("-kvu", "--kv-unified"), ("-no-kvu", "--no-kv-unified")),
        cache_type_k=spec.cache_type_k or "f16",
        cache_type_v=spec.cache_type_v or "f16",
        flash_attention=spec.flash_attention or "auto",
        batch_size=spec.batch_size,
        ubatch_size=ubatch,
        gpu_count=spec.gpu.count if spec.gpu is not None else 0,
        gpu_layers=spec.gpu_layers,  # type: ignore[arg-type]
        tensor_split=spec.tensor_split,
        split_mode=spec.split_mode,
        swa_full="--swa-full" in args or spec.keeps_prompt_cache(),  # flags/render.py adds it
        embedding=spec.mode != "chat",
        cache_ram_mib=int(cache_ram) if cache_ram and cache_ram.lstrip("-").isdigit() else 8192,
        ctx_checkpoints=int(checkpoints) if checkpoints and checkpoints.isdigit() else 32,
    )


def estimate_server(spec: LlamaServerSpec, gguf: GgufInfo | None, draft: GgufInfo | None = None,
                    adapter_bytes: int = 0) -> Estimate | None:
    """The estimate for a LlamaServer serving a model with this header info; None when the model's status
    has no memory shape (a volume source, or a status written before the shape existed). `adapter_bytes`: the
    file sizes of its LoRA adapters, held beside the weights they adapt."""
    if gguf is None or gguf.memory is None:
        return None
    settings = settings_from_spec(spec)
    result = estimate(gguf.memory, settings, trained_context=gguf.context_length)
    if draft is not None and draft.memory is not None and spec.speculative is not None:
        # The draft model gets its own weights and KV cache of the same context on the same devices.
        layers = spec.speculative.draft_gpu_layers
        draft_settings = replace(settings, gpu_layers=layers if layers is not None else settings.gpu_layers)
        extra = estimate(draft.memory, draft_settings, trained_context=draft.context_length)
        for mine, theirs in zip(result.devices, extra.devices, strict=True):
            mine.weights += theirs.weights
            mine.kv_cache += theirs.kv_cache
            mine.recurrent_state += theirs.recurrent_state
            mine.compute += theirs.compute
            mine.checkpoints += theirs.checkpoints
        result.notes.append("includes the speculative draft model's weights, KV cache and compute buffers")
    if adapter_bytes > 0:
        # llama.cpp puts each adapter tensor in the buffer of the weight it adapts: mostly the offloaded layers.
        (result.devices[1] if len(result.devices) > 1 else result.host).weights += adapter_bytes
        result.notes.append(f"includes {len(spec.adapters or [])} LoRA adapter(s) ({adapter_bytes} bytes of files)")
    return result


# The largest context within a budget is searched over the same estimate, in the steps llama.cpp pads to (256
# cells, per slot when each slot has its own KV stream). The estimate carries its own overhead terms: nothing
# more is held back (docs/memory-fit.md#contextsize-auto).
Device = str
"""`host` (the container's memory) or `gpu` (the largest share of VRAM over the GPUs)."""


def _step_and_slots(spec: LlamaServerSpec) -> tuple[int, int]:
    """(the context granularity, how many slots share the trained-length cap)."""
    settings = settings_from_spec(spec)
    slots = settings.parallel or DEFAULT_SLOTS
    unified = settings.kv_unified if settings.kv_unified is not None else settings.parallel is None
    return (CELL_PAD, 1) if unified else (CELL_PAD * slots, slots)


def largest_context(spec: LlamaServerSpec, gguf: GgufInfo, budget: int, *, device: Device = "host",
                    top: int | None = None, draft: GgufInfo | None = None) -> int:
    """The largest contextSize up to `top` (default: the spec's, else the trained context) whose estimate on
    `device` stays within `budget` bytes; 0 when not even the smallest step fits."""
    step, _ = _step_and_slots(spec)
    if top is None:
        top = (spec.context_size if isinstance(spec.context_size, int) else 0) or gguf.context_length or step

    def need(context: int) -> int:
        fit = estimate_server(spec.model_copy(update={"context_size": context}), gguf, draft)
        assert fit is not None  # callers pass a GGUF with a memory shape
        return fit.host.total if device == "host" else fit.gpu_max

    low, high = 0, max(1, top // step)
    while low < high:  # the largest multiple of `step` that fits: the estimate grows with the context
        mid = (low + high + 1) // 2
        if need(mid * step) <= budget:
            low = mid
        else:
            high = mid - 1
    return low * step


def auto_context(spec: LlamaServerSpec, gguf: GgufInfo, *, host_budget: int | None, gpu_budget: int | None,
                 draft: GgufInfo | None = None) -> int:
    """`contextSize: auto`: the largest context within every budget given (host: the memory limit, gpu: one
    GPU's memory), at most the model's trained context per slot; 0 when nothing fits."""
    _, slots = _step_and_slots(spec)
    trained = gguf.context_length
    top = min(trained * slots, CONTEXT_SIZE_MAX) if trained else CONTEXT_SIZE_MAX
    budgets = [(device, budget) for device, budget in (("host", host_budget), ("gpu", gpu_budget))
               if budget is not None]
    assert budgets, "contextSize auto without a budget is refused by the spec's rules"
    return min(largest_context(spec, gguf, budget, device=device, top=top, draft=draft)
               for device, budget in budgets)


def format_bytes(size: int) -> str:
    """Memory for people: 512.0 MiB, 1.25 GiB (GiB to two places: messages compare an estimate with a limit)."""
    return human(size, places=2 if size >= 1024 * MiB else 1, smallest="MiB", largest="GiB")


def request_quantity(size: int, *, headroom_percent: float = 0) -> str:
    """Bytes plus headroom, rounded up to whole MiB, as a Kubernetes quantity (`1536Mi`)."""
    return f"{max(1, math.ceil(size * (1 + headroom_percent / 100) / MiB))}Mi"


def table(result: Estimate) -> str:
    """A readable table: one column per device, one row per component."""
    rows = [("weights", "weights"), ("KV cache", "kv_cache"), ("recurrent state", "recurrent_state"),
            ("compute buffers", "compute"), ("checkpoint", "checkpoints"), ("overhead", "overhead")]
    names = [d.name for d in result.devices]
    width = max(12, *(len(n) for n in names))
    lines = [f"{'':<16}" + "".join(f"{n:>{width}}" for n in names)]
    for label, attr in rows:
        values = [getattr(d, attr) for d in result.devices]
        if not any(values):
            continue
        lines.append(f"{label:<16}" + "".join(f"{format_bytes(v):>{width}}" for v in values))
    lines.append(f"{'total':<16}" + "".join(f"{format_bytes(d.total):>{width}}" for d in result.devices))
    layout = "unified" if result.kv_unified else f"{result.slots} streams"
    lines.append("")
    lines.append(f"context: {result.context_size} cells ({result.slots} slots, {result.context_per_slot} per slot, "
                 f"{layout}), flash attention {'on' if result.flash_attention else 'off'}"
                 + (f", {result.gpu_layers} layers on GPU" if result.gpus else ""))
    if result.prompt_cache_max:
        cache = "unbounded" if result.prompt_cache_max < 0 else format_bytes(result.prompt_cache_max)
        lines.append(f"prompt cache: may grow by up to {cache} of host memory over time (--cache-ram)")
    if result.checkpoints_max:
        lines.append(f"context checkpoints: may grow by up to {format_bytes(result.checkpoints_max)} of host "
                     "memory over time (--ctx-checkpoints per slot)")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)
