"""A tiny random-weight multimodal projector (mmproj) GGUF that llama.cpp's mtmd loads, and a PNG to send it.

`write_tiny_mmproj(path)` writes a ~100 KB LLaVA-style vision tower: general.architecture `clip`, projector
type `mlp`, 32x32 images cut into four 16x16 patches, two 32-wide transformer blocks and a two-layer MLP
projecting into the 64-wide embeddings of tests/tiny_gguf.py's model (mtmd requires the projector's output to
match the text model). Like the text model the weights are seeded random numbers: an image goes through the
whole path (decode, preprocess, encode, project, evaluate) and the answer is gibberish.

`tiny_png(width, height)` encodes an RGB image with the standard library only (zlib), for image_url data URIs.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import gguf
import numpy as np

from .tiny_gguf import N_EMBD as TEXT_EMBD

IMAGE_SIZE = 32
PATCH_SIZE = 16
V_EMBD = 32
V_HEADS = 2
V_FF = 64
V_LAYERS = 2
PROJ_HIDDEN = 64


def write_tiny_mmproj(path: str | Path, *, seed: int = 0, text_embd: int = TEXT_EMBD) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("tiny-mmproj-test")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(IMAGE_SIZE)
    writer.add_vision_patch_size(PATCH_SIZE)
    writer.add_vision_embedding_length(V_EMBD)
    writer.add_vision_feed_forward_length(V_FF)
    writer.add_vision_block_count(V_LAYERS)
    writer.add_vision_head_count(V_HEADS)
    writer.add_vision_projection_dim(text_embd)
    writer.add_vision_attention_layernorm_eps(1e-5)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_use_gelu(True)

    def tensor(name: str, *shape: int, dtype: type = np.float32) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(dtype))

    def norm(name: str, size: int) -> None:
        writer.add_tensor(f"{name}.weight", np.ones(size, dtype=np.float32))
        writer.add_tensor(f"{name}.bias", np.zeros(size, dtype=np.float32))

    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    # numpy shapes are GGUF's dimensions reversed: the patch kernel is [out, channels, height, width].
    tensor("v.patch_embd.weight", V_EMBD, 3, PATCH_SIZE, PATCH_SIZE, dtype=np.float16)
    tensor("v.patch_embd.bias", V_EMBD)
    tensor("v.position_embd.weight", n_patches, V_EMBD)
    norm("v.pre_ln", V_EMBD)
    for block in range(V_LAYERS):
        prefix = f"v.blk.{block}"
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensor(f"{prefix}.{part}.weight", V_EMBD, V_EMBD)
            tensor(f"{prefix}.{part}.bias", V_EMBD)
        norm(f"{prefix}.ln1", V_EMBD)
        norm(f"{prefix}.ln2", V_EMBD)
        tensor(f"{prefix}.ffn_up.weight", V_FF, V_EMBD)
        tensor(f"{prefix}.ffn_up.bias", V_FF)
        tensor(f"{prefix}.ffn_down.weight", V_EMBD, V_FF)
        tensor(f"{prefix}.ffn_down.bias", V_EMBD)
    tensor("mm.0.weight", PROJ_HIDDEN, V_EMBD)
    tensor("mm.0.bias", PROJ_HIDDEN)
    tensor("mm.2.weight", text_embd, PROJ_HIDDEN)
    tensor("mm.2.bias", text_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_png(width: int = 48, height: int = 40) -> bytes:
    """An RGB gradient as a PNG file (no imaging library needed)."""
    # Each scanline: filter type 0, then RGB triples.
    raw = b"".join(b"\x00" + b"".join(bytes((x * 5 % 256, y * 6 % 256, (x + y) * 3 % 256)) for x in range(width))
                   for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
