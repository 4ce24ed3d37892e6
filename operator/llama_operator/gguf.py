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

GGUF_MAGIC = b"GGUF"

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

# Small integer arrays of these keys are materialised (per-layer head counts); every other array is skipped.
_WANTED_ARRAY_SUFFIXES = (".attention.head_count", ".attention.head_count_kv")
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


_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 10


def same_origin(a: str, b: str) -> bool:
    pa, pb = httpx.URL(a), httpx.URL(b)
    return (pa.scheme, pa.host, pa.port) == (pb.scheme, pb.host, pb.port)


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
    for _ in range(_MAX_REDIRECTS + 1):
        send_headers = {**(headers if same_origin(url, current) else {}), **(extra or {})}
        request = client.build_request(method, current, headers=send_headers)
        response = await client.send(request, stream=True, follow_redirects=False)
        location = response.headers.get("location")
        if response.status_code not in _REDIRECTS or not location:
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

    def info(self, parameter_count: int | None = None) -> GgufInfo:
        """The GgufInfo for status; `parameter_count` overrides this file's own count (split models)."""
        name = self.metadata.get("general.name")
        size_label = self.metadata.get("general.size_label")
        return GgufInfo(
            architecture=self.architecture,
            name=name if isinstance(name, str) else None,
            size_label=size_label if isinstance(size_label, str) else None,
            file_type=self.file_type,
            parameter_count=self.tensors.parameter_count if parameter_count is None else parameter_count,
            context_length=self._arch_int("context_length"),
            block_count=self._arch_int("block_count"),
            embedding_length=self._arch_int("embedding_length"),
            head_count=self._arch_int("attention.head_count"),
            head_count_kv=self._arch_int("attention.head_count_kv"),
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
        await cur.string()  # tensor name
        n_dims = await cur.unpack("<I", 4)
        if n_dims > _MAX_DIMS:
            raise GgufFormatError(f"tensor with {n_dims} dimensions: corrupt header")
        dims = struct.unpack(f"<{n_dims}Q", await cur.take(8 * n_dims))
        ggml_type = await cur.unpack("<I", 4)
        cur.skip(8)  # data offset
        elements = math.prod(dims)
        tensors.parameter_count += elements
        tensors.elements_by_type[ggml_type] = tensors.elements_by_type.get(ggml_type, 0) + elements
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
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def register(sub: Any) -> None:
    """Add the `inspect` subcommand to the llama-operator command line."""
    parser = sub.add_parser(
        "inspect",
        help="print a GGUF file's header (architecture, quantization, parameters) as JSON",
        description="Read only the GGUF header of a local file or an http(s) URL (range requests) and print it as "
        "JSON, with the bytes fetched and the time taken. HF_TOKEN / LLAMA_FETCH_HEADER_<Name> env vars "
        "authenticate.",
    )
    parser.add_argument("target", help="path or http(s) URL of a .gguf file")
    parser.add_argument("--metadata", action="store_true", help="also print every scalar metadata key")
    parser.set_defaults(func=_cmd_inspect)
