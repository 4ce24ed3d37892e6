"""The GGUF header layout (magic, version, key/value metadata, tensor infos) and its budgeted parser.

The parser reads forward through a `Cursor`; whatever it does not need is *skipped*, not parsed: fixed-size
arrays (token scores, token types) are a pure seek, so their bytes are never fetched at all, and string arrays
(the vocabulary) are walked length-by-length without building Python strings. A 262k-token vocabulary costs
tens of milliseconds and its raw bytes, nothing more. It runs in a worker thread under the `Budget`'s deadline;
every malformed or over-budget header is `NotAGguf` with a one-line message.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..contract import GGUF_MAGIC
from ..errors import NotAGguf, SourceUnreachable
from ..llamacpp.ggml import GGML_MAX_DIMS, GGML_MAX_NAME, TensorSummary
from .byte_sources import ByteSource
from .cursor import Bridge, Cancelled, Cursor
from .header import GgufHeader
from .limits import DEFAULT_BUDGET, Budget, show

# GGUF metadata value types (gguf.md in the ggml repository).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = (
    range(13)
)
_SCALAR_FORMATS: Mapping[int, str] = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i", _FLOAT32: "<f",
    _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}  # fmt: skip
_TYPE_NAMES: Mapping[int, str] = {
    _UINT8: "uint8", _INT8: "int8", _UINT16: "uint16", _INT16: "int16", _UINT32: "uint32", _INT32: "int32",
    _FLOAT32: "float32", _BOOL: "bool", _STRING: "string", _ARRAY: "array", _UINT64: "uint64", _INT64: "int64",
    _FLOAT64: "float64",
}  # fmt: skip

# Small arrays of these keys are materialised (per-layer head counts, feed-forward widths, the sliding-window
# layer pattern): the memory estimate needs them. Every other array is skipped.
_WANTED_ARRAY_SUFFIXES = (
    ".attention.head_count",
    ".attention.head_count_kv",
    ".attention.sliding_window_pattern",
    ".feed_forward_length",
)
_KEPT_OVERHEAD = 64
"""What one kept key or string costs in Python beyond its characters, charged to `Budget.kept_bytes`."""
_KEPT_ELEMENT = 40
"""What one element of a materialised array costs in Python (an int object and its slot)."""

PARSER_THREADS = 8
"""Headers parsed at once, process-wide: with about 8 MiB each at most (limits.Budget.max_chunk), the operator's
memory for headers stays under 64 MiB however many models resolve together; the others queue (their deadline
runs while they wait). A thread of its own, so a parse never starves the default executor (DNS lookups)."""
_PARSERS = ThreadPoolExecutor(max_workers=PARSER_THREADS, thread_name_prefix="gguf-parser")


async def read_header(source: ByteSource, *, budget: Budget = DEFAULT_BUDGET) -> GgufHeader:
    """Parse the GGUF header from `source`: metadata, tensor shapes, parameter count.

    Raises `NotAGguf` for anything that is not a GGUF header within `budget`, `SourceUnreachable` when the
    header is not read within `budget.seconds`, and whatever the source raises for its own trouble.
    """
    loop = asyncio.get_running_loop()
    bridge = Bridge(source, loop)
    try:
        async with asyncio.timeout(budget.seconds):
            return await loop.run_in_executor(_PARSERS, _parse, bridge, budget)
    except (TimeoutError, Cancelled):  # the thread may notice the deadline a moment before the loop does
        raise SourceUnreachable(f"{source.name}: the GGUF header was not read within {budget.seconds:g} s "
                                "(the host sends it too slowly)") from None
    finally:
        bridge.close()


class _State:
    """What the parse has spent of the budget's counts."""

    def __init__(self, cur: Cursor, budget: Budget) -> None:
        self.cur = cur
        self.budget = budget
        self.kept = 0
        self.walked = 0
        self.deadline = time.monotonic() + budget.seconds

    def keep(self, cost: int) -> bool:
        if self.kept + cost > self.budget.kept_bytes:
            return False
        self.kept += cost
        return True

    def tick(self) -> None:
        """Between items: stop when the caller has given up (its deadline passed)."""
        if self.cur.bridge.closed or time.monotonic() > self.deadline:
            raise Cancelled


def _parse(bridge: Bridge, budget: Budget) -> GgufHeader:
    cur = Cursor(bridge, budget)
    try:
        return _parse_header(cur, budget)
    except (struct.error, OverflowError, ValueError) as exc:
        # A net under the checks above: a layout they missed is still a one-line NotAGguf, not a traceback.
        raise cur.error(f"unreadable GGUF header at byte {cur.offset} ({type(exc).__name__})") from None


def _parse_header(cur: Cursor, budget: Budget) -> GgufHeader:
    state = _State(cur, budget)
    try:
        cur.ensure(4)
    except NotAGguf:
        raise cur.error("file is shorter than the 4-byte GGUF magic") from None
    magic = cur.take(4)
    if magic != GGUF_MAGIC:
        raise cur.error(f"not a GGUF file: starts with {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.unpack("<I", 4)
    if version not in (2, 3):
        raise cur.error(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = cur.length()
    kv_count = cur.length()
    if kv_count > budget.kv_count:
        raise cur.error(f"{kv_count} metadata keys (at most {budget.kv_count})")
    if tensor_count > budget.tensor_count:
        raise cur.error(f"{tensor_count} tensors (at most {budget.tensor_count})")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        state.tick()
        key = _key(cur, state)
        if key in metadata:
            raise cur.error(f"duplicate metadata key {show(key)}")
        metadata[key] = _value(cur, state, key, cur.unpack("<I", 4))

    tensors = TensorSummary(count=tensor_count)
    for _ in range(tensor_count):
        state.tick()
        _tensor_info(cur, budget, tensors)
    return GgufHeader(version, tensor_count, metadata, tensors, header_size=cur.offset, source=cur.name)


def _key(cur: Cursor, state: _State) -> str:
    length = cur.length()
    if length > state.budget.key_bytes:
        raise cur.error(f"a metadata key of {length} bytes at byte {cur.offset - 8} (at most "
                        f"{state.budget.key_bytes})")
    if not state.keep(length + _KEPT_OVERHEAD):
        raise cur.error(f"metadata keys larger than {state.budget.kept_bytes // 1024} KiB in all")
    return cur.take(length).decode("utf-8", "replace")


def _value(cur: Cursor, state: _State, key: str, value_type: int) -> Any:
    fmt = _SCALAR_FORMATS.get(value_type)
    if fmt is not None:
        return cur.unpack(fmt, struct.calcsize(fmt))
    if value_type == _STRING:
        length = cur.length()
        if length > state.budget.kept_string or not state.keep(length + _KEPT_OVERHEAD):
            cur.skip(length)  # a licence or a huge template: its length is all anyone needs
            return {"type": "string", "length": length}
        return cur.take(length).decode("utf-8", "replace")
    if value_type != _ARRAY:
        raise cur.error(f"unknown metadata value type {value_type} for key {show(key)}")
    item_type = cur.unpack("<I", 4)
    count = cur.length()
    if count > state.budget.array_elements:
        raise cur.error(f"array {show(key)} of {count} elements (at most {state.budget.array_elements})")
    item_fmt = _SCALAR_FORMATS.get(item_type)
    if item_fmt is not None:
        item_size = struct.calcsize(item_fmt)
        if (key.endswith(_WANTED_ARRAY_SUFFIXES) and count <= state.budget.materialised_array
                and state.keep(count * _KEPT_ELEMENT)):
            return list(struct.unpack(f"<{count}{item_fmt[1]}", cur.take(item_size * count)))
        cur.skip(item_size * count)  # token scores / types: a seek, the bytes are never fetched
    elif item_type == _STRING:
        state.walked += count
        if state.walked > state.budget.walked_strings:
            raise cur.error(f"string arrays of more than {state.budget.walked_strings} strings in all")
        cur.skip_strings(count)
    elif item_type == _ARRAY:  # gguf.cpp refuses them too ("invalid GGUF type"): no nesting, no recursion
        raise cur.error(f"array {show(key)} holds arrays: nested arrays are not GGUF metadata llama.cpp reads")
    else:
        raise cur.error(f"unknown array item type {item_type} for key {show(key)}")
    return {"type": _TYPE_NAMES.get(item_type, str(item_type)), "count": count}


def _tensor_info(cur: Cursor, budget: Budget, tensors: TensorSummary) -> None:
    length = cur.length()
    if length >= GGML_MAX_NAME:
        raise cur.error(f"a tensor name of {length} bytes at byte {cur.offset - 8} (llama.cpp allows "
                        f"{GGML_MAX_NAME - 1})")
    name = cur.take(length).decode("utf-8", "replace")
    n_dims = cur.unpack("<I", 4)
    if n_dims > GGML_MAX_DIMS:
        raise cur.error(f"tensor {show(name)} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
    dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
    elements = 1
    for dim in dims:
        elements *= dim
        if elements > budget.parameters:
            raise cur.error(f"tensor {show(name)} of shape {list(dims)}: more than {budget.parameters} elements")
    ggml_type = cur.unpack("<I", 4)
    cur.skip(8)  # data offset
    tensors.add(name, dims, ggml_type)
    if tensors.parameter_count > budget.parameters:
        raise cur.error(f"tensors of more than {budget.parameters} parameters in all")
