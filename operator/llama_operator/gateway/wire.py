"""HTTP/1.1 on the wire, for the fast lane (fastlane.py): a strict parse of a message head, where a response body
ends, and keep-alive connections to the replicas.

Strict means: anything this parse does not accept is not an error here but "not for the fast lane", and the
caller leaves the request to aiohttp, which parses it again with its own rules (and refuses what is invalid).
So a request with Transfer-Encoding, obsolete line folding, a second Content-Length, a query string or a
non-token header name never takes the fast lane; nothing here decides what is valid HTTP.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

MAX_HEAD = 16 << 10
"""A head longer than this is left to aiohttp (its own limit: lines and fields of 8190 bytes, 128 fields)."""
IDLE_SECONDS = 4.0
"""A pooled connection is closed after this long unused: llama-server (cpp-httplib) drops idle ones after 5 s."""

_FIELDS = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*+)*+\Z")
"""The field lines after the first line: a token, a colon, a value without CR, LF or NUL."""


def reading(names: Iterable[str]) -> re.Pattern[bytes]:
    """What `parse_head` takes to read the fields `names` (any case) and skip the others without a Python step."""
    alternatives = b"|".join(re.escape(name.encode()) for name in sorted(names))
    return re.compile(rb"\r\n(" + alternatives + rb"):[ \t]*+([^\r]*+)", re.IGNORECASE)


_ANSWER_FIELDS = reading({"content-length", "transfer-encoding", "connection"})
REQUEST_LINE = re.compile(rb"POST ((?:/[A-Za-z0-9_-][A-Za-z0-9_.-]*+)++) HTTP/1\.1\Z")
"""The requests the fast lane takes: POST to a plain path, HTTP/1.1. Plain: no query, no escapes, and no segment
that is empty or starts with a dot, so never `/v1/../slots`, which a replica may read as `/slots` (the gateway
forwards an allow-list of paths, proxy.NATIVE_PATHS)."""
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")


@dataclass
class Head:
    """A message head: its first line's match, the head itself (without its blank line) and the values of the
    fields its reader asked for (`reading`), by lowercase name."""

    first: re.Match[bytes]
    raw: bytes
    by_name: dict[bytes, list[bytes]]

    def values(self, name: bytes) -> list[bytes]:
        return self.by_name.get(name, [])

    def one(self, name: bytes) -> bytes | None:
        """The field's value when it appears once; None when absent or repeated."""
        found = self.by_name.get(name)
        return found[0] if found is not None and len(found) == 1 else None

    def fields_without(self, dropped: re.Pattern[bytes]) -> bytes:
        """The field lines, each after its CRLF, but those `dropped` matches."""
        return dropped.sub(b"", self.raw[self.raw.find(b"\r\n"):]) if b"\r\n" in self.raw else b""


def dropping(names: Iterable[str]) -> re.Pattern[bytes]:
    """What `Head.fields_without` takes to leave out the fields `names` (any case)."""
    alternatives = b"|".join(re.escape(name.encode()) for name in sorted(names))
    return re.compile(rb"\r\n(?:" + alternatives + rb"):[^\r\n]*+", re.IGNORECASE)


def parse_head(raw: bytes, first_line: re.Pattern[bytes], fields: re.Pattern[bytes]) -> Head | None:
    """The head `raw` (without its closing blank line), with the values of the `fields` (from `reading`); None
    unless every line is plain."""
    line_end = raw.find(b"\r\n")
    first = first_line.match(raw, 0, line_end if line_end >= 0 else len(raw))
    if first is None:
        return None
    by_name: dict[bytes, list[bytes]] = {}
    if line_end >= 0:
        if _FIELDS.match(raw, line_end) is None:
            return None
        for name, value in fields.findall(raw, line_end):
            by_name.setdefault(name.lower(), []).append(value.rstrip(b" \t"))
    return Head(first, raw, by_name)


class BodyEnd:
    """Finds where a response body ends: after `length` bytes, or after a chunked body's last chunk and trailers
    (the framing is passed on unchanged, so only its end is tracked), or at the close (`length` None, not chunked)."""

    def __init__(self, length: int | None, chunked: bool) -> None:
        self.left = length if length is not None else -1
        self.chunked = chunked
        self.done = length == 0 and not chunked
        self._line = b""
        self._state = "size" if chunked else "raw"

    def feed(self, data: bytes) -> int:
        """How many bytes of `data` belong to the body (the rest is the next message's); sets `done`; ValueError
        for a chunked framing it cannot read."""
        if self._state == "raw":
            if self.left < 0:
                return len(data)
            taken = min(self.left, len(data))
            self.left -= taken
            self.done = self.left == 0
            return taken
        at = 0
        while at < len(data) and not self.done:
            if self._state == "data":
                taken = min(self.left, len(data) - at)
                at += taken
                self.left -= taken
                if self.left == 0:
                    self._state, self._line = "crlf", b""
                continue
            end = data.find(b"\n", at)
            self._line += data[at:] if end < 0 else data[at:end + 1]
            if len(self._line) > 4096:
                raise ValueError("a chunk line over 4096 bytes")
            if end < 0:
                return len(data)
            at = end + 1
            line, self._line = self._line.rstrip(b"\r\n"), b""
            if self._state == "crlf":
                if line:
                    raise ValueError("no CRLF after a chunk")
                self._state = "size"
            elif self._state == "size":
                size = line.split(b";", 1)[0].strip()
                if not _HEX.match(size):
                    raise ValueError("a chunk size that is not hexadecimal")
                self.left = int(size, 16)
                self._state = "data" if self.left else "trailer"
            elif not line:  # the blank line after the trailers
                self.done = True
        return at


@dataclass
class Answer:
    """A response head as it came: status, reason, fields; `keep_alive` whether the connection may be reused."""

    status: int
    reason: bytes
    head: Head
    keep_alive: bool


class Replica(asyncio.Protocol):
    """One keep-alive connection to a replica, carrying one exchange at a time. The exchange (`on_answer`,
    `on_body`, `on_end`, `on_fail`) is the fast lane's client connection."""

    def __init__(self, url: str, pool: Pool) -> None:
        self.url = url
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self._buffer = b""
        self._answer: Answer | None = None
        self._end: BodyEnd | None = None
        self.idle_since = 0.0
        """When it went back to the pool (Pool.sweep closes it IDLE_SECONDS later)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses

    def send(self, exchange: Exchange, data: bytes) -> None:
        assert self.transport is not None
        self.exchange, self._buffer, self._answer, self._end = exchange, b"", None, None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for: the connection is not reusable
            self.close()
            return
        if self._answer is None:
            self._buffer += data
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD:
                    self._fail("an answer head over 16 KiB")
                return
            answer = self._parse(self._buffer[:end])
            if answer is None:
                return
            data, self._buffer = self._buffer[end + 4:], b""
        else:
            answer = None
        assert self._end is not None
        try:
            taken = self._end.feed(data)
        except ValueError as exc:
            self._fail(str(exc))
            return
        if answer is not None:
            exchange.on_answer(answer, data[:taken])
        elif taken:
            exchange.on_body(data[:taken])
        if self._end.done and self.exchange is exchange:
            self.exchange = None
            reusable = self._answer is not None and self._answer.keep_alive and taken == len(data)
            exchange.on_end()
            self.pool.release(self) if reusable else self.close()

    def _parse(self, raw: bytes) -> Answer | None:
        head = parse_head(raw, _STATUS_LINE, _ANSWER_FIELDS)
        lengths = head.values(b"content-length") if head else []
        codings = b",".join(head.values(b"transfer-encoding")).lower() if head else b""
        if head is None or len(lengths) > 1 or (lengths and not lengths[0].isdigit()) or codings not in (
                b"", b"chunked"):
            self._fail("an answer head the fast lane does not read")
            return None
        status = int(head.first.group(1))
        chunked = codings == b"chunked"
        length = None if chunked else int(lengths[0]) if lengths else (0 if status in (204, 304) else None)
        close = any(b"close" in v.lower() for v in head.values(b"connection")) or raw.startswith(b"HTTP/1.0")
        self._answer = Answer(status, head.first.group(2) or b"", head, not close and (chunked or length is not None))
        self._end = BodyEnd(length, chunked)
        return self._answer

    def _fail(self, why: str) -> None:
        exchange, self.exchange = self.exchange, None
        self.close()
        if exchange is not None:
            exchange.on_fail(why, answered=self._answer is not None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        if self.exchange is not None:
            if self._end is not None and self._answer is not None and self._end.left < 0 and not self._end.chunked:
                exchange, self.exchange = self.exchange, None  # a body that ends at the close: it ended
                exchange.on_end()
            else:
                self._fail(f"the replica closed the connection ({exc or 'EOF'})")

    def abandon(self) -> None:
        """The exchange wants no more of this answer: the connection goes (closing it stops the replica's work)."""
        self.exchange = None
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Exchange:
    """What a replica connection reports to (fastlane.Connection)."""

    def on_answer(self, answer: Answer, body: bytes) -> None: ...
    def on_body(self, body: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_fail(self, why: str, *, answered: bool) -> None: ...


class Pool:
    """Idle keep-alive connections per replica URL (`http://host:port`)."""

    def __init__(self, connect_timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.connect_timeout = connect_timeout
        self.loop = loop
        self._idle: dict[str, list[Replica]] = {}
        self._all: set[Replica] = set()

    def take(self, url: str) -> Replica | None:
        idle = self._idle.get(url)
        while idle:
            replica = idle.pop()
            if replica.transport is not None and not replica.transport.is_closing():
                return replica
        return None

    async def connect(self, url: str) -> Replica:
        host, _, port = url.removeprefix("http://").rpartition(":")
        factory: Callable[[], Replica] = lambda: Replica(url, self)  # noqa: E731 - one line
        _, replica = await asyncio.wait_for(self.loop.create_connection(factory, host.strip("[]"), int(port)),
                                            self.connect_timeout)
        self._all.add(replica)
        return replica

    def release(self, replica: Replica) -> None:
        replica.idle_since = self.loop.time()
        self._idle.setdefault(replica.url, []).append(replica)

    def sweep(self, now: float) -> None:
        """Close the connections idle for IDLE_SECONDS (the oldest are first in each list)."""
        for idle in self._idle.values():
            while idle and idle[0].idle_since + IDLE_SECONDS <= now:
                idle.pop(0).close()

    def forget(self, replica: Replica) -> None:
        self._all.discard(replica)
        idle = self._idle.get(replica.url)
        if idle and replica in idle:
            idle.remove(replica)

    def close(self) -> None:
        for replica in list(self._all):
            replica.close()
