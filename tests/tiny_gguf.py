"""A tiny random-weight llama GGUF that the real llama-server loads in a fraction of a second.

`write_tiny_llama(path)` writes a ~0.5 MB model: llama architecture, 2 blocks, 64-wide embeddings, and a
SentencePiece-style vocabulary (control tokens, the 256 byte-fallback tokens, printable ASCII pieces) with
the tokenizer metadata llama.cpp requires. The weights are seeded random numbers, so the file is
byte-for-byte stable across runs and the model's output is gibberish: tests use it to prove that flags
start a server, not that answers are good.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_HEAD = 2  # head dim 32: quantized KV cache types (block size 32) need it
N_HEAD_KV = 2
N_FF = 128
N_LAYER = 2
CONTEXT_LENGTH = 4096


def _vocab(size: int | None = None) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    # Byte-fallback tokens let the SentencePiece tokenizer encode any input.
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    # Printable ASCII pieces ("▁" is SentencePiece's word-boundary marker).
    pieces = ["▁"] + [chr(c) for c in range(33, 127)] + ["▁" + chr(c) for c in range(97, 123)]
    if size is not None:  # filler words up to the asked size (the memory benchmark's big-vocabulary variant)
        pieces += [f"▁w{i}" for i in range(max(0, size - len(tokens) - len(pieces)))]
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def add_tokenizer(writer: gguf.GGUFWriter, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """The SentencePiece tokenizer keys of a `_vocab` vocabulary: <unk> 0, <s> 1 (added), </s> 2."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write_tiny_llama(path: str | Path, *, seed: int = 0, vocab_size: int | None = None,
                     chat_template: str | None = None, context_length: int = CONTEXT_LENGTH,
                     n_layer: int = N_LAYER) -> Path:
    """Write the tiny llama GGUF to `path` (parent directories created) and return the path; `vocab_size`
    pads the vocabulary with filler words (default: the ~380 tokens above); `chat_template` is stored as
    tokenizer.chat_template (default: none, like a converted base model); `context_length` is the trained
    context the header states; `n_layer` the number of blocks (more than 2: a model split over several devices)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = _vocab(vocab_size)
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)

    add_tokenizer(writer, tokens, scores, types)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def tensor(name: str, *shape: int, scale: float = 0.02) -> None:
        # numpy shape is (rows, cols) = GGUF's (ne1, ne0): a [n_out, n_in] matrix.
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def ones(name: str, size: int) -> None:
        writer.add_tensor(name, np.ones(size, dtype=np.float32))

    tensor("token_embd.weight", n_vocab, N_EMBD)
    ones("output_norm.weight", N_EMBD)
    tensor("output.weight", n_vocab, N_EMBD)
    kv_width = N_EMBD // N_HEAD * N_HEAD_KV
    for block in range(n_layer):
        ones(f"blk.{block}.attn_norm.weight", N_EMBD)
        tensor(f"blk.{block}.attn_q.weight", N_EMBD, N_EMBD)
        tensor(f"blk.{block}.attn_k.weight", kv_width, N_EMBD)
        tensor(f"blk.{block}.attn_v.weight", kv_width, N_EMBD)
        tensor(f"blk.{block}.attn_output.weight", N_EMBD, N_EMBD)
        ones(f"blk.{block}.ffn_norm.weight", N_EMBD)
        tensor(f"blk.{block}.ffn_gate.weight", N_FF, N_EMBD)
        tensor(f"blk.{block}.ffn_up.weight", N_FF, N_EMBD)
        tensor(f"blk.{block}.ffn_down.weight", N_EMBD, N_FF)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
