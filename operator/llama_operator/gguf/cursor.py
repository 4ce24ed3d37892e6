"""The parser's view of a byte source: a forward-only, budgeted cursor read from a worker thread.

The parser runs in a thread (parsing a vocabulary is CPU work that must not stall the event loop); its reads
go back to the loop, where the HTTP client lives, through `Bridge`. Closing the bridge (the deadline passed)
cancels the read in flight and makes the next one raise `Cancelled`, so the thread ends promptly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import threading
from typing import Any

from ..errors import NotAGguf, SourceUnreachable
from .byte_sources import ByteSource
from .limits import Budget


class Cancelled(Exception):  # noqa: N818  (a signal to the worker thread, never seen by callers)
    """The header read was abandoned (deadline); the worker thread stops at its next read."""


class Bridge:
    """Blocking reads for the worker thread: a file is read in the thread itself, anything else on the loop."""

    def __init__(self, source: ByteSource, loop: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.loop = loop
        self._lock = threading.Lock()
        self._closed = False
        self._inflight: concurrent.futures.Future[bytes] | None = None

    def read(self, offset: int, size: int, timeout: float | None = None) -> bytes:
        """`size` bytes at `offset`; a read on the loop that takes longer than `timeout` is cancelled and
        raises `TimeoutError`."""
        blocking = getattr(self.source, "read_blocking", None)
        with self._lock:
            if self._closed:
                raise Cancelled
            if blocking is None:
                self._inflight = asyncio.run_coroutine_threadsafe(self.source.read(offset, size), self.loop)
        if blocking is not None:
            return bytes(blocking(offset, size))
        inflight = self._inflight
        assert inflight is not None
        try:
            return inflight.result(timeout)
        except concurrent.futures.CancelledError:
            raise Cancelled from None
        except concurrent.futures.TimeoutError:
            inflight.cancel()
            raise TimeoutError from None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._inflight is not None:
                self._inflight.cancel()


class Cursor:
    """Forward-only reader with a buffer that grows geometrically, charged against a `Budget`.

    Each refill asks for at least `chunk` bytes and doubles `chunk` (up to `budget.max_chunk`), so a header of
    H bytes costs O(log H) requests while a tiny header costs one small request. `skip` past the buffer drops it
    and moves the file position without fetching anything. No read or seek goes past `budget.header_bytes`.
    """

    def __init__(self, bridge: Bridge, budget: Budget, first_chunk: int = 256 * 1024) -> None:
        self.bridge = bridge
        self.budget = budget
        self.name = bridge.source.name
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0  # index into buf
        self.chunk = min(first_chunk, budget.max_chunk)
        self.fetched = 0

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def error(self, problem: str) -> NotAGguf:
        return NotAGguf(f"{self.name}: {problem}")

    def _check_end(self, end: int) -> None:
        if end > self.budget.header_bytes:
            raise self.error(f"the GGUF header runs past {self.budget.header_bytes // (1024 * 1024)} MiB "
                             "(a corrupt length or count)")

    def ensure(self, size: int) -> None:
        available = len(self.buf) - self.pos
        if available >= size:
            return
        if self.bridge.closed:
            raise Cancelled
        end = self.base + len(self.buf)
        self._check_end(self.offset + size)
        want = min(max(size - available, self.chunk), self.budget.header_bytes - end)
        self.chunk = min(self.chunk * 2, self.budget.max_chunk)
        try:
            data = self.bridge.read(end, want, self.budget.read_grace + want / self.budget.min_rate)
        except TimeoutError:
            raise SourceUnreachable(f"{self.name}: the host sends the GGUF header slower than "
                                    f"{self.budget.min_rate // 1024} KiB/s") from None
        self.fetched += len(data)
        if self.fetched > self.budget.fetched_bytes:
            raise self.error(f"the GGUF header needs more than {self.budget.fetched_bytes // (1024 * 1024)} MiB "
                             "of reads")
        # Keep only the unread tail: memory stays bounded by the largest single request.
        self.buf = self.buf[self.pos :] + data
        self.base += self.pos
        self.pos = 0
        if len(self.buf) < size:
            raise self.error(f"header truncated at byte {self.base + len(self.buf)}")

    def take(self, size: int) -> bytes:
        self.ensure(size)
        data = self.buf[self.pos : self.pos + size]
        self.pos += size
        return data

    def unpack(self, fmt: str, size: int) -> Any:
        self.ensure(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def skip(self, size: int) -> None:
        if self.pos + size <= len(self.buf):
            self.pos += size
            return
        self._check_end(self.offset + size)
        self.base = self.base + self.pos + size
        self.buf = b""
        self.pos = 0

    def length(self) -> int:
        return int(self.unpack("<Q", 8))

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings, touching only their length fields (the vocabulary)."""
        unpack_from = struct.unpack_from
        while count:
            limit = self.budget.header_bytes - self.base
            buf = self.buf
            end = len(buf) - 8
            pos = self.pos
            # Hot loop: only the 8-byte length of each string is decoded; a corrupt length ends it at once.
            while count and pos <= end:
                pos += 8 + unpack_from("<Q", buf, pos)[0]
                count -= 1
                if pos > limit:
                    break
            if pos > len(buf):  # the last string runs past the buffer: seek over its remainder
                self.skip(pos - self.pos)
            else:
                self.pos = pos
            if count:
                self.ensure(8)
