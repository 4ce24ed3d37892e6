"""A tiny random-weight LoRA adapter of tests/tiny_gguf.py's llama model, that the real llama-server loads.

`write_tiny_lora(path)` writes a GGUF adapter as llama.cpp's convert_lora_to_gguf.py does: `general.type`
"adapter", `adapter.type` "lora", `adapter.lora.alpha`, the base model's architecture (llama.cpp refuses an
adapter of another one), and a pair `<tensor>.lora_a`, `<tensor>.lora_b` for every attention and FFN weight of
each block. For a base weight of ggml shape ne = [n_in, n_out] (numpy (n_out, n_in)), llama.cpp
(src/llama-adapter.cpp) wants lora_a ne = [n_in, rank] and lora_b ne = [rank, n_out]: numpy (rank, n_in) and
(n_out, rank), numpy giving the dimensions in reverse. The update is scale * alpha / rank * B @ A.

The weights are seeded and large next to the base model's (0.02): greedy output with the adapter applied differs
from the base model's, and two seeds give two adapters that differ from each other.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tests.tiny_gguf import N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER

RANK = 4


def base_shapes() -> dict[str, tuple[int, int]]:
    """(n_out, n_in) of each block weight of the tiny llama that the adapter changes (tiny_gguf.py's names)."""
    kv_width = N_EMBD // N_HEAD * N_HEAD_KV
    shapes: dict[str, tuple[int, int]] = {}
    for block in range(N_LAYER):
        shapes |= {f"blk.{block}.attn_q.weight": (N_EMBD, N_EMBD), f"blk.{block}.attn_k.weight": (kv_width, N_EMBD),
                   f"blk.{block}.attn_v.weight": (kv_width, N_EMBD),
                   f"blk.{block}.attn_output.weight": (N_EMBD, N_EMBD),
                   f"blk.{block}.ffn_gate.weight": (N_FF, N_EMBD), f"blk.{block}.ffn_up.weight": (N_FF, N_EMBD),
                   f"blk.{block}.ffn_down.weight": (N_EMBD, N_FF)}
    return shapes


def write_tiny_lora(path: str | Path, *, seed: int = 1, rank: int = RANK, alpha: float = RANK,
                    std: float = 0.3) -> Path:
    """Write the adapter to `path` (parent directories created) and return the path. `alpha` = `rank`: the
    update is B @ A at scale 1."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")  # general.architecture: the base model's
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name("tiny-llama-test-lora")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, (n_out, n_in) in base_shapes().items():
        writer.add_tensor(f"{name}.lora_a", (rng.standard_normal((rank, n_in)) * std).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", (rng.standard_normal((n_out, rank)) * std).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
