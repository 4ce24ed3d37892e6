"""The gateway under hostile clients, on 127.0.0.1: big, deep, odd and slow requests, too many connections,
browsers (415, CORS), and what a 502 says. Each of these was a 500, a hang or unbounded memory before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from llama_operator.gateway.app import Gateway, GatewayConfig
from llama_operator.gateway.body import BodyBudget
from llama_operator.gateway.proxy import INLINE_SCAN_BYTES, SCAN_THREADS
from tests.unit.test_gateway_proxy import Harness, Upstream, _free_port


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    made = Upstream()
    await made.start()
    yield made
    made.go.set()
    assert made.runner is not None
    await made.runner.cleanup()


@pytest.fixture
async def gateway(upstream: Upstream, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    """`llama-operator gateway --upstream qwen=<upstream>` in this process, with the test's settings."""
    settings = getattr(request, "param", {})
    made = Gateway(GatewayConfig(listen="127.0.0.1:0", admin="127.0.0.1:0", static={"qwen": [upstream.url]},
                                 autoscale=False, **settings), None)
    await made.start()
    yield made
    await made.stop()


async def _post_raw(gw: Harness, data: bytes, content_type: str | None = "application/json"
                    ) -> tuple[int, dict[str, object]]:
    assert gw.client is not None
    headers = {"Content-Type": content_type} if content_type else {}
    async with gw.client.post(f"{gw.url}/v1/chat/completions", data=data, headers=headers,
                              skip_auto_headers=() if content_type else ("Content-Type",)) as response:
        return response.status, await response.json()


# ------------------------------------------------------------------------------------------ bodies


async def test_deep_json_is_a_400_not_a_500(gw: Harness, upstreams: list[Upstream]) -> None:
    gw.server("chat")
    gw.slices("chat", upstreams[:1])
    status, answer = await _post_raw(gw, b'{"model": "qwen", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}")
    assert status == 400, answer
    assert answer["error"]["message"] == "The request body is nested more than 128 levels deep."  # type: ignore[index]
    assert not upstreams[0].requests


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "text", "text": {"nested": "object"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 7}]}],
    {"role": "user", "content": "not a list"},
    [{"role": "user", "content": 42}],
])
async def test_odd_messages_are_a_400_under_prefix_affinity(gw: Harness, upstreams: list[Upstream],
                                                            messages: object) -> None:
    gw.server("chat", routing={"strategy": "PrefixAffinity"})
    gw.slices("chat", upstreams)
    status, answer = await _post_raw(gw, json.dumps({"model": "qwen", "messages": messages}).encode())
    assert status == 400, answer
    error = answer["error"]
    assert error["code"] == "invalid_messages" and "messages" in error["message"]  # type: ignore[index]
    assert not upstreams[0].requests and not upstreams[1].requests


@pytest.mark.parametrize(("content_type", "sent"), [("text/plain", "'text/plain'"),
                                                    ("application/x-www-form-urlencoded", "'application/x-www"),
                                                    (None, "no Content-Type")])
async def test_only_json_bodies_are_read(gw: Harness, upstreams: list[Upstream], content_type: str | None,
                                         sent: str) -> None:
    gw.server("chat")
    gw.slices("chat", upstreams[:1])
    status, answer = await _post_raw(gw, b'{"model": "qwen", "messages": []}', content_type)
    assert status == 415 and sent in answer["error"]["message"]  # type: ignore[index]
    assert not upstreams[0].requests
    status, _ = await _post_raw(gw, b'{"model": "qwen", "messages": []}', "application/json; charset=utf-8")
    assert status == 200


async def test_a_chunked_body_is_cut_at_the_size_limit(gw: Harness, upstreams: list[Upstream]) -> None:
    gw.server("chat")
    gw.slices("chat", upstreams[:1])

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "qwen", "x": "'
        for _ in range(100):  # no Content-Length: the gateway counts as it reads (its limit is 4096 bytes)
            yield b"a" * 1000
        yield b'"}'

    assert gw.client is not None
    async with gw.client.post(f"{gw.url}/v1/chat/completions", data=chunks(),
                              headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    assert not upstreams[0].requests


async def test_a_502_names_the_server_not_pod_addresses(gw: Harness) -> None:
    gw.server("chat")
    ports = [_free_port(), _free_port()]
    gw.slices("chat", ports)
    async with await gw.post("qwen") as response:
        assert response.status == 502
        message = (await response.json())["error"]["message"]
    assert "LlamaServer default/chat" in message and "(2 tried)" in message
    assert "127.0.0.1" not in message and not any(str(port) in message for port in ports), message


def test_the_body_budget_is_granted_in_arrival_order() -> None:
    async def scenario() -> None:
        budget = BodyBudget(100)
        await budget.reserve(60)
        big = asyncio.create_task(budget.reserve(50))
        await asyncio.sleep(0)
        small = asyncio.create_task(budget.reserve(10))  # would fit, but the big one came first
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        budget.release(60)
        await asyncio.gather(big, small)
        assert budget.used == 60
        late = asyncio.create_task(budget.reserve(80))
        await asyncio.sleep(0)
        late.cancel()  # a client that gave up while waiting leaves no reservation behind
        with pytest.raises(asyncio.CancelledError):
            await late
        budget.release(50)
        budget.release(10)
        assert budget.used == 0

    asyncio.run(scenario())


async def test_a_scan_whose_client_left_keeps_its_slot_until_its_thread_ends(gw: Harness) -> None:
    big = bytearray(INLINE_SCAN_BYTES + 1)

    def slow(data: bytearray) -> str:
        time.sleep(0.5)
        return "slow"

    started = time.monotonic()
    left = [asyncio.create_task(gw.proxy._off_loop(slow, big)) for _ in range(SCAN_THREADS)]
    await asyncio.sleep(0.1)
    for task in left:
        task.cancel()  # the clients went away; their threads go on
    assert await gw.proxy._off_loop(lambda data: "next", big) == "next"
    assert time.monotonic() - started >= 0.45, "a new scan started beside threads still running"
    await asyncio.gather(*left, return_exceptions=True)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.fixture
async def sink() -> AsyncIterator[tuple[str, list[int]]]:
    """A replica that reads any body, records its size and answers a small JSON."""
    sizes: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        sizes.append(size)
        return web.json_response({"received": size})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site.port}", sizes
    await runner.cleanup()


def _start_gateway(port: int, admin: int, upstream: str, args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "llama_operator.cli", "gateway", "--listen", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}", "--upstream", f"qwen={upstream}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("budget", [None, 64 << 20], ids=["default-budget", "64MiB-budget"])
async def test_eight_bodies_of_30_mib_stay_within_the_body_budget(sink: tuple[str, list[int]],
                                                                   budget: int | None) -> None:
    """The gateway as a process of its own (its peak RSS is what is measured)."""
    port, admin = _free_port(), _free_port()
    args = ["--max-buffered-bytes", str(budget)] if budget else []
    child = await asyncio.to_thread(_start_gateway, port, admin, sink[0], args)
    head = b'{"model": "qwen", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "'
    body = head + b"A" * (30 << 20) + b'"}}]}]}'
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{admin}/readyz") as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(0.1)
            before = _status_kib(child.pid, "VmRSS")

            async def post() -> int:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    return response.status

            assert await asyncio.gather(*(post() for _ in range(8))) == [200] * 8
        growth_mib = (_status_kib(child.pid, "VmHWM") - before) / 1024
    finally:
        child.terminate()
        child.wait(10)
    budget_mib = (budget or GatewayConfig().max_buffered_bytes) / (1 << 20)
    # Before: every body read whole, copied and parsed on the event loop: 563-669 MiB here.
    assert growth_mib < budget_mib + 32, f"the gateway grew by {growth_mib:.0f} MiB"
    assert sink[1] == [len(body)] * 8


# ------------------------------------------------------------------------------------------ slow clients, many


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> tuple[bytes, float]:
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), seconds)
    return data, time.monotonic() - started


@pytest.mark.parametrize("gateway", [{"header_timeout": 1.0}], indirect=True)
async def test_headers_sent_one_byte_at_a_time_are_cut_at_the_deadline(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

    async def drip() -> None:
        try:
            while True:
                writer.write(b"X")
                await writer.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass

    dripping = asyncio.create_task(drip())
    try:
        _, took = await _closed_within(reader, 5)  # before: still open after 60 s
    finally:
        dripping.cancel()
        writer.close()
    assert took < 3


@pytest.mark.parametrize("gateway", [{"body_timeout": 1.0}], indirect=True)
async def test_a_body_sent_too_slowly_is_a_408_and_a_close(gateway: Gateway, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")
    data, took = await _closed_within(reader, 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 1s" in data and took < 3
    assert not upstream.requests


@pytest.mark.parametrize("gateway", [{"max_connections": 2}], indirect=True)
async def test_connections_past_the_cap_are_answered_503_and_closed(gateway: Gateway) -> None:
    held = [await asyncio.open_connection("127.0.0.1", gateway.api_port) for _ in range(2)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    data, _ = await _closed_within(reader, 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in data
    held[0][1].close()
    await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{gateway.api_port}/health") as response:
        assert response.status == 200  # room again
    held[1][1].close()


# ------------------------------------------------------------------------------------------ browsers


async def test_no_cors_headers_by_default(gateway: Gateway) -> None:
    url = f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.options(url, headers={"Origin": "https://evil.example",
                                                 "Access-Control-Request-Method": "POST"}) as response:
            assert response.status == 404
            assert not [h for h in response.headers if h.lower().startswith("access-control-")]
        async with session.post(url, json={"model": "qwen", "messages": []},
                                headers={"Origin": "https://evil.example"}) as response:
            assert response.status == 200
            assert not [h for h in response.headers if h.lower().startswith("access-control-")]


@pytest.mark.parametrize("gateway", [{"cors_origins": ("https://app.example",)}], indirect=True)
async def test_cors_answers_only_configured_origins(gateway: Gateway, upstream: Upstream) -> None:
    url = f"http://127.0.0.1:{gateway.api_port}/v1/chat/completions"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    async with aiohttp.ClientSession() as session:
        async with session.options(url, headers={"Origin": "https://app.example", **preflight}) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert response.headers["Access-Control-Allow-Headers"] == "authorization"
        async with session.options(url, headers={"Origin": "https://evil.example", **preflight}) as response:
            assert response.status == 404 and "Access-Control-Allow-Origin" not in response.headers
        upstream.mode = "sse"
        upstream.go.set()
        async with session.post(url, json={"model": "qwen", "messages": [], "stream": True},
                                headers={"Origin": "https://app.example"}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"  # streamed too
            await response.read()


@pytest.mark.parametrize("path", [b"/v1/../slots?action=save", b"/v1/%2e%2e/slots", b"/v1/chat/../../models/unload",
                                  b"/v1/./../props"])
async def test_a_path_that_resolves_outside_the_allow_list_is_a_404(gateway: Gateway, upstream: Upstream,
                                                                     path: bytes) -> None:
    """aiohttp's router matched `/v1/{tail}` on the path as sent, and its client resolved the dot segments:
    `POST /v1/../slots?action=save` reached the replica as `POST /slots?action=save` (a slot saved to a file)."""
    body = b'{"model": "qwen"}'
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.api_port)
    writer.write(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 404 ")
    assert not upstream.requests
