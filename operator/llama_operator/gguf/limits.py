"""The header budget: how much of a GGUF header the operator reads, keeps and computes with, and for how long.

A model source is tenant-controlled (and its host may be hostile), so every quantity in a header that sizes
memory, time or an integer the status carries has a bound here. The defaults are generous for real models:
the biggest headers are tens of MiB because of the tokenizer (a 262k-token vocabulary, a few hundred thousand
BPE merges), and those stay readable; what is not needed is walked or seeked over, never kept. Crossing a
bound is `NotAGguf` with a one-line message naming it; the deadline is `SourceUnreachable` (a slow host may
be fine tomorrow). docs/security.md ("Model files and remote hosts") lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..llamacpp.ggml import MAX_COUNT

MiB = 1024 * 1024


@dataclass(frozen=True)
class Budget:
    """Bounds of one header read; `DEFAULT_BUDGET` is what the operator and `llama-operator inspect` use."""

    seconds: float = 60.0
    """Deadline for the whole header, however the host paces its bytes."""
    min_rate: int = 64 * 1024
    """Bytes per second each read must average after `read_grace`: a host that drips its bytes is cut after
    seconds, not at the deadline, so it holds a parser thread (one of `parser.PARSER_THREADS`) only briefly."""
    read_grace: float = 5.0
    """Seconds every read may take before `min_rate` applies (connection set-up, a redirect, a slow first byte)."""
    fetched_bytes: int = 64 * MiB
    """Bytes actually read from the source. Fixed-size arrays (token scores and types) are seeked over and do
    not count; the vocabulary's strings are walked and do."""
    header_bytes: int = 256 * MiB
    """Offset of the end of the tensor infos: no read or seek goes past it."""
    max_chunk: int = 2 * MiB
    """Largest single read. A parse holds at most about three of these at once (the buffer, the bytes just
    read, their concatenation), so with the kept metadata about 8 MiB; a 64 MiB header costs about 40 reads."""
    kv_count: int = 16_384
    """Metadata keys (real files: under 100)."""
    tensor_count: int = 65_536
    """Tensor infos (real files: a few thousand at most; MoE experts are merged per layer)."""
    key_bytes: int = 65_535
    """Length of one key (the GGUF specification's limit)."""
    kept_string: int = 64 * 1024
    """Longest string value kept; a longer one (a licence, a huge chat template) is seeked over and recorded
    as {"type": "string", "length": n}."""
    kept_bytes: int = 1 * MiB
    """Keys, kept strings and materialised arrays together (strings past it are seeked over like long ones)."""
    array_elements: int = 16 * MiB
    """Elements of one array (the largest vocabularies have about 262k tokens)."""
    walked_strings: int = 8 * MiB
    """Strings of all string arrays together, each walked by its length (vocabulary plus merges)."""
    materialised_array: int = 4096
    """Longest per-layer array (head counts, feed-forward widths, the sliding-window pattern) kept as a list."""
    parameters: int = MAX_COUNT
    """Elements of one tensor, and of all tensors of the file together."""


DEFAULT_BUDGET = Budget()

STATUS_STRING = 256
"""Characters of a header string (name, size label, architecture) that reach status; longer ones are cut."""


def shorten(text: str, limit: int = STATUS_STRING) -> str:
    """`text` cut to `limit` characters (marked with …), for status and messages."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(key: str) -> str:
    """A tenant-controlled key as it may appear in a one-line message: quoted, shortened, no line breaks."""
    return repr(shorten(key, 80))
