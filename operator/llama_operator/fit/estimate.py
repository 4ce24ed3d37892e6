"""The memory a llama-server needs, per device, from a model's memory shape and the server's settings (pure).

Mirrors how the pinned llama.cpp (b11312) sizes its buffers; docs/memory-fit.md has the formulas and the
measurements that calibrated the overhead terms (benchmarks/fit.py):

- weights: tensor bytes; on a GPU server the last `gpuLayers` blocks (and the output head once every block is
  offloaded) live in VRAM, split over the GPUs by `tensorSplit`; token_embd always stays in host memory.
- KV cache: contextSize is rounded up to 256 cells; with an explicit `parallel` every slot gets its own stream
  of contextSize/parallel cells (rounded up to 256 again), with the default (auto: 4 slots) one unified stream.
  Sliding-window layers keep only `window x slots + ubatch` cells (rounded up to 256), recurrent layers a
  fixed f32 state per slot. Quantized cache types cost their block size (q8_0: 34 bytes per 32 values).
- compute buffers: the largest intermediate tensors of a worst-case `ubatch` batch: the attention scores
  (without flash attention) or the masks (with it), the feed-forward activations, and logits for one output
  per slot.
- checkpoints: models with sliding-window or recurrent layers cannot roll those back, so llama-server copies
  their state of a slot into host memory while it processes a prompt ("context checkpoints", up to
  `--ctx-checkpoints` 32 per slot). One is counted; the rest, like the prompt cache (`--cache-ram`), is growth
  over time, reported separately.
- overhead: the process itself (binary, tokenizer tables, HTTP server, per-token request bookkeeping) and, per
  GPU, the driver context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..api.v1beta1 import ModelMemoryShape

MiB = 1024 * 1024
GiB = 1024 * MiB

# Bytes per block and values per block of the KV cache types llama-server accepts (--cache-type-k/-v).
KV_CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}

CELL_PAD = 256
"""llama.cpp rounds the context (and each slot's stream, and the sliding window cache) up to 256 cells."""
DEFAULT_SLOTS = 4
"""llama-server's `--parallel` default (auto) is 4 slots sharing one unified KV stream."""
DEFAULT_BATCH = 2048
DEFAULT_UBATCH = 512
DEFAULT_CACHE_RAM_MIB = 8192
"""llama-server keeps prompts of idle slots in host memory up to `--cache-ram` MiB (default 8192)."""
DEFAULT_CTX_CHECKPOINTS = 32
"""`--ctx-checkpoints`: context checkpoints kept per slot (sliding-window and recurrent models)."""

# Calibrated on the pinned llama-server (benchmarks/fit.py, docs/memory-fit.md).
PROCESS_OVERHEAD = 16 * MiB
"""Resident memory of a llama-server with a model of no size: binary, libc, HTTP server, threads (measured
15.4 MiB with the 380-token tiny model, once its weights, KV cache and compute buffers are subtracted)."""
VOCAB_BYTES_PER_TOKEN = 200
"""Tokenizer tables (token strings, maps, scores) per vocabulary entry (measured 167 bytes with a 131072-token
variant of the tiny model, 199 with gemma3's 262144 tokens)."""
CONTEXT_BYTES_PER_TOKEN = 640
"""Request bookkeeping per context token (prompt tokens, JSON, slot state): a prompt that fills a 4096-token
context raised the tiny model's peak by 2.5 MiB more than its KV cache and buffers explain."""
GPU_CONTEXT_OVERHEAD = 768 * MiB
"""Per GPU: driver context, cuBLAS workspace and kernels. Measured on a lent H200 (CUDA 13.0, driver 580, the pinned
build for sm_90; benchmarks/distributed_gpu.py, 3 runs): a process holding 1,378 MiB of weights, 128 MiB of KV cache
and its compute buffer used 2,358 MiB, about 700 MiB beyond them (two processes on one GPU: 650 to 750 MiB each)."""
GPU_HOST_OVERHEAD = 384 * MiB
"""Host memory the GPU runtime libraries add to the process (not measured here)."""


GpuLayers = int | Literal["auto", "all"] | None


@dataclass(frozen=True)
class FitSettings:
    """The llama-server settings that change its memory; None means llama-server's default."""

    context_size: int | None = None
    parallel: int | None = None
    kv_unified: bool | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attention: Literal["auto", "on", "off"] = "auto"
    batch_size: int | None = None
    ubatch_size: int | None = None
    gpu_count: int = 0
    gpu_layers: GpuLayers = None
    tensor_split: Sequence[float] | None = None
    split_mode: Literal["none", "layer", "row"] | None = None
    swa_full: bool = False
    embedding: bool = False
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB
    ctx_checkpoints: int = DEFAULT_CTX_CHECKPOINTS


@dataclass
class DeviceEstimate:
    """Memory one device needs: `host` (the container's memory) or `gpuN` (VRAM)."""

    name: str
    weights: int = 0
    kv_cache: int = 0
    recurrent_state: int = 0
    compute: int = 0
    checkpoints: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent_state + self.compute + self.checkpoints + self.overhead


@dataclass
class Estimate:
    """The estimate: per device, plus the resolved settings it assumed."""

    devices: list[DeviceEstimate]
    context_size: int
    """KV cells allocated for full-attention layers (all slots together)."""
    context_per_slot: int
    slots: int
    kv_unified: bool
    flash_attention: bool
    gpu_layers: int
    """Blocks offloaded to GPUs."""
    trained_context: int | None
    prompt_cache_max: int
    """Bytes the prompt cache (--cache-ram) may add over time, beyond `host.total` (-1: unbounded)."""
    checkpoints_max: int = 0
    """Bytes the context checkpoints of every slot may add over time, beyond the one in `host.total`."""
    notes: list[str] = field(default_factory=list)

    @property
    def host(self) -> DeviceEstimate:
        return self.devices[0]

    @property
    def gpus(self) -> list[DeviceEstimate]:
        return self.devices[1:]

    @property
    def gpu_max(self) -> int:
        return max((d.total for d in self.gpus), default=0)


def pad(value: int, to: int = CELL_PAD) -> int:
    return -(-value // to) * to


def kv_bytes(cells: int, key_width: int, value_width: int, type_k: str, type_v: str) -> int:
    """Bytes of `cells` KV cells whose K and V rows are `key_width` / `value_width` values wide."""
    block_k, size_k = KV_CACHE_TYPES[type_k]
    block_v, size_v = KV_CACHE_TYPES[type_v]
    return cells * (math.ceil(key_width / block_k) * size_k + math.ceil(value_width / block_v) * size_v)


def _offloaded_layers(shape: ModelMemoryShape, settings: FitSettings) -> tuple[int, bool]:
    """(blocks on GPUs, output head on GPU) as llama.cpp places them: the last N blocks."""
    if settings.gpu_count <= 0:
        return 0, False
    layers = settings.gpu_layers
    if layers is None or layers in ("all", "auto"):
        return shape.layers, True
    n = max(0, int(layers))
    return min(n, shape.layers), n > shape.layers


def _gpu_shares(settings: FitSettings) -> list[float]:
    count = settings.gpu_count
    if settings.split_mode == "none":
        return [1.0] + [0.0] * (count - 1)
    split = list(settings.tensor_split or [])[:count]
    if len(split) < count or sum(split) <= 0:
        return [1.0 / count] * count
    total = sum(split)
    return [s / total for s in split]


def _output_device(shares: list[float], layers: int) -> int:
    """The GPU llama.cpp puts the output head on once every block is offloaded: it is slot n_layer of n_layer+1,
    and a slot goes to the first device whose cumulative share passes its fraction (llama_model::load_tensors'
    upper_bound over the splits): the last device with a share, unless that share is under one slot."""
    fraction = layers / (layers + 1)
    cumulative = 0.0
    for index, share in enumerate(shares):
        cumulative += share
        if cumulative > fraction:
            return index
    return len(shares) - 1


def compute_bytes(shape: ModelMemoryShape, *, tokens: int, kv_cells: int, swa_cells: int, outputs: int,
                  flash_attention: bool) -> int:
    """The graph allocator's buffer for one worst-case batch of `tokens` (f32 activations).

    ggml reuses the memory of dead tensors, so the buffer is what is alive at once: the KQ masks (inputs, alive
    for the whole graph: f16 with flash attention, else f32), the residual stream, and the largest of one
    layer's attention scores (`cells x tokens x heads`, without flash attention), its feed-forward activations,
    or the logits of `outputs` rows at the end. Matches llama.cpp's own `compute buffer size` within ~10%.
    """
    f32 = 4
    mask_type = 2 if flash_attention else f32
    full_mask = kv_cells * tokens * mask_type if shape.attention_layers else 0
    swa_mask = swa_cells * tokens * mask_type if shape.sliding_window_layers else 0
    widest_kv = kv_cells if shape.attention_layers else swa_cells
    scores = 0 if flash_attention else widest_kv * tokens * max(shape.head_count, 1) * f32
    ffn = 3 * tokens * shape.feed_forward_length * f32
    stream = 4 * tokens * shape.embedding_length * f32
    logits = outputs * shape.vocab_size * f32
    return full_mask + swa_mask + stream + max(scores, ffn, logits)


def estimate(shape: ModelMemoryShape, settings: FitSettings, *, trained_context: int | None = None) -> Estimate:
    """Memory per device for a model of this shape served with these settings."""
    notes: list[str] = []
    requested = settings.context_size or 0
    if requested == 0:
        if not trained_context:
            raise ValueError("contextSize is unset and the model's trained context is unknown")
        requested = trained_context
        notes.append(f"contextSize unset: llama-server uses the model's trained context ({trained_context})")
    slots = settings.parallel or DEFAULT_SLOTS
    unified = settings.kv_unified if settings.kv_unified is not None else settings.parallel is None
    n_ctx = pad(requested)
    if unified:
        per_slot, streams = n_ctx, 1
    else:
        per_slot, streams = pad(n_ctx // slots), slots
        n_ctx = per_slot * slots
    batch = min(n_ctx, settings.batch_size or DEFAULT_BATCH)
    ubatch = min(batch, settings.ubatch_size or DEFAULT_UBATCH)
    if settings.embedding:  # llama-server encodes each input in one physical batch
        batch = ubatch
    swa_per_stream = 0
    if shape.sliding_window_layers:
        window = shape.sliding_window * (slots if unified else 1) + ubatch
        swa_per_stream = per_slot if settings.swa_full else pad(min(per_slot, window))
    # llama.cpp enables flash attention on "auto" where the device supports it: CPU, CUDA, ROCm and Vulkan do.
    flash = settings.flash_attention != "off"
    quantized_v = settings.cache_type_v not in ("f32", "f16", "bf16")
    if quantized_v and not flash:
        notes.append(f"cacheTypeV {settings.cache_type_v} needs flash attention: llama-server refuses it with "
                     "flashAttention off")

    full_cells = per_slot * streams
    swa_cells = swa_per_stream * streams
    kv_full = kv_bytes(full_cells, shape.key_width, shape.value_width, settings.cache_type_k, settings.cache_type_v)
    kv_swa = kv_bytes(swa_cells, shape.sliding_key_width, shape.sliding_value_width,
                      settings.cache_type_k, settings.cache_type_v)
    recurrent = shape.recurrent_state_width * 4 * max(1, slots)
    outputs = batch if settings.embedding else slots
    compute = compute_bytes(shape, tokens=ubatch, kv_cells=per_slot, swa_cells=swa_per_stream,
                            outputs=outputs, flash_attention=flash)
    # Host copy of the outputs: logits of one token per slot (embeddings: one vector per batch token).
    output_buffer = 4 * outputs * (shape.embedding_length if settings.embedding else shape.vocab_size)

    gpu_layers, output_on_gpu = _offloaded_layers(shape, settings)
    cpu_layers = shape.layers - gpu_layers
    per_layer_weights = shape.layer_weight_bytes / max(shape.layers, 1)
    output_weights = shape.output_weight_bytes or shape.embedding_weight_bytes  # tied: token_embd again
    other_weights = shape.weight_bytes - shape.layer_weight_bytes - shape.embedding_weight_bytes \
        - shape.output_weight_bytes
    host = DeviceEstimate("host")
    host.weights = round(shape.embedding_weight_bytes + other_weights + cpu_layers * per_layer_weights)
    if not output_on_gpu and shape.output_weight_bytes:
        host.weights += shape.output_weight_bytes
    # The CPU backend repacks some quantized matrices into its own layout: the file stays mapped as well.
    host.weights += round(shape.cpu_repacked_bytes * cpu_layers / max(shape.layers, 1))
    state_fraction = cpu_layers / max(shape.layers, 1)
    host.kv_cache = round((kv_full + kv_swa) * state_fraction)
    host.recurrent_state = round(recurrent * state_fraction)
    vocab_overhead = shape.vocab_size * VOCAB_BYTES_PER_TOKEN
    host.overhead = PROCESS_OVERHEAD + vocab_overhead + CONTEXT_BYTES_PER_TOKEN * n_ctx
    # A context checkpoint: one slot's sliding-window cells (at most window + ubatch) and recurrent state.
    checkpoint = shape.recurrent_state_width * 4
    if shape.sliding_window_layers and not settings.swa_full:
        checkpoint += kv_bytes(pad(min(per_slot, shape.sliding_window + ubatch)), shape.sliding_key_width,
                               shape.sliding_value_width, settings.cache_type_k, settings.cache_type_v)
    checkpoint *= 1 if settings.ctx_checkpoints > 0 else 0
    host.checkpoints = checkpoint
    devices = [host]
    if settings.gpu_count > 0:
        host.overhead += GPU_HOST_OVERHEAD
        # Inputs (token embeddings) stay on the CPU side.
        host.compute = output_buffer + 2 * ubatch * shape.embedding_length * 4
        if gpu_layers < shape.layers:
            host.compute = output_buffer + compute
        for index, share in enumerate(_gpu_shares(settings)):
            gpu = DeviceEstimate(f"gpu{index}")
            if share > 0:
                gpu.weights = round(gpu_layers * share * per_layer_weights)
                gpu.kv_cache = round(gpu_layers * share * (kv_full + kv_swa) / max(shape.layers, 1))
                gpu.recurrent_state = round(gpu_layers * share * recurrent / max(shape.layers, 1))
                gpu.compute = compute
                gpu.overhead = GPU_CONTEXT_OVERHEAD
            devices.append(gpu)
        if output_on_gpu:
            devices[1 + _output_device(_gpu_shares(settings), shape.layers)].weights += output_weights
        if settings.split_mode == "row":
            notes.append("splitMode row: KV cache and compute buffers are estimated as with layer split")
        if settings.gpu_layers == "auto":
            notes.append("gpuLayers auto: estimated as all layers offloaded (llama.cpp's --fit may offload fewer)")
    else:
        host.compute = compute + output_buffer
    if trained_context and per_slot > trained_context:
        notes.append(f"{per_slot} tokens per slot exceed the model's trained context ({trained_context})")
    cache_ram = settings.cache_ram_mib
    prompt_cache_max = 0 if cache_ram == 0 else (cache_ram * MiB if cache_ram > 0 else -1)
    return Estimate(
        devices=devices,
        context_size=n_ctx,
        context_per_slot=per_slot,
        slots=slots,
        kv_unified=unified,
        flash_attention=flash,
        gpu_layers=gpu_layers,
        trained_context=trained_context,
        prompt_cache_max=prompt_cache_max,
        checkpoints_max=max(0, checkpoint * settings.ctx_checkpoints * slots - checkpoint),
        notes=notes,
    )
