"""The client to the replicas: pick a ready one, send, go to another while none answered, stream the answer back.

- Replicas are the ready endpoints of the route's Service (endpoints.py), minus those that failed in the last
  EJECT_SECONDS while others are left; `pick` balances over them (balancer.py: least in flight, or prefix affinity
  with bounded load).
- A replica that fails before the first response byte reached the client (refused connection, reset, 502/503/
  504) is skipped for EJECT_SECONDS and the request goes to another ready replica; once a byte was sent the
  failure is the client's to see (the connection is cut, never a silently spliced answer). Messages to clients
  name the LlamaServer; replica addresses are only in the log.
- The body goes out byte for byte (body.py: one buffer, in slices); the answer comes back chunk by chunk as it
  arrives (SSE included), never buffered. A client that goes away closes the upstream connection, and
  llama-server stops generating.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web

from . import metrics
from .answers import openai_error
from .balancer import HashRing, bounded_load, least_in_flight, prompt_prefix
from .body import Body
from .endpoints import EndpointTable
from .room import MemoryKeeper, RoomError, auth_headers
from .routing import Route
from .scan import Summary

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
                        "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
RETRY_STATUSES = frozenset({502, 503, 504})
EJECT_SECONDS = 5.0
CLIENT_GONE = web.RequestKey("client_gone", bool)
"""Set on a request whose client went away while its answer was streamed (counted as 499)."""
UPSTREAM_BROKE = web.RequestKey("upstream_broke", bool)
"""Set on a request whose replica broke the stream after the first byte (counted as 502)."""


class Upstreams:
    """The upstream session, requests in flight per replica, and replicas skipped after a failure."""

    def __init__(self, endpoints: EndpointTable, *, connect_timeout: float = 5.0, retry_after: int = 5) -> None:
        self.endpoints = endpoints
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self.in_flight: dict[str, int] = {}
        """Requests in flight per replica URL (what least-in-flight and the load bound compare)."""
        self._ejected: dict[str, float] = {}
        self._rings: dict[tuple[str, ...], HashRing] = {}
        self._turn = 0
        self._session: aiohttp.ClientSession | None = None
        self.memory = MemoryKeeper()
        """Router mode with a memory budget: room made on a replica before a request for a model goes to it."""

    async def open(self) -> None:
        # No total timeout (a generation may take minutes); the connect timeout finds dead replicas fast.
        # auto_decompress=False: bytes go through as the replica sent them, with its Content-Encoding.
        # llama-server (cpp-httplib) drops idle keep-alive connections after 5 s: let them go before that.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        """The client session to the replicas (open between app startup and cleanup)."""
        assert self._session is not None, "the gateway's API app is not started"
        return self._session

    def sent(self, url: str) -> None:
        """A request is in flight to the replica at `url` (proxy.py's path and the fast lane's)."""
        self.in_flight[url] = self.in_flight.get(url, 0) + 1

    def answered(self, url: str) -> None:
        """That request ended, however it ended."""
        self.in_flight[url] -= 1
        if not self.in_flight[url]:
            del self.in_flight[url]

    def candidates(self, route: Route, tried: set[str]) -> list[str]:
        urls = [e.url for e in self.endpoints.ready(*route.service) if e.url not in tried]
        now = time.monotonic()
        healthy = [u for u in urls if self._ejected.get(u, 0) <= now]
        return healthy or urls

    def pick(self, route: Route, candidates: Sequence[str], payload: Mapping[str, Any]) -> str:
        routing = route.routing
        if routing.strategy == "PrefixAffinity" and len(candidates) > 1:
            prefix = prompt_prefix(payload, routing.prefix_characters)
            if prefix is not None:
                ring = self._rings.get(tuple(candidates))
                if ring is None:
                    if len(self._rings) > 256:
                        self._rings.clear()
                    ring = self._rings[tuple(candidates)] = HashRing(candidates)
                return bounded_load(ring, prefix, self.in_flight, routing.load_bound)
        self._turn += 1
        return least_in_flight(candidates, self.in_flight, self._turn)

    def _forward_headers(self, request: web.Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "content-length")}
        peer = request.remote or ""
        previous = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        return headers

    async def forward(self, request: web.Request, route: Route, summary: Summary, affinity: Mapping[str, Any],
                      body: Body, started: float) -> web.StreamResponse:
        """Send to a ready replica, another one while none answered, and stream its answer back."""
        assert self._session is not None
        key = route.key
        headers = self._forward_headers(request)
        headers["Content-Length"] = str(len(body.data))
        if summary.stream:
            # llama-server closes the connection after a streamed answer without saying so: never pool it.
            headers["Connection"] = "close"
        tried: set[str] = set()
        last_error = ""
        again: str | None = None
        while True:
            candidates = [again] if again else self.candidates(route, tried)
            if not candidates:
                if not tried:
                    return openai_error(503, f"The model '{route.model_name}' ({key}) has no ready replica; retry "
                                        "later.", type="server_error", code="model_not_ready",
                                        headers={"Retry-After": str(self.retry_after)})
                # Named by the server, never by pod address: the log has the addresses.
                return openai_error(502, f"Every ready replica of LlamaServer {key} ({len(tried)} tried) failed "
                                    f"before answering; the last one: {last_error}.", type="server_error",
                                    code="upstream_error")
            url = again or self.pick(route, candidates, affinity)
            reused_once, again = again is not None, None
            if tried and not reused_once:
                metrics.UPSTREAM_RETRIES.labels(key).inc()
            tried.add(url)
            self.sent(url)
            upstream: aiohttp.ClientResponse | None = None
            # A memory budget, or kept prompt caches (the gateway loads the model and restores its slots).
            budgeted = route.makes_room(summary.model)
            try:
                if budgeted:
                    try:
                        await self.memory.admit(
                            self._session, url, summary.model, route.memory_budget or 0,
                            dict(route.estimates) if route.memory_budget is not None else {},
                            slots=route.keeps_slots, max_loaded=route.max_loaded,
                            auth=auth_headers(request.headers))  # the client's key: the replica's own
                    except RoomError as exc:
                        if exc.status == 401:  # the key the client sent is not the server's
                            return openai_error(401, f"LlamaServer {key}: {exc}.", code="invalid_api_key")
                        if exc.replica_failed:  # like a refused connection: another replica, if there is one
                            last_error = str(exc)
                            self._eject(url, last_error)
                            continue
                        if exc.status == 400:
                            return openai_error(400, f"LlamaServer {key}: {exc}.", code="model_does_not_fit")
                        return openai_error(503, f"LlamaServer {key}: {exc}.", type="server_error",
                                            code="model_not_ready", headers={"Retry-After": str(self.retry_after)})
                try:
                    upstream = await self._session.request(request.method, url + request.path_qs,
                                                           data=body.payload(), headers=headers)
                    # Another ready replica to go to (on a retry of a hung-up connection `candidates` is only
                    # this one, so ask the table again): a 502/503/504 goes there instead of to the client.
                    retry_status = upstream.status in RETRY_STATUSES and bool(self.candidates(route, tried))
                    first = b"" if retry_status else await upstream.content.readany()
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    last_error = type(exc).__name__
                    if not isinstance(exc, aiohttp.ClientConnectorError) and not reused_once:
                        again = url  # a pooled connection the replica had closed: once more, on a new one
                    else:
                        self._eject(url, f"{last_error}: {exc}")
                    continue
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    last_error = type(exc).__name__
                    self._eject(url, f"{last_error}: {exc}")
                    continue
                if retry_status:
                    last_error = f"HTTP {upstream.status}"
                    self._eject(url, last_error)
                    continue
                body.release()  # answered: no retry will need the body again
                return await self._stream(request, upstream, first, key, started)
            finally:
                if budgeted:
                    self.memory.done(url, summary.model)
                self.answered(url)
                if upstream is not None:
                    upstream.close()

    def _eject(self, url: str, why: str) -> None:
        log.warning("replica %s failed before answering, skipped for %gs: %s", url, EJECT_SECONDS, why)
        self._ejected[url] = time.monotonic() + EJECT_SECONDS

    async def _stream(self, request: web.Request, upstream: aiohttp.ClientResponse, first: bytes, key: str,
                      started: float) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in upstream.headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() not in ("date", "server"):
                response.headers.add(name, value)
        try:
            await response.prepare(request)
            if first:
                await response.write(first)
        except ConnectionError:
            request[CLIENT_GONE] = True
            return response
        metrics.TIME_TO_FIRST_BYTE.labels(key).observe(time.monotonic() - started)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Bytes were sent: no retry. Cut the connection, so the client sees a broken stream, not an end.
                log.warning("the stream of %s from its replica broke after the first byte: %s", key, exc)
                request[UPSTREAM_BROKE] = True
                if request.transport is not None:
                    request.transport.abort()
                return response
            if not chunk:
                break
            try:
                await response.write(chunk)
            except ConnectionError:
                request[CLIENT_GONE] = True  # the client went away: closing the upstream stops the generation
                return response
        try:
            await response.write_eof()
        except ConnectionError:  # the client closed after the last chunk, before the stream's end marker
            request[CLIENT_GONE] = True
        return response
