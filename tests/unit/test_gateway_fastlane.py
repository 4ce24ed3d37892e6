"""The fast lane (gateway/fastlane.py, wire.py): plain requests proxied at the socket, everything else handed to
aiohttp on the same connection. Against a real `Gateway` on 127.0.0.1 with static upstreams (stand-in replicas of
tests/unit/test_gateway_proxy.py) and raw sockets where the framing matters: what it takes, what it hands over,
that both give the same answer, and what happens when a replica or a client fails."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from llama_operator.gateway import metrics
from llama_operator.gateway.app import Gateway, GatewayConfig
from llama_operator.gateway.wire import BodyEnd
from tests.unit.test_gateway_proxy import Upstream, _free_port

CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}



async def _gateway(static: dict[str, list[str]], **settings: Any) -> Gateway:
    made = Gateway(GatewayConfig(listen="127.0.0.1:0", admin="127.0.0.1:0", static=static, autoscale=False,
                                 **settings), None)
    await made.start()
    return made


@pytest.fixture
async def gateway(upstreams: list[Upstream]) -> AsyncIterator[Gateway]:
    made = await _gateway({"qwen": [upstreams[0].url]})
    yield made
    await made.stop()


def _taken(gateway: Gateway) -> int:
    assert gateway.lane is not None
    return gateway.lane.taken


async def _exchange(port: int, data: bytes, *, pause: float = 0.0, split: int = 0) -> bytes:
    """Send `data` (in two writes `pause` apart, cut at `split`), read one answer of Content-Length framing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data[:split] if split else data)
        if split:
            await asyncio.sleep(pause)
            writer.write(data[split:])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(
            b"content-length:"))
        return head + await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()


def _request(body: dict[str, Any], *extra: bytes) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n" + b"".join(
        line + b"\r\n" for line in extra) + b"Content-Length: %d\r\n\r\n" % len(data) + data)


async def test_a_plain_request_takes_the_fast_lane_with_the_same_answer_as_aiohttp(upstreams: list[Upstream]
                                                                                  ) -> None:
    answers = []
    for fast in (True, False):
        gateway = await _gateway({"qwen": [upstreams[0].url]}, fast_lane=fast)
        try:
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions", json=CHAT,
                    headers={"X-Forwarded-For": "10.0.0.9", "Authorization": "Bearer k"}) as response:
                answers.append((response.status, response.content_type, await response.json()))
        finally:
            await gateway.stop()
        if fast:
            assert gateway.lane is not None and gateway.lane.taken == 1
    assert answers[0] == answers[1] == (200, "application/json", {"served_by": upstreams[0].port, "echo": CHAT})
    fast_seen, slow_seen = (r["headers"] for r in upstreams[0].requests)
    for name in ("X-Forwarded-For", "X-Forwarded-Proto", "Authorization", "Content-Type", "Content-Length"):
        assert fast_seen.get(name) == slow_seen.get(name), name
    assert fast_seen["X-Forwarded-For"] == "10.0.0.9, 127.0.0.1"
    assert fast_seen["Host"] == slow_seen["Host"] == upstreams[0].url.removeprefix("http://")


async def test_requests_on_one_connection_stay_until_one_is_not_plain(gateway: Gateway,
                                                                      upstreams: list[Upstream]) -> None:
    before = metrics.REQUESTS.labels("static/qwen", "200")._value.get()
    fast_before = metrics.FAST_LANE.labels("static/qwen")._value.get()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        url = f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions"
        for _ in range(5):
            async with session.post(url, json=CHAT) as response:
                assert response.status == 200
        assert _taken(gateway) == 5
        async with session.post(url, json={**CHAT, "model": "nope"}) as response:  # handed over: aiohttp's 404
            assert response.status == 404 and "nope" in (await response.json())["error"]["message"]
        async with session.post(url, json=CHAT) as response:  # the same connection, now aiohttp's
            assert response.status == 200
    assert _taken(gateway) == 5
    assert metrics.REQUESTS.labels("static/qwen", "200")._value.get() - before == 6  # counted alike in both lanes
    assert metrics.FAST_LANE.labels("static/qwen")._value.get() - fast_before == 5


async def test_a_streamed_request_goes_to_aiohttp_and_streams(gateway: Gateway, upstreams: list[Upstream]) -> None:
    upstreams[0].mode = "sse"
    upstreams[0].go.set()
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status == 200 and b"[DONE]" in await response.read()
    assert _taken(gateway) == 0


async def test_a_head_and_body_in_two_writes_stay_in_the_fast_lane(gateway: Gateway) -> None:
    data = _request(CHAT)
    answer = await _exchange(gateway.api_port, data, split=data.index(b"\r\n\r\n") + 4, pause=0.1)
    assert answer.startswith(b"HTTP/1.1 200 ") and _taken(gateway) == 1


@pytest.mark.parametrize("extra", [
    (b"Transfer-Encoding: chunked",),  # and a Content-Length: a smuggling attempt
    (b"Content-Length: 3",),  # a second Content-Length
    (b"X-Folded: a", b" b"),  # obsolete line folding
])
async def test_odd_heads_are_left_to_aiohttp_which_refuses_them(gateway: Gateway, upstreams: list[Upstream],
                                                                extra: tuple[bytes, ...]) -> None:
    answer = await _exchange(gateway.api_port, _request(CHAT, *extra))
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    assert _taken(gateway) == 0 and not upstreams[0].requests


async def test_a_replica_that_refuses_connections_is_answered_by_aiohttp() -> None:
    gateway = await _gateway({"qwen": [f"http://127.0.0.1:{_free_port()}"]}, connect_timeout=1.0)
    try:
        answer = await _exchange(gateway.api_port, _request(CHAT))
    finally:
        await gateway.stop()
    assert answer.startswith(b"HTTP/1.1 502 ") and b"Every ready replica of LlamaServer static/qwen" in answer
    assert b"127.0.0.1" not in answer.split(b"\r\n\r\n", 1)[1]  # no pod address
    assert gateway.lane is not None and gateway.lane.taken == 0


async def test_a_503_goes_to_the_other_replica(upstreams: list[Upstream]) -> None:
    upstreams[0].mode = "status503"
    gateway = await _gateway({"qwen": [upstreams[0].url, upstreams[1].url]})
    try:
        for _ in range(4):
            answer = await _exchange(gateway.api_port, _request(CHAT))
            assert answer.startswith(b"HTTP/1.1 200 ") and str(upstreams[1].port).encode() in answer
    finally:
        await gateway.stop()


async def test_a_chunked_answer_is_passed_on_with_its_framing(gateway: Gateway, upstreams: list[Upstream]) -> None:
    upstreams[0].mode = "sse"  # the stand-in streams whatever was asked: chunked, no Content-Length
    upstreams[0].go.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    for _ in range(2):  # and the connection is reusable after it
        writer.write(_request(CHAT))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Transfer-Encoding: chunked" in head and b"text/event-stream" in head
        end = BodyEnd(None, chunked=True)
        body = b""
        while not end.done:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data
            body += data[:end.feed(data)]
        assert b'data: {"n": 2}' in body
    writer.close()
    assert _taken(gateway) == 2


async def test_a_client_that_leaves_stops_the_replicas_work(gateway: Gateway, upstreams: list[Upstream]) -> None:
    upstreams[0].mode = "slow"  # one chunk, then a minute of nothing
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    writer.write(_request(CHAT))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    await asyncio.wait_for(upstreams[0].cancelled.wait(), 5)


async def test_a_replica_that_breaks_mid_answer_cuts_the_client(gateway: Gateway, upstreams: list[Upstream]) -> None:
    upstreams[0].mode = "break-after-first"
    before = metrics.REQUESTS.labels("static/qwen", "502")._value.get()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    writer.write(_request(CHAT))
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):  # to the end: the gateway cuts it
            data += chunk
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b'data: {"n": 1}' in data
    assert not data.endswith(b"0\r\n\r\n")  # never the end of a chunked body: the client sees it broken
    assert metrics.REQUESTS.labels("static/qwen", "502")._value.get() - before == 1


async def test_a_stop_lets_the_request_in_flight_finish(upstreams: list[Upstream]) -> None:
    upstreams[0].mode = "sse"
    gateway = await _gateway({"qwen": [upstreams[0].url]}, drain_timeout=5.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    writer.write(_request(CHAT))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    stopping = asyncio.create_task(gateway.stop())
    await asyncio.sleep(0.2)
    assert not stopping.done()
    upstreams[0].go.set()
    rest = await asyncio.wait_for(reader.read(), 5)
    await asyncio.wait_for(stopping, 5)
    writer.close()
    assert b"[DONE]" in rest


@pytest.mark.parametrize("path", [b"/v1/../slots", b"/v1/./chat/completions", b"/v1//chat/completions",
                                  b"/v1/chat/completions?x=1", b"/v1/%2e%2e/slots"])
async def test_paths_a_replica_could_read_as_another_are_left_to_aiohttp(gateway: Gateway, upstreams: list[Upstream],
                                                                         path: bytes) -> None:
    data = _request(CHAT).replace(b"/v1/chat/completions", path, 1)
    await _exchange(gateway.api_port, data)
    assert _taken(gateway) == 0
    assert all(r["path"] != "/slots" for r in upstreams[0].requests)  # aiohttp never lets one through either


CHUNKED = b"5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n"


@pytest.mark.parametrize("cut", range(1, len(CHUNKED)))
def test_the_end_of_a_chunked_body_is_found_however_it_arrives(cut: int) -> None:
    end = BodyEnd(None, chunked=True)
    taken = end.feed(CHUNKED[:cut])
    assert taken == cut and not end.done
    assert end.feed(CHUNKED[cut:] + b"HTTP/1.1 200 OK\r\n") == len(CHUNKED) - cut and end.done


def test_lengths_and_bad_framing() -> None:
    end = BodyEnd(5, chunked=False)
    assert (end.feed(b"abc"), end.done, end.feed(b"defg"), end.done) == (3, False, 2, True)
    assert BodyEnd(0, chunked=False).done
    until_close = BodyEnd(None, chunked=False)
    assert until_close.feed(b"x" * 100) == 100 and not until_close.done
    for bad in (b"zz\r\n", b"5\r\nhelloXX\r\n", b"1" * 5000):
        with pytest.raises(ValueError):
            BodyEnd(None, chunked=True).feed(bad)
