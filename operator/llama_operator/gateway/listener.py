"""The OpenAI API's listening socket, guarded: a cap on open client connections and a deadline for headers.

- Headers: aiohttp has one timer per connection, its keep-alive timeout (3630 s by default), armed when the
  connection opens and again after each answer; when it fires and no request has fully arrived, the connection
  is closed. `runner_settings` sets it to the header deadline, so a client must send a request's complete
  headers within that time of connecting (or of its previous answer), and an idle keep-alive connection is
  closed after it too. Header size is aiohttp's: lines and fields up to 8190 bytes, at most 128 headers.
- Connections: `CappedSite` is aiohttp's TCPSite whose protocol factory, once `limit` connections are open
  (aiohttp's and the fast lane's), answers 503 (OpenAI's error format, Retry-After) on the new connection and
  closes it before reading a byte. With a `lane` (fastlane.py) a new connection starts in the fast lane, which
  hands it to aiohttp's handler for any request it does not take.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sized
from typing import Any, Protocol, cast

from aiohttp import web

from . import metrics


def runner_settings(header_timeout: float) -> dict[str, Any]:
    """AppRunner keyword arguments of the API listener."""
    # handler_cancellation: a client that goes away cancels its handler, which closes the upstream.
    return {"handler_cancellation": True, "access_log": None, "keepalive_timeout": header_timeout}


def _busy_answer(limit: int) -> bytes:
    body = json.dumps({"error": {"message": f"The gateway has {limit} open connections, its limit; retry later.",
                                 "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class _Refuse(asyncio.Protocol):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's are not asyncio.WriteTransport subclasses
        writer.write(self.answer)
        writer.close()


class Lane(Protocol):
    """fastlane.Lane, as the listener sees it."""

    connections: Sized

    def connection(self, handler: Callable[[], asyncio.Protocol]) -> asyncio.Protocol: ...


class CappedSite(web.TCPSite):
    """A TCPSite that refuses connections past `limit` open ones."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, limit: int, lane: Lane | None = None
                 ) -> None:
        super().__init__(runner, host, port)
        self.limit = limit
        self.lane = lane
        self._answer = _busy_answer(limit)

    async def start(self) -> None:
        # TCPSite.start (aiohttp 3.14) with a protocol factory that counts first.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) + (len(self.lane.connections) if self.lane else 0) >= self.limit:
                metrics.CONNECTIONS_REFUSED.inc()
                return _Refuse(self._answer)
            return self.lane.connection(server) if self.lane else server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, backlog=self._backlog)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
