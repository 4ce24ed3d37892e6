"""Reading a request body within bounds: its media type, its size, the memory of all bodies together, and time.

- Only `application/json` (parameters such as charset allowed) is read; anything else, a missing Content-Type
  included, is 415 before a byte of the body is read. A page on another origin can then not POST to the gateway
  without a CORS preflight, which is answered only for configured origins (cors.py).
- A Content-Length above `max_bytes` is 413 at once; a chunked body is 413 as soon as it passes `max_bytes`.
- `BodyBudget`: the bytes of request bodies held at once. A request reserves its Content-Length (a chunked one
  `max_bytes`) before it reads, in arrival order; the proxy gives it back as soon as a replica's answer starts
  (a retry before that needs the body again). Memory for bodies is therefore at most the budget, whatever the
  number of clients; a request that cannot reserve within the body deadline is 503 with Retry-After.
- The whole read, waiting for the budget included, must end within `timeout`; a client that sends slower gets
  408 and the connection is closed.
- The body goes into one buffer of its final size, chunk by chunk as aiohttp receives them (aiohttp stops
  reading the socket while 128 KiB wait unread): no copy of the whole body is made here or when it is forwarded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from . import metrics

FORWARD_CHUNK = 1 << 16
"""Bodies up to this size are forwarded as one bytes object; larger ones in slices of it (no copy)."""


class Refused(Exception):
    """The body is not read (or not all of it): answer `status` with this one-line message."""

    def __init__(self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.close = close
        """Close the connection right after answering, without reading the rest of the body (a slow client)."""


class BodyBudget:
    """Bytes of request bodies held at once; reservations are granted in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def reserve(self, size: int) -> None:
        if not self._waiting and self.used + size <= self.limit:
            self.used += size
            metrics.BODY_BYTES.set(self.used)
            return
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():
                self.release(size)  # granted while being cancelled
            elif entry in self._waiting:
                self._waiting.remove(entry)
                self._grant()  # the ones behind it may fit now
            raise

    def try_reserve(self, size: int) -> bool:
        """Reserve `size` now if that needs no wait (nobody waiting ahead, room left): the fast lane's way."""
        if self._waiting or self.used + size > self.limit:
            return False
        self.used += size
        metrics.BODY_BYTES.set(self.used)
        return True

    def release(self, size: int) -> None:
        self.used -= size
        self._grant()
        metrics.BODY_BYTES.set(self.used)

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            size, future = self._waiting.popleft()
            if not future.done():
                self.used += size
                future.set_result(None)


@dataclass
class Body:
    """A request body and its share of the budget, given back by `release` (idempotent)."""

    data: bytearray
    reserved: int = 0
    budget: BodyBudget | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the reservation back and drop the buffer (a stream that lasts minutes must not keep it)."""
        if self.budget is not None and self.reserved:
            self.budget.release(self.reserved)
        self.reserved = 0
        self.data = bytearray()

    def payload(self) -> bytes | AsyncIterator[memoryview]:
        """What the upstream request sends (its Content-Length is len(data))."""
        if len(self.data) <= FORWARD_CHUNK:
            return bytes(self.data)
        return _slices(self.data)


async def _slices(data: bytearray) -> AsyncIterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), FORWARD_CHUNK):
        yield view[start:start + FORWARD_CHUNK]


class BodyReader:
    def __init__(self, *, max_bytes: int, budget: BodyBudget, timeout: float, retry_after: int = 5) -> None:
        self.max_bytes = max_bytes
        self.budget = budget
        self.timeout = timeout
        self.retry_after = retry_after

    def _too_large(self) -> Refused:
        return Refused(413, "request_too_large", f"The request body is larger than this gateway accepts "
                       f"({self.max_bytes} bytes).")

    async def read(self, request: web.BaseRequest) -> Body:
        if request.content_type != "application/json":
            sent = request.headers.get("Content-Type")
            raise Refused(415, "unsupported_media_type", "Request bodies must be JSON: send Content-Type: "
                          f"application/json (got {sent[:100]!r})." if sent else "Request bodies must be JSON: "
                          "send Content-Type: application/json (the request has no Content-Type).")
        length = request.content_length
        if length is not None and length > self.max_bytes:
            raise self._too_large()
        body = Body(bytearray(), budget=self.budget)
        size = length if length is not None else self.max_bytes
        try:
            async with asyncio.timeout(self.timeout):
                await self.budget.reserve(size)
                body.reserved = size
                if length is not None:
                    body.data = bytearray(length)  # only now: the zeroed buffer is resident at once
                received = await self._receive(request, body.data, length)
        except TimeoutError:
            waited_for_budget = not body.reserved
            body.release()
            if waited_for_budget:
                raise Refused(503, "server_busy", "The gateway holds as many request bodies as it may; retry "
                              "later.", headers={"Retry-After": str(self.retry_after)}) from None
            raise Refused(408, "request_timeout", f"The request body did not arrive within {self.timeout:g}s.",
                          close=True) from None
        except BaseException:
            body.release()
            raise
        if length is not None and received != length:
            body.release()
            raise Refused(400, "invalid_json", f"The request body ended after {received} of its {length} bytes.")
        return body

    async def _receive(self, request: web.BaseRequest, data: bytearray, length: int | None) -> int:
        received = 0
        while chunk := await request.content.readany():
            end = received + len(chunk)
            if length is None:
                if end > self.max_bytes:
                    raise self._too_large()
                data += chunk
            elif end <= length:
                data[received:end] = chunk  # the same size: in place
            received = end
        return received
