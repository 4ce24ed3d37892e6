"""From GGUF metadata to the sizes a memory estimate needs (pure): which layers keep a full-context KV cache,
which a sliding-window one, which a fixed recurrent state, and how wide each is.

This is the architecture knowledge of the estimate, written against the pinned llama.cpp (b11312):
- K/V widths per layer are `head_count_kv(layer) x key_length` (and `value_length`); both lengths default to
  `embedding_length / head_count`. MLA models (`attention.kv_lora_rank`) cache one compressed K of
  `kv_lora_rank + rope.dimension_count` per layer and no V.
- Sliding-window layers come from `attention.sliding_window_pattern` (a per-layer bool array, or an integer
  period) and otherwise from the period llama.cpp hard-codes per architecture (`SWA_PATTERNS`). A period `n`
  makes every n-th layer full attention (the last of each group, or the first for the "dense first" ones).
- Bounds: more than `LLAMA_MAX_LAYERS` blocks (the loader's own limit) or a width, head count or state size past
  `MAX_DIMENSION` is `NotAGguf`, and so is a shape whose sums pass `MAX_COUNT`: per-layer lists stay short and
  every number status carries stays an exact int64.
- Recurrent layers (Mamba, RWKV, the linear-attention layers of hybrids) keep f32 state per sequence instead
  of a KV cache: conv state `(conv_kernel - 1) x (inner_size + 2 x group_count x state_size)` plus SSM state
  `state_size x inner_size` (RWKV: `token_shift_count x embedding_length` + `embedding_length x head_size`;
  LFM2's short convolutions: `embedding_length x (l_cache - 1)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..api.v1beta1 import ModelMemoryShape
from ..errors import NotAGguf
from ..llamacpp.ggml import LLAMA_MAX_LAYERS, MAX_COUNT, TensorSummary

MAX_DIMENSION = 2**20
"""Largest width, head count, state size or layer period taken from a header (real models: tens of thousands
at most); a header with more is refused, so no product of them leaves int64."""
MAX_WINDOW = 2**32
"""Largest sliding window, in tokens."""
MAX_VOCABULARY = 2**24

# architecture -> (default period, dense first, default window when the header names none or None).
# Only architectures whose llama.cpp loader calls the pattern with a window present; phi3's window is ignored
# by llama.cpp (its converters do not populate it correctly), so it is not listed.
SWA_PATTERNS: Mapping[str, tuple[int, bool, int | None]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, None),
    "gemma3n": (5, False, None),
    "gemma-embedding": (6, False, None),
    "cohere2": (4, False, None),
    "cohere2moe": (4, True, None),
    "llama4": (4, False, 8192),
    "gpt-oss": (2, False, None),
    "exaone4": (4, False, None),
    "exaone-moe": (4, False, None),
    "olmo2": (4, False, None),
    "afmoe": (4, False, None),
    "mellum": (4, False, None),
    "plamo3": (8, False, None),
    "smallthinker": (4, True, None),
    "modern-bert": (3, True, None),
    "laguna": (4, True, None),
    "muse-glimmer": (4, False, None),
}
RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
# Hybrids whose attention layers are every `full_attention_interval`-th one (default 4).
INTERVAL_HYBRIDS = frozenset({"qwen3next", "qwen35", "qwen35moe", "qwen4exp", "minimax-01"})
# Hybrids whose recurrent layers are those without KV heads.
HEADLESS_HYBRIDS = frozenset({
    "jamba", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe", "kimi-linear",
    "bailingmoe3", "kimi-k3", "glm5-next",
})  # fmt: skip


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refuse(key: str, value: object, limit: int) -> NotAGguf:
    shown = key if len(key) <= 80 else key[:79] + "…"
    return NotAGguf(f"GGUF header: {shown!r} is {value}: out of range (0 to {limit})")


def _bounded(metadata: Mapping[str, Any], key: str, limit: int = MAX_DIMENSION) -> int | None:
    """An integer key of the header, refused when negative or past `limit`."""
    value = _int(metadata.get(key))
    if value is not None and not 0 <= value <= limit:
        raise _refuse(key, value, limit)
    return value


def _per_layer(metadata: Mapping[str, Any], key: str, n_layer: int, default: int) -> list[int]:
    """A per-layer list from a scalar or an array key (arrays shorter than n_layer repeat their last value)."""
    value = metadata.get(key)
    if isinstance(value, list) and value:
        numbers = value[:n_layer]
        for number in numbers:
            if not isinstance(number, int) or not 0 <= number <= MAX_DIMENSION:  # a float array (NaN) too
                raise _refuse(key, number, MAX_DIMENSION)
        return [int(v) for v in numbers] + [int(numbers[-1])] * (n_layer - len(numbers))
    scalar = _bounded(metadata, key)
    return [default if scalar is None else scalar] * n_layer


def sliding_layers(arch: str, metadata: Mapping[str, Any], n_layer: int) -> tuple[list[bool], int]:
    """Which layers use a sliding window, and the window in tokens (0: none)."""
    window = _bounded(metadata, f"{arch}.attention.sliding_window", MAX_WINDOW)
    known = SWA_PATTERNS.get(arch)
    if window is None and known is not None and known[2] is not None:
        window = known[2]
    if not window:
        return [False] * n_layer, 0
    pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and pattern:
        flags = [bool(v) for v in pattern[:n_layer]]
        return flags + [False] * (n_layer - len(flags)), window
    period = _bounded(metadata, f"{arch}.attention.sliding_window_pattern")
    dense_first = False
    if period is None:
        if known is None:
            return [False] * n_layer, 0
        period, dense_first = known[0], known[1]
    if period == 0:
        return [True] * n_layer, window
    if dense_first:
        return [il % period != 0 for il in range(n_layer)], window
    return [il % period < period - 1 for il in range(n_layer)], window


def recurrent_layers(arch: str, metadata: Mapping[str, Any], n_layer: int, kv_heads: Sequence[int],
                     feed_forward: Sequence[int]) -> list[bool]:
    if arch in RECURRENT_ARCHS:
        return [True] * n_layer
    if arch == "falcon-h1":  # attention and SSM side by side in every layer
        return [True] * n_layer
    if arch in INTERVAL_HYBRIDS:
        interval = _bounded(metadata, f"{arch}.full_attention_interval") or 4
        return [(il + 1) % interval != 0 for il in range(n_layer)]
    if arch in ("nemotron_h", "nemotron_h_moe"):  # MLP-only layers have neither heads nor state
        return [kv_heads[il] == 0 and feed_forward[il] == 0 for il in range(n_layer)]
    if arch in HEADLESS_HYBRIDS:
        return [kv_heads[il] == 0 for il in range(n_layer)]
    return [False] * n_layer


def recurrent_state_width(arch: str, metadata: Mapping[str, Any], n_embd: int) -> int:
    """f32 elements of state one recurrent layer keeps per sequence."""
    def key(suffix: str) -> int:
        return _bounded(metadata, f"{arch}.{suffix}") or 0

    if key("wkv.head_size"):
        return (key("token_shift_count") or 2) * n_embd + n_embd * key("wkv.head_size")
    if key("shortconv.l_cache"):
        return n_embd * (key("shortconv.l_cache") - 1)
    d_conv, d_inner, d_state = key("ssm.conv_kernel"), key("ssm.inner_size"), key("ssm.state_size")
    conv = max(d_conv - 1, 0) * (d_inner + 2 * key("ssm.group_count") * d_state)
    return conv + d_state * d_inner


def memory_shape(metadata: Mapping[str, Any], tensors: TensorSummary) -> ModelMemoryShape | None:
    """The memory shape of a model, or None when the header lacks the basics (architecture, block count)."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        return None

    def key(suffix: str) -> int | None:
        return _bounded(metadata, f"{arch}.{suffix}")

    n_layer = _bounded(metadata, f"{arch}.block_count", LLAMA_MAX_LAYERS)
    n_embd = key("embedding_length") or 0
    if not n_layer:
        return None
    heads = _per_layer(metadata, f"{arch}.attention.head_count", n_layer, 0)
    kv_heads = _per_layer(metadata, f"{arch}.attention.head_count_kv", n_layer, -1)
    kv_heads = [heads[il] if kv < 0 else kv for il, kv in enumerate(kv_heads)]
    feed_forward = _per_layer(metadata, f"{arch}.feed_forward_length", n_layer, 0)
    head_max = max(heads) or 1
    k_len = key("attention.key_length") or (n_embd // head_max)
    v_len = key("attention.value_length") or (n_embd // head_max)
    k_len_swa = key("attention.key_length_swa") or k_len
    v_len_swa = key("attention.value_length_swa") or v_len
    kv_lora = key("attention.kv_lora_rank")
    if kv_lora:  # MLA: one compressed K (latent + RoPE part) per token and layer, V is a view of it
        k_len = k_len_swa = kv_lora + (key("rope.dimension_count") or 64)
        v_len = v_len_swa = 0
        kv_heads = [1 if kv else 0 for kv in kv_heads]

    swa, window = sliding_layers(arch, metadata, n_layer)
    recurrent = recurrent_layers(arch, metadata, n_layer, kv_heads, feed_forward)
    shared = key("attention.shared_kv_layers") or 0  # gemma3n: the last layers reuse earlier KV
    has_kv = [il < n_layer - shared for il in range(n_layer)]
    both = arch == "falcon-h1"
    attention = [has_kv[il] and (both or not recurrent[il]) and kv_heads[il] > 0 for il in range(n_layer)]

    shape = ModelMemoryShape(
        weight_bytes=sum(tensors.bytes_by_group.values()),
        layer_weight_bytes=tensors.bytes_by_group.get("layers", 0),
        embedding_weight_bytes=tensors.bytes_by_group.get("embedding", 0),
        output_weight_bytes=tensors.bytes_by_group.get("output", 0),
        cpu_repacked_bytes=tensors.repackable_bytes,
        layers=n_layer,
        vocab_size=_vocab_size(arch, metadata),
        embedding_length=n_embd,
        feed_forward_length=max(feed_forward),
        head_count=head_max,
        sliding_window=window,
        recurrent_layers=sum(recurrent),
        recurrent_state_width=sum(recurrent) * recurrent_state_width(arch, metadata, n_embd),
    )
    for il in range(n_layer):
        if not attention[il]:
            continue
        if swa[il]:
            shape.sliding_window_layers += 1
            shape.sliding_key_width += kv_heads[il] * k_len_swa
            shape.sliding_value_width += kv_heads[il] * v_len_swa
        else:
            shape.attention_layers += 1
            shape.key_width += kv_heads[il] * k_len
            shape.value_width += kv_heads[il] * v_len
    for name, value in shape:
        if isinstance(value, int) and value > MAX_COUNT:
            raise NotAGguf(f"GGUF header: the model's {name} would be {value}: out of range (the header's "
                           "widths and state sizes are corrupt)")
    return shape


def _vocab_size(arch: str, metadata: Mapping[str, Any]) -> int:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, dict) and isinstance(tokens.get("count"), int):
        return int(tokens["count"])
    return _bounded(metadata, f"{arch}.vocab_size", MAX_VOCABULARY) or 0
