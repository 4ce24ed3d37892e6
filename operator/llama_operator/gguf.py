"""Streaming GGUF header reader: metadata and tensor shapes without downloading the weights.

Owns the GGUF container format knowledge of the project: the header layout (magic, version, key/value
metadata, tensor infos), the mapping of `general.file_type` to quantization names, and the byte sources the
header is read from (a local file, or HTTP range requests that grow as the parser needs more).

The parser is written against `ByteSource` — "give me bytes at this offset" — so the same code inspects a
file on disk and a multi-gigabyte file on a CDN. It reads forward through a buffer; whatever it does not need
is *skipped*, not parsed: fixed-size arrays (token scores, token types) are a pure seek, so their bytes are
never fetched at all, and string arrays (the vocabulary) are walked length-by-length without building Python
strings. A 262k-token vocabulary costs tens of milliseconds and its raw bytes, nothing more.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from .api.v1alpha1 import GgufInfo
from .contract import GGUF_MAGIC
from .fetch.http import MAX_REDIRECTS, REDIRECTS, hop_headers, same_origin

# GGUF metadata value types (gguf.md in the ggml repository).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = (
    range(13)
)
_SCALAR_FORMATS: Mapping[int, str] = {
    _UINT8: "<B",
    _INT8: "<b",
    _UINT16: "<H",
    _INT16: "<h",
    _UINT32: "<I",
    _INT32: "<i",
    _FLOAT32: "<f",
    _BOOL: "<?",
    _UINT64: "<Q",
    _INT64: "<q",
    _FLOAT64: "<d",
}
_TYPE_NAMES: Mapping[int, str] = {
    _UINT8: "uint8",
    _INT8: "int8",
    _UINT16: "uint16",
    _INT16: "int16",
    _UINT32: "uint32",
    _INT32: "int32",
    _FLOAT32: "float32",
    _BOOL: "bool",
    _STRING: "string",
    _ARRAY: "array",
    _UINT64: "uint64",
    _INT64: "int64",
    _FLOAT64: "float64",
}

# llama_ftype (llama.h) -> the name people use for the quantization; values that were removed upstream are
# kept so old files still get a name.
FILE_TYPE_NAMES: Mapping[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    4: "Q4_1_SOME_F16",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    33: "Q4_0_4_4",
    34: "Q4_0_4_8",
    35: "Q4_0_8_8",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}

# ggml_type -> name, used when a file has no general.file_type: the dominant tensor type names it.
GGML_TYPE_NAMES: Mapping[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
}

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

# Small arrays of these keys are materialised (per-layer head counts, feed-forward widths, the sliding-window
# layer pattern): the memory estimate needs them. Every other array is skipped.
_WANTED_ARRAY_SUFFIXES = (
    ".attention.head_count",
    ".attention.head_count_kv",
    ".attention.sliding_window_pattern",
    ".feed_forward_length",
)
_MAX_MATERIALISED_ARRAY = 4096
# Strings longer than this (chat templates, licences) are kept out of the scalar metadata summary.
_MAX_SUMMARY_STRING = 1024
# Sanity bounds: a corrupt length field must fail fast, not allocate gigabytes.
_MAX_STRING = 64 * 1024 * 1024
_MAX_DIMS = 8


class GgufError(ValueError):
    """The bytes are not a readable GGUF header."""


class NotAGgufError(GgufError):
    """The file does not start with the GGUF magic."""


class GgufFormatError(GgufError):
    """The file starts like a GGUF but its header is truncated or corrupt."""


class ByteSource(Protocol):
    """Random access to the bytes of one file. `read` may return fewer bytes than asked only at end of file."""

    bytes_fetched: int

    async def read(self, offset: int, size: int) -> bytes: ...


class FileByteSource:
    """A local file; reads run in a worker thread so the event loop never blocks on disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.bytes_fetched = 0

    def _read(self, offset: int, size: int) -> bytes:
        with self.path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    async def read(self, offset: int, size: int) -> bytes:
        data = await asyncio.to_thread(self._read, offset, size)
        self.bytes_fetched += len(data)
        return data


class HttpStatusError(Exception):
    """An HTTP range request was answered with an error status (callers map it to their own errors)."""

    def __init__(self, status_code: int, url: str, headers: Mapping[str, str]) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.url = url
        self.headers = dict(headers)


async def send_following(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    headers: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
) -> httpx.Response:
    """Send a streamed request, following redirects by hand.

    httpx drops only `Authorization` on a cross-origin redirect; a headersSecretRef can hold any header
    (X-Api-Key, Cookie), and a presigned CDN/S3 URL rejects extra credentials. So every caller header is dropped
    once the origin changes; `extra` (Range) is always sent. The caller closes the returned response.
    """
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        send_headers = hop_headers(headers, url, current, extra)
        request = client.build_request(method, current, headers=send_headers)
        response = await client.send(request, stream=True, follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code not in REDIRECTS or not location:
            return response
        await response.aclose()
        current = str(httpx.URL(current).join(location))
    raise HttpStatusError(310, url, {})


class HttpByteSource:
    """A remote file read with `Range: bytes=a-b` requests.

    Redirects are followed once (see `send_following`) and the final URL is reused for later ranges, so a hub
    redirect costs one extra round trip per header read, not one per range. A server that ignores Range (200) is
    tolerated: only the wanted bytes are read from the stream and the connection is closed.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, headers: Mapping[str, str] | None = None) -> None:
        self.client = client
        self.url = url
        self.headers = dict(headers or {})
        self.bytes_fetched = 0
        self.requests = 0
        self._final_url: str | None = None

    async def read(self, offset: int, size: int) -> bytes:
        extra = {"Range": f"bytes={offset}-{offset + size - 1}"}
        self.requests += 1
        target = self._final_url or self.url
        headers = self.headers if same_origin(self.url, target) else {}
        response = await send_following(self.client, "GET", target, headers, extra)
        try:
            if response.status_code == 416:  # range starts past the end of the file
                return b""
            if response.status_code not in (200, 206):
                raise HttpStatusError(response.status_code, str(response.url), response.headers)
            self._final_url = str(response.url)
            skip = offset if response.status_code == 200 else 0
            parts: list[bytes] = []
            have = 0
            async for chunk in response.aiter_raw():
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                parts.append(chunk)
                have += len(chunk)
                if have >= size:
                    break
            data = b"".join(parts)[:size]
        finally:
            await response.aclose()
        self.bytes_fetched += len(data)
        return data


@dataclass
class TensorSummary:
    """What the header says about the tensors (not their data)."""

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
class GgufHeader:
    """The parsed header of one GGUF file."""

    version: int
    tensor_count: int
    metadata: dict[str, Any]
    """Scalar metadata values; arrays appear as {"type": ..., "count": ...} unless materialised."""
    tensors: TensorSummary
    header_size: int
    """Bytes from the start of the file to the end of the tensor infos."""

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def _arch_int(self, suffix: str) -> int | None:
        arch = self.architecture
        if arch is None:
            return None
        value = self.metadata.get(f"{arch}.{suffix}")
        if isinstance(value, list):  # per-layer values (e.g. OpenELM): report the largest
            numbers = [v for v in value if isinstance(v, int)]
            return max(numbers) if numbers else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def file_type(self) -> str | None:
        value = self.metadata.get("general.file_type")
        if isinstance(value, int) and not isinstance(value, bool):
            return FILE_TYPE_NAMES.get(value, f"type{value}")
        if self.tensors.elements_by_type:
            dominant = max(self.tensors.elements_by_type.items(), key=lambda item: item[1])[0]
            return GGML_TYPE_NAMES.get(dominant, f"ggml{dominant}")
        return None

    @property
    def split_count(self) -> int:
        value = self.metadata.get("split.count")
        return value if isinstance(value, int) and value > 0 else 1

    def info(self, parameter_count: int | None = None, *, tensors: TensorSummary | None = None) -> GgufInfo:
        """The GgufInfo for status; `tensors` (every shard's, for a split model) or `parameter_count`
        override this file's own."""
        from .fit.shape import memory_shape  # architecture knowledge lives with the estimate

        tensors = tensors or self.tensors
        if parameter_count is None:
            parameter_count = tensors.parameter_count
        name = self.metadata.get("general.name")
        size_label = self.metadata.get("general.size_label")
        return GgufInfo(
            architecture=self.architecture,
            name=name if isinstance(name, str) else None,
            size_label=size_label if isinstance(size_label, str) else None,
            file_type=self.file_type,
            parameter_count=parameter_count,
            context_length=self._arch_int("context_length"),
            block_count=self._arch_int("block_count"),
            embedding_length=self._arch_int("embedding_length"),
            head_count=self._arch_int("attention.head_count"),
            head_count_kv=self._arch_int("attention.head_count_kv"),
            has_chat_template=bool(self.metadata.get("tokenizer.chat_template")),
            memory=memory_shape(self.metadata, tensors),
        )


class _Cursor:
    """Forward-only reader over a ByteSource with a buffer that grows geometrically.

    Each refill asks for at least `chunk` bytes and doubles `chunk` (up to `max_chunk`), so a header of H bytes
    costs O(log H) requests while a tiny header costs one small request. `skip` past the buffer drops it and
    moves the file position without fetching anything.
    """

    def __init__(self, source: ByteSource, first_chunk: int, max_chunk: int) -> None:
        self.source = source
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # index into buf
        self.chunk = first_chunk
        self.max_chunk = max_chunk

    @property
    def offset(self) -> int:
        return self.base + self.pos

    async def ensure(self, size: int) -> None:
        available = len(self.buf) - self.pos
        if available >= size:
            return
        want = max(size - available, self.chunk)
        self.chunk = min(self.chunk * 2, self.max_chunk)
        data = await self.source.read(self.base + len(self.buf), want)
        # Keep only the unread tail: memory stays bounded by the largest single request.
        self.buf = self.buf[self.pos :] + data
        self.base += self.pos
        self.pos = 0
        if len(self.buf) < size:
            raise GgufFormatError(f"header truncated at byte {self.base + len(self.buf)}")

    async def take(self, size: int) -> bytes:
        await self.ensure(size)
        data = self.buf[self.pos : self.pos + size]
        self.pos += size
        return data

    async def unpack(self, fmt: str, size: int) -> Any:
        await self.ensure(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def skip(self, size: int) -> None:
        if self.pos + size <= len(self.buf):
            self.pos += size
        else:
            self.base = self.base + self.pos + size
            self.buf = b""
            self.pos = 0

    async def string(self) -> bytes:
        length = await self.unpack("<Q", 8)
        if length > _MAX_STRING:
            raise GgufFormatError(f"string of {length} bytes at byte {self.offset - 8}: corrupt header")
        return await self.take(length)

    async def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings, touching only their length fields (the vocabulary)."""
        unpack_from = struct.unpack_from
        while count:
            buf = self.buf
            end = len(buf) - 8
            pos = self.pos
            # Hot loop: no awaits, no allocations; only the 8-byte length of each string is decoded.
            while count and pos <= end:
                pos += 8 + unpack_from("<Q", buf, pos)[0]
                count -= 1
            if pos > len(buf):  # the last string runs past the buffer: seek over its remainder
                self.skip(pos - self.pos)
            else:
                self.pos = pos
            if count:
                await self.ensure(8)


async def read_header(
    source: ByteSource, *, first_chunk: int = 256 * 1024, max_chunk: int = 16 * 1024 * 1024
) -> GgufHeader:
    """Parse the GGUF header from `source`: metadata, tensor shapes, parameter count."""
    cur = _Cursor(source, first_chunk, max_chunk)
    try:
        await cur.ensure(4)
    except GgufFormatError as exc:
        raise NotAGgufError("file is shorter than the 4-byte GGUF magic") from exc
    magic = await cur.take(4)
    if magic != GGUF_MAGIC:
        raise NotAGgufError(f"not a GGUF file: starts with {magic!r}, expected {GGUF_MAGIC!r}")
    version = await cur.unpack("<I", 4)
    if version not in (2, 3):
        raise GgufFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = await cur.unpack("<Q", 8)
    kv_count = await cur.unpack("<Q", 8)

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = (await cur.string()).decode("utf-8", "replace")
        value_type = await cur.unpack("<I", 4)
        metadata[key] = await _read_value(cur, key, value_type)

    tensors = TensorSummary(count=tensor_count)
    for _ in range(tensor_count):
        name = (await cur.string()).decode("utf-8", "replace")
        n_dims = await cur.unpack("<I", 4)
        if n_dims > _MAX_DIMS:
            raise GgufFormatError(f"tensor with {n_dims} dimensions: corrupt header")
        dims = struct.unpack(f"<{n_dims}Q", await cur.take(8 * n_dims))
        ggml_type = await cur.unpack("<I", 4)
        cur.skip(8)  # data offset
        tensors.add(name, dims, ggml_type)
    return GgufHeader(version, tensor_count, metadata, tensors, header_size=cur.offset)


async def _read_value(cur: _Cursor, key: str, value_type: int) -> Any:
    fmt = _SCALAR_FORMATS.get(value_type)
    if fmt is not None:
        return await cur.unpack(fmt, struct.calcsize(fmt))
    if value_type == _STRING:
        return (await cur.string()).decode("utf-8", "replace")
    if value_type != _ARRAY:
        raise GgufFormatError(f"unknown metadata value type {value_type} for key {key!r}")
    item_type = await cur.unpack("<I", 4)
    count = await cur.unpack("<Q", 8)
    item_fmt = _SCALAR_FORMATS.get(item_type)
    if item_fmt is not None:
        item_size = struct.calcsize(item_fmt)
        if key.endswith(_WANTED_ARRAY_SUFFIXES) and count <= _MAX_MATERIALISED_ARRAY:
            return list(struct.unpack(f"<{count}{item_fmt[1]}", await cur.take(item_size * count)))
        cur.skip(item_size * count)  # token scores / types: a seek, the bytes are never fetched
    elif item_type == _STRING:
        await cur.skip_strings(count)
    elif item_type == _ARRAY:
        for _ in range(count):  # nested arrays are rare and small
            await _read_value(cur, key, _ARRAY)
    else:
        raise GgufFormatError(f"unknown array item type {item_type} for key {key!r}")
    return {"type": _TYPE_NAMES.get(item_type, str(item_type)), "count": count}


def summary(header: GgufHeader) -> dict[str, Any]:
    """Scalar metadata for display: long strings (chat templates) are shortened."""
    out: dict[str, Any] = {}
    for key, value in header.metadata.items():
        if isinstance(value, str) and len(value) > _MAX_SUMMARY_STRING:
            value = f"<string of {len(value)} characters>"
        elif isinstance(value, dict):
            value = f"<array of {value['count']} {value['type']}>"
        out[key] = value
    return out


async def inspect(target: str, *, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the header of a local path or an http(s) URL; the result is what `llama-operator inspect` prints."""
    started = time.perf_counter()
    source: ByteSource
    requests: int | None = None
    if target.startswith(("http://", "https://")):
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
            http_source = HttpByteSource(client, target, headers)
            source = http_source
            header = await read_header(source)
            requests = http_source.requests
    else:
        source = FileByteSource(target)
        header = await read_header(source)
    elapsed = time.perf_counter() - started
    return {
        "source": target.split("?", 1)[0],
        "gguf": header.info().model_dump(by_alias=True, exclude_none=True),
        "version": header.version,
        "tensorCount": header.tensor_count,
        "headerBytes": header.header_size,
        "bytesFetched": source.bytes_fetched,
        "requests": requests,
        "elapsedSeconds": round(elapsed, 4),
        "metadata": summary(header),
    }


def _cmd_inspect(args: Any) -> int:
    import json
    import os
    import sys

    # Same secret sources as `fetch`: a token for gated hub files, extra headers for private HTTP servers.
    headers = {
        key[len("LLAMA_FETCH_HEADER_") :].replace("_", "-"): value
        for key, value in os.environ.items()
        if key.startswith("LLAMA_FETCH_HEADER_") and len(key) > len("LLAMA_FETCH_HEADER_")
    }
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    try:
        result = asyncio.run(inspect(args.target, headers=headers))
    except GgufError as exc:
        print(f"llama-operator inspect: {exc}", file=sys.stderr)
        return 1
    except (HttpStatusError, httpx.HTTPError, OSError) as exc:
        print(f"llama-operator inspect: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not args.metadata:
        result.pop("metadata")
    if args.fit:
        return _print_fit(args, result)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _print_fit(args: Any, result: dict[str, Any]) -> int:
    import sys

    from .fit import FitSettings, estimate, table

    info = GgufInfo.model_validate(result["gguf"])
    if info.memory is None:
        print("llama-operator inspect: the header lacks the architecture or block count: no estimate",
              file=sys.stderr)
        return 1
    gpu_layers: int | str | None = args.gpu_layers
    if isinstance(gpu_layers, str) and gpu_layers.isdigit():
        gpu_layers = int(gpu_layers)
    settings = FitSettings(
        context_size=args.ctx_size,
        parallel=args.parallel,
        kv_unified=args.kv_unified,
        cache_type_k=args.cache_type_k,
        cache_type_v=args.cache_type_v,
        flash_attention=args.flash_attn,
        batch_size=args.batch_size,
        ubatch_size=args.ubatch_size,
        gpu_count=args.gpus,
        gpu_layers=gpu_layers,  # type: ignore[arg-type]
        tensor_split=[float(x) for x in args.tensor_split.split(",")] if args.tensor_split else None,
        embedding=args.embedding,
        cache_ram_mib=args.cache_ram,
    )
    try:
        fit = estimate(info.memory, settings, trained_context=info.context_length)
    except ValueError as exc:
        print(f"llama-operator inspect: {exc}", file=sys.stderr)
        return 1
    shape = info.memory
    print(f"{result['source']}: {info.architecture} {info.size_label or ''} {info.file_type or ''}, "
          f"{shape.layers} layers ({shape.attention_layers} full attention, {shape.sliding_window_layers} "
          f"sliding window, {shape.recurrent_layers} recurrent), trained context {info.context_length}")
    print(table(fit))
    return 0


def register(sub: Any) -> None:
    """Add the `inspect` subcommand to the llama-operator command line."""
    import argparse

    parser = sub.add_parser(
        "inspect",
        help="print a GGUF file's header (architecture, quantization, parameters) as JSON",
        description="Read only the GGUF header of a local file or an http(s) URL (range requests) and print it as "
        "JSON, with the bytes fetched and the time taken. HF_TOKEN / LLAMA_FETCH_HEADER_<Name> env vars "
        "authenticate.",
    )
    parser.add_argument("target", help="path or http(s) URL of a .gguf file")
    parser.add_argument("--metadata", action="store_true", help="also print every scalar metadata key")
    fit = parser.add_argument_group(
        "memory fit", "--fit prints the memory llama-server needs per device instead of JSON; the other options "
        "are the llama-server settings it assumes (llama-server's defaults when omitted)")
    fit.add_argument("--fit", action="store_true", help="print the memory estimate (docs/memory-fit.md)")
    fit.add_argument("-c", "--ctx-size", type=int, help="total context across slots (default: trained context)")
    fit.add_argument("-np", "--parallel", type=int, help="slots (default: auto = 4 with a unified KV cache)")
    fit.add_argument("--kv-unified", action=argparse.BooleanOptionalAction, default=None,
                     help="one KV stream shared by the slots (default: only when --parallel is not given)")
    kv_types = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
    fit.add_argument("-ctk", "--cache-type-k", default="f16", choices=kv_types, help="K cache type (f16)")
    fit.add_argument("-ctv", "--cache-type-v", default="f16", choices=kv_types, help="V cache type (f16)")
    fit.add_argument("-fa", "--flash-attn", default="auto", choices=["auto", "on", "off"], help="(auto)")
    fit.add_argument("-b", "--batch-size", type=int, help="logical batch (2048)")
    fit.add_argument("-ub", "--ubatch-size", type=int, help="physical batch (512)")
    fit.add_argument("--gpus", type=int, default=0, help="GPUs per replica (0: CPU only)")
    fit.add_argument("-ngl", "--gpu-layers", default=None, help="layers on the GPUs: a number, auto or all (all)")
    fit.add_argument("-ts", "--tensor-split", help="share per GPU, e.g. 3,1")
    fit.add_argument("--embedding", action="store_true", help="embedding/rerank mode (one output per token)")
    fit.add_argument("--cache-ram", type=int, default=8192, help="prompt cache limit in MiB (8192)")
    parser.set_defaults(func=_cmd_inspect)
