"""A tiny random-weight reranker GGUF: the tiny llama's sizes and vocabulary (tiny_gguf.py) as a Qwen3 model with
a classifier head, the shape llama.cpp ranks with.

llama.cpp scores a (query, document) pair with pooling type `rank`: the last token's hidden state through
`cls.output` (one row per label of `<arch>.classifier.output_labels`); with two labels, as Qwen3-Reranker has,
llama-server answers a score between 0 and 1 for the first ("yes"). A llama model has no such head (llama.cpp
refuses the tensor), and ranking one without it gives scores that change with how the documents are batched;
with the head a document scores the same alone or among others. The weights are seeded random numbers: the
scores are stable, not meaningful.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from .tiny_gguf import CONTEXT_LENGTH, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, _vocab, add_tokenizer

LABELS = ["yes", "no"]


def write_tiny_reranker(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny reranker GGUF to `path` (parent directories created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = _vocab()
    rng = np.random.default_rng(seed)
    head = N_EMBD // N_HEAD

    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_name("tiny-reranker-test")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_array("qwen3.classifier.output_labels", LABELS)

    add_tokenizer(writer, tokens, scores, types)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def ones(name: str, size: int) -> None:
        writer.add_tensor(name, np.ones(size, dtype=np.float32))

    tensor("token_embd.weight", len(tokens), N_EMBD)
    ones("output_norm.weight", N_EMBD)
    tensor("cls.output.weight", len(LABELS), N_EMBD)
    for block in range(N_LAYER):
        ones(f"blk.{block}.attn_norm.weight", N_EMBD)
        tensor(f"blk.{block}.attn_q.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{block}.attn_k.weight", head * N_HEAD_KV, N_EMBD)
        tensor(f"blk.{block}.attn_v.weight", head * N_HEAD_KV, N_EMBD)
        tensor(f"blk.{block}.attn_output.weight", N_EMBD, N_EMBD)
        ones(f"blk.{block}.attn_q_norm.weight", head)
        ones(f"blk.{block}.attn_k_norm.weight", head)
        ones(f"blk.{block}.ffn_norm.weight", N_EMBD)
        tensor(f"blk.{block}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{block}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{block}.ffn_down.weight", N_EMBD, N_FF)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
