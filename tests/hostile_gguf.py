"""Hostile GGUF headers (issue 17) and a local HTTP server that serves them slowly, endlessly or in full.

Each case is a *virtual* file: a function from (offset, size) to bytes, so a header that claims 2^63 keys or
carries eight 64 MiB strings costs nothing on disk and streams forever when its size is `None`.
`CASES` is what `tests/unit/test_gguf_hostile.py` and `benchmarks/hostile_gguf.py` both run.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MAGIC = b"GGUF"
U8, U32, STRING, ARRAY, U64 = 0, 4, 8, 9, 10
MiB = 1024 * 1024


def gguf_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", U32, value)


def kv_u64(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<IQ", U64, value)


def kv_str(key: str, value: str | bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", STRING) + gguf_string(value)


def prefix(kv_count: int, tensor_count: int = 0) -> bytes:
    return MAGIC + struct.pack("<IQQ", 3, tensor_count, kv_count)


def tensor_info(name: str, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


class Virtual:
    """A file given by segments: literal bytes, runs of one byte, or a record generator (maybe endless)."""

    def __init__(self) -> None:
        self._parts: list[tuple[int, int | None, Callable[[int, int], bytes]]] = []  # (start, length, read)
        self._end: int | None = 0

    @property
    def size(self) -> int | None:
        return self._end

    def _add(self, length: int | None, read: Callable[[int, int], bytes]) -> Virtual:
        assert self._end is not None, "nothing can follow an endless segment"
        self._parts.append((self._end, length, read))
        self._end = None if length is None else self._end + length
        return self

    def data(self, data: bytes) -> Virtual:
        return self._add(len(data), lambda off, n: data[off : off + n])

    def fill(self, length: int, byte: bytes = b"a") -> Virtual:
        return self._add(length, lambda off, n: byte * n)

    def records(self, record: Callable[[int], bytes], size: int, count: int | None) -> Virtual:
        """`count` records of `size` bytes each (`None`: forever); record i is `record(i)`."""
        def read(off: int, n: int) -> bytes:
            first, skip = divmod(off, size)
            out = bytearray()
            index = first
            while len(out) < skip + n and (count is None or index < count):
                out += record(index)
                index += 1
            return bytes(out[skip : skip + n])

        return self._add(None if count is None else size * count, read)

    def read(self, offset: int, size: int) -> bytes:
        out = bytearray()
        for start, length, read in self._parts:
            if length is not None and offset >= start + length:
                continue
            if offset + size <= start:
                break
            inner = max(0, offset - start)
            want = offset + size - max(offset, start)
            if length is not None:
                want = min(want, length - inner)
            out += read(inner, want)
        return bytes(out)

    def bytes(self) -> bytes:
        assert self._end is not None
        return self.read(0, self._end)


@dataclass(frozen=True)
class Case:
    name: str
    what: str
    make: Callable[[], Virtual]
    drip: float = 0.0
    """Seconds between bytes of every GET body (0: as fast as possible)."""
    ignore_range: bool = False
    """Answer 200 with the whole (possibly endless) file to every GET."""


def _block_count() -> Virtual:
    return Virtual().data(prefix(2) + kv_str("general.architecture", "llama") + kv_u32("llama.block_count", 30_000_000))


def _long_strings() -> Virtual:
    out = Virtual().data(prefix(8))
    for i in range(8):
        out.data(gguf_string(f"general.s{i}") + struct.pack("<IQ", STRING, 64 * MiB)).fill(64 * MiB)
    return out


def _many_keys() -> Virtual:
    def record(i: int) -> bytes:
        return gguf_string(f"k{i:015d}") + struct.pack("<IB", 0, 1)

    return Virtual().data(prefix(2**63)).records(record, len(record(0)), None)


def _nested_arrays() -> Virtual:
    depth = 100_000
    return (Virtual().data(prefix(1) + gguf_string("general.nested") + struct.pack("<I", ARRAY))
            .records(lambda i: struct.pack("<IQ", ARRAY, 1), 12, depth)
            .data(struct.pack("<IQ", U8, 0)))


def _huge_array() -> Virtual:
    return Virtual().data(prefix(2) + gguf_string("general.big") + struct.pack("<IIQ", ARRAY, U64, 2**61)
                          + kv_str("general.architecture", "llama"))


def _huge_dims() -> Virtual:
    big = 2**64 - 1
    return Virtual().data(prefix(1, tensor_count=3) + kv_str("general.architecture", "llama")
                          + b"".join(tensor_info(f"blk.{i}.w", (big, big, big, big)) for i in range(3)))


def _huge_heads() -> Virtual:
    return Virtual().data(prefix(5) + kv_str("general.architecture", "llama") + kv_u32("llama.block_count", 500)
                          + kv_u64("llama.embedding_length", 2**40) + kv_u64("llama.attention.head_count", 2**40)
                          + kv_u64("llama.context_length", 2**64 - 1))


def _long_name() -> Virtual:
    return Virtual().data(prefix(3) + kv_str("general.architecture", "llama") + kv_u32("llama.block_count", 2)
                          + kv_str("general.name", "n" * 60_000))


def _vocab_forever() -> Virtual:
    start = prefix(1) + gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 2**62)
    return Virtual().data(start).records(lambda i: gguf_string("a"), 9, None)


def _at_the_budget() -> Virtual:
    """As much as the default budget admits: 60 kept strings of 64 KiB, 6.5M vocabulary strings (58 MB walked)
    and 65,536 tensor infos: the worst a header can cost once it is bounded."""
    strings = 6_500_000
    out = Virtual().data(prefix(63, tensor_count=65_536) + kv_str("general.architecture", "llama")
                         + kv_u32("llama.block_count", 512))
    for i in range(60):
        out.data(kv_str(f"general.s{i:02d}", b"s" * (64 * 1024 - 100)))
    out.data(gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, strings))
    out.records(lambda i: gguf_string("a"), 9, strings)
    return out.records(lambda i: tensor_info(f"blk.{i % 512:03d}.w{i // 512:03d}", (4096,), 0, 0), 44, 65_536)


def _dripping() -> Virtual:
    return Virtual().data(prefix(2) + kv_str("general.architecture", "llama") + kv_u32("llama.block_count", 2))


CASES: tuple[Case, ...] = (
    Case("block-count-30M", "102 bytes: llama.block_count = 30,000,000", _block_count),
    Case("long-strings", "eight 64 MiB metadata strings", _long_strings),
    Case("kv-count-2^63", "kv_count = 2^63, distinct keys streamed forever", _many_keys),
    Case("nested-arrays", "arrays nested 100,000 deep", _nested_arrays),
    Case("huge-array", "a uint64 array of 2^61 elements", _huge_array),
    Case("dims-2^64", "three tensors with four dims of 2^64-1", _huge_dims),
    Case("huge-heads", "head_count and embedding_length 2^40, context 2^64-1", _huge_heads),
    Case("long-name", "general.name of 60,000 characters", _long_name),
    Case("endless-vocab", "200 OK, Range ignored, a vocabulary that never ends", _vocab_forever, ignore_range=True),
    Case("at-the-budget", "the most the default budget admits (kept strings, 6.5M tokens, 65,536 tensors)",
         _at_the_budget),
    Case("drip-1-byte-per-s", "a valid small header sent one byte per second", _dripping, drip=1.0),
)
CASE_BY_NAME = {case.name: case for case in CASES}

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def _case(self) -> tuple[Case, Virtual] | None:
        name = self.path.split("?", 1)[0].strip("/").removesuffix(".gguf")
        found = self.server.files.get(_SHARD.sub("", name))  # every shard of a split name is the case itself
        if found is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        return found

    def do_HEAD(self) -> None:  # noqa: N802
        found = self._case()
        if found is None:
            return
        self.send_response(200)
        size = found[1].size
        self.send_header("Content-Length", str(size if size is not None else 2**62))
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        found = self._case()
        if found is None:
            return
        case, virtual = found
        match = _RANGE.fullmatch(self.headers.get("Range", ""))
        start, end = 0, virtual.size
        if match is not None and not case.ignore_range:
            start = int(match.group(1))
            if match.group(2):
                end = int(match.group(2)) + 1 if end is None else min(end, int(match.group(2)) + 1)
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Connection", "close")
        if end is not None:
            self.send_header("Content-Length", str(max(0, end - start)))
        self.end_headers()
        self.close_connection = True
        step = 1 if case.drip else 256 * 1024
        offset = start
        with contextlib.suppress(OSError):
            while end is None or offset < end:
                data = virtual.read(offset, step if end is None else min(step, end - offset))
                if not data:
                    break
                self.wfile.write(data)
                self.wfile.flush()
                offset += len(data)
                if case.drip:
                    time.sleep(case.drip)
                if self.server.stopping:
                    break


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, tuple[Case, Virtual]]
    stopping = False


@contextlib.contextmanager
def serving(cases: tuple[Case, ...] = CASES) -> Iterator[str]:
    """Serve every case at `<base>/<name>.gguf`; yields the base URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.files = {case.name: (case, case.make()) for case in cases}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping = True
        server.shutdown()
        server.server_close()
