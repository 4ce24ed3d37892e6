"""A parsed GGUF header and what of it reaches status: the scalar facts of `GgufInfo`, strings cut to
`limits.STATUS_STRING`, integers refused past `limits.MAX_COUNT`. The memory shape is added by `fit.model_info`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api.v1beta1 import GgufInfo
from ..errors import NotAGguf
from ..llamacpp.ggml import FILE_TYPE_NAMES, GGML_TYPE_NAMES, MAX_COUNT, TensorSummary
from .limits import shorten

_MAX_SUMMARY_STRING = 1024
"""Strings longer than this (chat templates, licences) are shown by their length in `summary`."""


@dataclass
class GgufHeader:
    """The parsed header of one GGUF file."""

    version: int
    tensor_count: int
    metadata: dict[str, Any]
    """Scalar metadata values; arrays appear as {"type": ..., "count": ...} unless materialised, strings longer
    than the budget keeps as {"type": "string", "length": ...}."""
    tensors: TensorSummary
    header_size: int
    """Bytes from the start of the file to the end of the tensor infos."""
    source: str = ""
    """How messages name the file (a path, or a URL without its query)."""

    def error(self, problem: str) -> NotAGguf:
        return NotAGguf(f"{self.source}: {problem}" if self.source else problem)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def _string(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return shorten(value) if isinstance(value, str) else None

    def _arch_int(self, suffix: str) -> int | None:
        arch = self.architecture
        if arch is None:
            return None
        key = f"{arch}.{suffix}"
        value = self.metadata.get(key)
        if isinstance(value, list):  # per-layer values (e.g. OpenELM): report the largest
            numbers = [v for v in value if isinstance(v, int)]
            value = max(numbers) if numbers else None
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        if not 0 <= value <= MAX_COUNT:
            raise self.error(f"{shorten(key, 80)} is {value}: out of range")
        return value

    @property
    def file_type(self) -> str | None:
        value = self.metadata.get("general.file_type")
        if isinstance(value, int) and not isinstance(value, bool):
            return FILE_TYPE_NAMES.get(value, f"type{value}")
        if self.tensors.elements_by_type:
            dominant = max(self.tensors.elements_by_type.items(), key=lambda item: item[1])[0]
            return GGML_TYPE_NAMES.get(dominant, f"ggml{dominant}")
        return None

    def info(self, *, tensors: TensorSummary | None = None) -> GgufInfo:
        """The scalar GgufInfo for status (no memory shape); `tensors` (every shard's, for a split model)
        overrides this file's own."""
        tensors = tensors or self.tensors
        if tensors.parameter_count > MAX_COUNT:
            raise self.error(f"{tensors.parameter_count} parameters: out of range")
        return GgufInfo(
            architecture=self._string("general.architecture"),
            name=self._string("general.name"),
            size_label=self._string("general.size_label"),
            file_type=self.file_type,
            parameter_count=tensors.parameter_count,
            context_length=self._arch_int("context_length"),
            block_count=self._arch_int("block_count"),
            embedding_length=self._arch_int("embedding_length"),
            head_count=self._arch_int("attention.head_count"),
            head_count_kv=self._arch_int("attention.head_count_kv"),
            has_chat_template=bool(self.metadata.get("tokenizer.chat_template")),
            adapter_type=self.adapter_type,
        )

    @property
    def adapter_type(self) -> str | None:
        """adapter.type of an adapter file (general.type adapter): llama.cpp loads `lora` ones; '' when an adapter
        names none; None for a model."""
        if self._string("general.type") != "adapter":
            return None
        return self._string("adapter.type") or ""


def summary(header: GgufHeader) -> dict[str, Any]:
    """Scalar metadata for display: long strings (chat templates) and arrays by their size."""
    out: dict[str, Any] = {}
    for key, value in header.metadata.items():
        if isinstance(value, str) and len(value) > _MAX_SUMMARY_STRING:
            value = f"<string of {len(value)} characters>"
        elif isinstance(value, dict) and "length" in value:
            value = f"<string of {value['length']} bytes>"
        elif isinstance(value, dict):
            value = f"<array of {value['count']} {value['type']}>"
        out[key] = value
    return out
