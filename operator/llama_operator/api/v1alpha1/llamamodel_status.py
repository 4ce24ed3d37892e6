"""LlamaModel status: the resolved files, the GGUF header's facts, trust-on-first-use checksums."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import ApiModel
from ..bounds import Message
from .shared_types import SHA256_HEX, Condition


class ModelFile(ApiModel):
    """One resolved file of the model (several for a split GGUF)."""

    name: str = Field(description="File name inside the cache directory.")
    url: str | None = Field(None, description="Where it is downloaded from (absent for volume sources).")
    size: int | None = Field(None, description="Size in bytes, when known.")
    sha256: str | None = Field(None, description="Content sha256, when known.")


class ModelMemoryShape(ApiModel):
    """The sizes a memory estimate needs, derived from the GGUF header (see docs/memory-fit.md)."""

    weight_bytes: int = Field(0, description="Bytes of all tensor data.")
    layer_weight_bytes: int = Field(0, description="Bytes of the repeating blk.N tensors (offloaded per layer).")
    embedding_weight_bytes: int = Field(0, description="Bytes of token_embd (always kept in host memory).")
    output_weight_bytes: int = Field(0, description="Bytes of the output head (0 when tied to token_embd).")
    cpu_repacked_bytes: int = Field(
        0, description="Bytes of weights the CPU backend also keeps in its repacked layout (Q4_0, Q4_K, IQ4_NL, "
        "MXFP4 on AVX2): counted twice for layers that run on the CPU."
    )
    layers: int = Field(0, description="Transformer blocks.")
    vocab_size: int = Field(0, description="Tokens in the vocabulary.")
    embedding_length: int = Field(0, description="Embedding width.")
    feed_forward_length: int = Field(0, description="Widest feed-forward layer.")
    head_count: int = Field(0, description="Most attention (query) heads in a layer.")
    attention_layers: int = Field(0, description="Layers with a full-context KV cache.")
    sliding_window_layers: int = Field(0, description="Layers with a sliding-window KV cache.")
    sliding_window: int = Field(0, description="Tokens a sliding-window layer attends to.")
    recurrent_layers: int = Field(0, description="Layers with a fixed-size recurrent state (Mamba, RWKV, ...).")
    key_width: int = Field(0, description="K elements per token, summed over the full-context layers.")
    value_width: int = Field(0, description="V elements per token, summed over the full-context layers.")
    sliding_key_width: int = Field(0, description="K elements per token, summed over the sliding-window layers.")
    sliding_value_width: int = Field(0, description="V elements per token, summed over the sliding-window layers.")
    recurrent_state_width: int = Field(
        0, description="f32 elements of recurrent state per sequence, summed over the recurrent layers."
    )


class GgufInfo(ApiModel):
    """Metadata read from the GGUF header."""

    architecture: str | None = Field(None, description="general.architecture, e.g. llama, qwen2, gemma3.")
    name: str | None = Field(None, description="general.name.")
    size_label: str | None = Field(None, description="general.size_label, e.g. 0.5B.")
    file_type: str | None = Field(None, description="Quantization, e.g. Q4_K_M.")
    parameter_count: int | None = Field(None, description="Parameters counted from tensor shapes.")
    context_length: int | None = Field(None, description="Training context length.")
    block_count: int | None = Field(None, description="Number of transformer blocks.")
    embedding_length: int | None = Field(None, description="Embedding width.")
    head_count: int | None = Field(None, description="Attention heads.")
    head_count_kv: int | None = Field(None, description="Key/value heads.")
    has_chat_template: bool | None = Field(
        None, description="tokenizer.chat_template is set: llama-server formats chat requests with it (without "
        "one, and without a LlamaServer chatTemplate, it falls back to chatml).")
    memory: ModelMemoryShape | None = Field(
        None, description="Sizes the memory estimate of a LlamaServer uses (weights, KV cache widths, layers)."
    )
    adapter_type: str | None = Field(
        None, description="adapter.type of a GGUF whose general.type is adapter (lora); absent for a model.")


class FileChecksum(ApiModel):
    """The sha256 of one model file."""

    name: str = Field(description="File name inside the cache directory.")
    sha256: str = Field(pattern=SHA256_HEX, description="Content sha256, lowercase hex.")


class TrustOnFirstUse(ApiModel):
    """Checksums recorded from the first verified download of a source that publishes none.

    Every later download (other pods, other nodes) must produce the same bytes; see docs/model-sources.md.
    """

    cache_key: str = Field(description="The cache key (status.cacheKey) they were recorded for: a source without "
                           "a published sha256 is keyed by its identity, so another source starts over.")
    source: str | None = Field(None, description="The source they were recorded for (hf:repo@revision/file, url:...).")
    files: list[FileChecksum] = Field(description="sha256 of every file, as the first verified download found it.")
    recorded_time: str | None = Field(None, description="When they were recorded (RFC 3339).")
    recorded_from: str | None = Field(None, description="The pod whose download recorded them.")


ModelPhase = Literal["Pending", "Resolving", "Ready", "Failed"]


class LlamaModelStatus(ApiModel):
    """What the operator knows about the model."""

    phase: ModelPhase | None = Field(None, description="Pending, Resolving, Ready or Failed.")
    message: Message | None = Field(None, description="What is wrong, when something is.")
    observed_generation: int | None = Field(None, description="The metadata.generation this status is for.")
    conditions: list[Condition] | None = Field(None, description="Resolved, Ready conditions.")
    files: list[ModelFile] | None = Field(None, description="Every file of the model.")
    size: int | None = Field(None, description="Total size in bytes.")
    sha256: str | None = Field(None, description="sha256 of the (first) file.")
    cache_key: str | None = Field(None, description="Directory of this model inside the cache volume.")
    gguf: GgufInfo | None = Field(None, description="GGUF header metadata.")
    mmproj: ModelFile | None = Field(None, description="The resolved multimodal projector file (spec.mmproj).")
    last_resolved_time: str | None = Field(
        None, description="When the source was last inspected (RFC 3339); it is inspected again when the spec "
        "changes or LLAMA_OPERATOR_MODEL_RESYNC_SECONDS later.")
    trust_on_first_use: TrustOnFirstUse | None = Field(
        None, description="For a source without a published sha256 (and no spec.sha256): the checksums of the "
        "first verified download, which every later download must match.")
