"""What the pinned llama.cpp (ggml) says about tensors: type names, block sizes, limits, and the per-file summary
of tensor shapes that the GGUF reader fills and the memory estimate reads.

Facts, not parsing: `gguf` (the header reader) and `fit.shape` (the memory shape) both build on this module, and
neither imports the other through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

GGML_MAX_DIMS = 4
"""Dimensions of a tensor (ggml.h); gguf.cpp refuses a tensor info with more."""
GGML_MAX_NAME = 64
"""Bytes of a tensor name including its NUL (ggml.h); gguf.cpp refuses a name of this length or longer."""
LLAMA_MAX_LAYERS = 512
"""Blocks a model may have (llama-hparams.h); the loader asserts it, so a header claiming more cannot load."""
MAX_COUNT = 2**53
"""The largest element count or byte size taken from a header into status (the project's bound, not ggml's):
exact in every JSON reader, far above any model (2^53 parameters is 9 quadrillion)."""

# llama_ftype (llama.h) -> the name people use for the quantization; values that were removed upstream are
# kept so old files still get a name.
FILE_TYPE_NAMES: Mapping[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 4: "Q4_1_SOME_F16", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S",
    27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 33: "Q4_0_4_4", 34: "Q4_0_4_8",
    35: "Q4_0_8_8", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}  # fmt: skip

# ggml_type -> name, used when a file has no general.file_type: the dominant tensor type names it.
GGML_TYPE_NAMES: Mapping[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K",
    12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip

# ggml_type -> (elements per block, bytes per block): a tensor's size in the file is elements / block * bytes.
GGML_BLOCK_SIZES: Mapping[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18), 42: (64, 18),
}  # fmt: skip

# ggml types the CPU backend repacks for its AVX2 matrix kernels (ggml-cpu/repack.cpp): Q4_0, Q4_K, IQ4_NL, MXFP4.
CPU_REPACKED_TYPES = frozenset({2, 12, 20, 39})


def tensor_bytes(dims: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor's data; an unknown type counts as 2 bytes per element (the common f16 case)."""
    block, size = GGML_BLOCK_SIZES.get(ggml_type, (1, 2))
    return math.prod(dims) // block * size


def tensor_group(name: str) -> str:
    if name.startswith("blk."):
        return "layers"
    if name.startswith("token_embd."):
        return "embedding"
    if name.startswith("output."):
        return "output"
    return "other"


@dataclass
class TensorSummary:
    """What a GGUF header says about the tensors (not their data)."""

    count: int = 0
    parameter_count: int = 0
    elements_by_type: dict[int, int] = field(default_factory=dict)
    bytes_by_group: dict[str, int] = field(default_factory=dict)
    """Data bytes by where llama.cpp places the tensor: `layers` (blk.N.*, offloadable per layer),
    `embedding` (token_embd, always in host memory), `output` (the output head; absent when tied to token_embd)
    and `other` (final norm, RoPE factors)."""

    repackable_bytes: int = 0
    """Bytes of matrices ggml's CPU backend copies into its interleaved layout at load on AVX2 CPUs (Q4_0,
    Q4_K, IQ4_NL, MXFP4 with rows in multiples of 8): on CPU they are resident twice, mapped and repacked."""

    def add(self, name: str, dims: tuple[int, ...], ggml_type: int) -> None:
        elements = math.prod(dims)
        self.parameter_count += elements
        self.elements_by_type[ggml_type] = self.elements_by_type.get(ggml_type, 0) + elements
        group = tensor_group(name)
        size = tensor_bytes(dims, ggml_type)
        self.bytes_by_group[group] = self.bytes_by_group.get(group, 0) + size
        if group in ("layers", "output") and ggml_type in CPU_REPACKED_TYPES and len(dims) >= 2 and dims[1] % 8 == 0:
            self.repackable_bytes += size

    def merged(self, other: TensorSummary) -> TensorSummary:
        """This file's tensors plus another shard's (a split model)."""
        out = TensorSummary(self.count + other.count, self.parameter_count + other.parameter_count,
                            repackable_bytes=self.repackable_bytes + other.repackable_bytes)
        for mine, theirs, into in ((self.elements_by_type, other.elements_by_type, out.elements_by_type),
                                   (self.bytes_by_group, other.bytes_by_group, out.bytes_by_group)):
            for key in {*mine, *theirs}:
                into[key] = mine.get(key, 0) + theirs.get(key, 0)  # type: ignore[index]
        return out
