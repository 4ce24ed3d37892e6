"""The fast lane: plain requests proxied at the socket, without aiohttp's request and response objects; every
other request goes to aiohttp (proxy.py) on the same connection.

Why: aiohttp's server and client cost about 0.3 ms of CPU per proxied request on these machines, so at 16
concurrent clients of a trivial upstream one event loop added 5 ms p50 (docs/gateway.md#measured). A request
that is plain needs none of that machinery: routing reads its body with the same scan, the same routing table
and the same balancer, and the answer is passed on as the replica framed it.

A connection starts here. A request stays here when all of these hold; otherwise the connection, with every byte
it has sent, is handed to aiohttp's request handler for good (aiohttp then parses, refuses, holds, retries):
- its head is plain (wire.py): POST, HTTP/1.1, a path under /v1/ or one of proxy.NATIVE_PATHS without a query,
  one Content-Length of at most proxy.INLINE_SCAN_BYTES, Content-Type application/json, no Transfer-Encoding,
  Expect, Origin (CORS) or Connection other than keep-alive; its body arrives within SPLIT_WAIT of its head;
- its model routes (scan.py, the routing table) to a LlamaServer with a ready replica, the request is not
  streamed, names no LoRA adapter, is not for a router with a memory budget or kept prompt caches, carries a key
  when the server wants one, and its body's share of the body budget is free at once.
The replica is chosen as proxy.py chooses (Upstreams.candidates and pick: ejected replicas skipped, LeastInFlight
or PrefixAffinity on the same in-flight counts), the request counted in the same metrics and the autoscaler's
traffic. The answer goes back with its own framing (Content-Length, chunked or until the close), hop-by-hop
fields, Date and Server dropped; a client that reads slowly pauses the replica's connection. A replica that
fails before answering (refused, reset, closed, a 502/503/504 while another replica is ready) gets the request
handed to aiohttp as it came, which tries the others; one that fails after the first byte is cut, like
proxy.py does. A client that leaves closes the replica's connection, which stops the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from . import metrics
from .proxy import INLINE_SCAN_BYTES, Proxy, forwarded_path, has_api_key
from .scan import BadBody, Summary, affinity_payload, quick_summary, scan
from .upstream import HOP_BY_HOP, RETRY_STATUSES
from .wire import MAX_HEAD, REQUEST_LINE, Answer, Exchange, Head, Pool, Replica, dropping, parse_head, reading

log = logging.getLogger(__name__)

SPLIT_WAIT = 0.5
"""Seconds a request's head may wait for its body (clients that send them in two writes) before aiohttp takes it."""
SWEEP = 0.25
"""The connections' deadlines are checked this often: one timer for the lane, not two per request (a timer costs
a heap entry and a cancel, and asyncio's loop lookup a getpid call)."""
_NOT_ANSWERED = dropping(HOP_BY_HOP | {"date", "server"})
"""What the client does not get of a replica's answer head (as proxy.py's answers: aiohttp sets its own)."""
_NOT_FORWARDED = dropping(HOP_BY_HOP | {"host", "content-length", "x-forwarded-for", "x-forwarded-proto",
                                        "x-forwarded-host"})
"""What the replica does not get of the client's head (Upstreams._forward_headers: these are set anew)."""
_READ = reading({"content-length", "content-type", "host", "connection", "transfer-encoding", "expect", "origin",
                 "authorization", "x-api-key", "x-forwarded-for"})
"""The request fields the fast lane decides by."""


@dataclass
class Plan:
    """A request the fast lane takes: where it goes and the bytes that go."""

    key: str
    url: str
    request: bytes
    reserved: int
    other_replicas: bool


class Lane:
    """What the fast lane's connections share: the proxy's tables, the replica connections, the open connections."""

    def __init__(self, proxy: Proxy, *, header_timeout: float) -> None:
        """Made on the running event loop (the gateway's start)."""
        self.proxy = proxy
        self.header_timeout = header_timeout
        self.loop = asyncio.get_running_loop()
        self.pool = Pool(proxy.upstreams.connect_timeout, self.loop)
        self._sweeping = self.loop.call_later(SWEEP, self._sweep)
        self.connections: set[Connection] = set()
        self.stopping = False
        self.busy = 0
        """Requests in flight here."""
        self._quiet = asyncio.Event()
        self._counters: dict[tuple[str, str], Any] = {}
        self._timings: dict[str, tuple[Any, Any, Any]] = {}
        self.taken = 0
        """Requests answered here (the rest went to aiohttp)."""

    def connection(self, handler: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """The protocol of a new client connection (`handler` makes aiohttp's)."""
        return handler() if self.stopping else Connection(self, handler)

    def plan(self, head: Head, body: bytes, peer: str) -> Plan | None:
        """Where the request goes, or None when aiohttp is to take it."""
        path = head.first.group(1).decode()
        if not forwarded_path(path):
            return None
        if head.values(b"transfer-encoding") or head.values(b"expect") or head.values(b"origin"):
            return None
        content_type, host = head.one(b"content-type"), head.one(b"host")
        connection = b",".join(head.values(b"connection")).strip().lower()
        if content_type is None or content_type.split(b";")[0].strip().lower() != b"application/json" or \
                host is None or connection not in (b"", b"keep-alive"):
            return None
        quick = quick_summary(body)
        summary: Summary | None = None
        if quick is not None:
            model, stream = quick[0], quick[1]
        else:
            try:
                summary = scan(body)
            except BadBody:
                return None
            model, stream = summary.model, summary.stream
        route = self.proxy.routes.resolve(model).route
        if route is None or stream or route.adapters or route.makes_room(model):  # no adapters: nor adapter(model)
            return None
        if route.api_key_required and not has_api_key(
                {name: b",".join(head.values(name.lower().encode())).decode("latin-1")
                 for name in ("Authorization", "X-Api-Key")}):
            return None
        upstreams = self.proxy.upstreams
        if not self.proxy.endpoints.ready(*route.service):
            return None
        try:
            affinity = (affinity_payload(body, summary or scan(body), route.routing.prefix_characters)
                        if route.routing.strategy == "PrefixAffinity" else {})
        except BadBody:
            return None
        candidates = upstreams.candidates(route, set())
        if not candidates or not self.proxy.bodies.budget.try_reserve(len(body)):
            return None
        url = upstreams.pick(route, candidates, affinity)
        previous = head.one(b"x-forwarded-for")
        forwarded_for = previous + b", " + peer.encode() if previous else peer.encode()
        request = b"".join([
            b"POST ", path.encode(), b" HTTP/1.1\r\nHost: ", url.removeprefix("http://").encode(),
            head.fields_without(_NOT_FORWARDED), b"\r\nX-Forwarded-For: ", forwarded_for,
            b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ", host, b"\r\nContent-Length: ",
            str(len(body)).encode(), b"\r\n\r\n", body])
        return Plan(route.key, url, request, len(body), len(candidates) > 1)

    def series(self, key: str, code: str) -> Any:
        """The request counter of (key, code), its labels() looked up once."""
        found = self._counters.get((key, code))
        if found is None:
            found = self._counters[key, code] = metrics.REQUESTS.labels(key, code)
        return found

    def timings(self, key: str) -> tuple[Any, Any, Any]:
        """(time to first byte, request duration, fast-lane requests) of `key`."""
        found = self._timings.get(key)
        if found is None:
            found = self._timings[key] = (metrics.TIME_TO_FIRST_BYTE.labels(key),
                                          metrics.REQUEST_DURATION.labels(key), metrics.FAST_LANE.labels(key))
        return found

    def _sweep(self) -> None:
        now = self.loop.time()
        for connection in [c for c in self.connections if c.deadline <= now]:
            connection.expire()
        self.pool.sweep(now)
        self._sweeping = self.loop.call_later(SWEEP, self._sweep)

    def quiet(self) -> None:
        self._quiet.set()

    async def drain(self, seconds: float) -> None:
        """Stop taking connections, let the requests in flight finish (at most `seconds`), then close the rest."""
        self.stopping = True
        for connection in list(self.connections):
            if connection.plan is None:
                connection.close()
        if self.busy:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), seconds)
        for connection in list(self.connections):
            connection.close()
        self._sweeping.cancel()
        self.pool.close()


class Connection(asyncio.Protocol, Exchange):
    """One client connection while it is in the fast lane."""

    def __init__(self, lane: Lane, handler: Callable[[], asyncio.Protocol]) -> None:
        self.lane = lane
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.buffer = b""
        self.plan: Plan | None = None
        self.sent = b""
        """The request being answered, as the client sent it (handed to aiohttp if the replica fails first)."""
        self.replica: Replica | None = None
        self.started = 0.0
        self.answered = 0
        self.close_after = False
        self.deadline = float("inf")
        """When `expire` runs (the lane's sweep): the header deadline, or SPLIT_WAIT after a request began."""
        self._then: Callable[[], None] = self.close
        self._splitting = False

    # -- the client's side ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self.lane.connections.add(self)
        self._arm(self.lane.header_timeout, self.close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.plan is None:
            self._next()
        elif len(self.buffer) > MAX_HEAD and self.transport is not None:
            self.transport.pause_reading()  # a pipelining client waits for its answer

    def _next(self) -> None:
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            elif buffer:
                self._wait_for_the_rest()
            return
        head = parse_head(buffer[:end], REQUEST_LINE, _READ)
        length = head.one(b"content-length") if head is not None else None
        if head is None or length is None or not length.isdigit() or int(length) > INLINE_SCAN_BYTES:
            self._hand_over()
            return
        total = end + 4 + int(length)
        if len(buffer) < total:
            self._wait_for_the_rest()
            return
        try:
            plan = self.lane.plan(head, buffer[end + 4:total], self.peer)
        except Exception:  # a bug here must cost the fast lane, not the request
            log.exception("the fast lane failed to plan a request; aiohttp takes it")
            plan = None
        if plan is None:
            self._hand_over()
            return
        self._disarm()
        self.sent, self.buffer, self.plan = buffer[:total], buffer[total:], plan
        self.started = time.monotonic()
        self.lane.proxy.upstreams.sent(plan.url)
        self.lane.proxy.traffic.start(plan.key)
        self.lane.busy += 1
        replica = self.lane.pool.take(plan.url)
        if replica is not None:
            self.replica = replica
            replica.send(self, plan.request)
        else:
            self.lane.loop.create_task(self._connect(plan))

    async def _connect(self, plan: Plan) -> None:
        try:
            replica = await self.lane.pool.connect(plan.url)
        except (OSError, TimeoutError) as exc:
            if self.plan is plan:
                self.on_fail(f"{type(exc).__name__}: {exc}", answered=False)
            return
        if self.plan is not plan:  # the client left meanwhile
            replica.close()
            return
        self.replica = replica
        replica.send(self, plan.request)

    def _hand_over(self) -> None:
        """aiohttp takes the connection with every byte not yet answered."""
        transport = self.transport
        self._disarm()
        self.lane.connections.discard(self)
        if transport is None or transport.is_closing():
            return
        handler = self.handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self.buffer, self.transport = self.buffer, b"", None
        if data:
            handler.data_received(data)
        transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.lane.connections.discard(self)
        self.transport = None
        if self.plan is not None:
            if self.replica is not None:
                self.replica.abandon()  # closing the replica's connection stops the generation
            self._finish("499")

    def pause_writing(self) -> None:
        if self.replica is not None and self.replica.transport is not None:
            self.replica.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.replica is not None and self.replica.transport is not None:
            self.replica.transport.resume_reading()

    # -- the replica's side (wire.Exchange) ----------------------------------------------------------------

    def on_answer(self, answer: Answer, body: bytes) -> None:
        plan = self.plan
        assert plan is not None and self.transport is not None
        if answer.status in RETRY_STATUSES and plan.other_replicas:
            assert self.replica is not None
            self.replica.abandon()
            self.on_fail(f"HTTP {answer.status}", answered=False)
            return
        self.answered = answer.status
        self.lane.proxy.bodies.budget.release(plan.reserved)
        plan.reserved = 0
        lines = [b"HTTP/1.1 %d %s" % (answer.status, answer.reason), answer.head.fields_without(_NOT_ANSWERED)]
        if answer.head.values(b"transfer-encoding"):
            lines.append(b"\r\nTransfer-Encoding: chunked")
        elif not answer.head.values(b"content-length") and answer.status not in (204, 304):
            self.close_after = True  # the body ends when the replica closes: so must this connection
            lines.append(b"\r\nConnection: close")
        lines += [b"\r\n\r\n", body]
        self.transport.write(b"".join(lines))
        self.lane.timings(plan.key)[0].observe(time.monotonic() - self.started)

    def on_body(self, body: bytes) -> None:
        if self.transport is not None:
            self.transport.write(body)

    def on_end(self) -> None:
        self.replica = None
        self._finish(str(self.answered))
        self.lane.taken += 1
        if self.close_after or self.lane.stopping:
            self.close()
        elif self.buffer:
            if self.transport is not None:
                self.transport.resume_reading()
            self.lane.loop.call_soon(self._next)
        else:
            self._arm(self.lane.header_timeout, self.close)

    def on_fail(self, why: str, *, answered: bool) -> None:
        self.replica = None
        if answered:
            plan = self.plan
            log.warning("the answer of %s from its replica broke after the first byte: %s", plan and plan.key, why)
            self._finish("502")
            if self.transport is not None:
                self.transport.abort()
            return
        self._finish(None)  # not answered: aiohttp answers it, and counts it
        self.buffer = self.sent + self.buffer
        self._hand_over()

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def _finish(self, code: str | None) -> None:
        plan, self.plan = self.plan, None
        if plan is None:
            return
        self.lane.proxy.upstreams.answered(plan.url)
        self.lane.proxy.traffic.finish(plan.key)
        self.lane.busy -= 1
        if self.lane.stopping and not self.lane.busy:
            self.lane.quiet()
        if plan.reserved:
            self.lane.proxy.bodies.budget.release(plan.reserved)
        if code is not None:
            self.lane.series(plan.key, code).inc()
            _, duration, fast = self.lane.timings(plan.key)
            duration.observe(time.monotonic() - self.started)
            fast.inc()

    def _wait_for_the_rest(self) -> None:
        """A request has begun: aiohttp takes it SPLIT_WAIT after its first byte (not its last: a client that
        drips must not keep the connection here), and its own header and body deadlines from then on."""
        if not self._splitting:
            self._arm(SPLIT_WAIT, self._hand_over)
            self._splitting = True

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        self._splitting = False
        self.deadline, self._then = self.lane.loop.time() + seconds, then

    def _disarm(self) -> None:
        self._splitting = False
        self.deadline = float("inf")

    def expire(self) -> None:
        then = self._then
        self._disarm()
        then()

    def close(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.close()
