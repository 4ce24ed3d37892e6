"""Where source credentials and the operator's own requests go (issue 17): headers only to their origin (a
projector elsewhere, an https -> http redirect), X-Error-* only from the hub, no `..` paths, the egress guard
(loopback, a redirect to loopback, blocked ranges, a DNS answer that changes), and the cap on a download
without a declared size."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llama_operator import contract, fetch
from llama_operator.api.v1beta1 import LlamaModel, LlamaModelSpec
from llama_operator.builders.fetcher import mmproj_fetch_container
from llama_operator.config import Settings, SettingsError
from llama_operator.egress import refusal
from llama_operator.errors import InvalidSource, SourceAddressRefused, SourceForbidden
from llama_operator.fetch import FetchOptions
from llama_operator.fetch.http import hop_headers
from llama_operator.fetch.plan import remote_files
from llama_operator.sandbox.helm import values_from_env
from llama_operator.sources import resolve
from tests.conftest import model_body
from tests.fakehub import write_gguf
from tests.http_recorder import Answer, Recorder, serve_bytes

OPEN = Settings(source_egress_guard=False)  # the recorders listen on 127.0.0.1
GUARDED = Settings()
KEY = {"X-Api-Key": "k3y-of-the-model-host"}


@pytest.fixture
def gguf(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "m.gguf", tensors={"a": (4, 4)}).read_bytes()


@pytest.fixture
def host(gguf: bytes) -> Iterator[Recorder]:
    with Recorder().running() as recorder:
        recorder.routes["/m.gguf"] = serve_bytes(gguf)
        yield recorder


def _http(url: str, **extra: Any) -> LlamaModelSpec:
    return LlamaModelSpec.model_validate({"source": {"http": {"url": url}}, **extra})


def _outbound_address() -> str:
    """This machine's address on its default route (no packet is sent), or skip."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))
        except OSError:
            pytest.skip("no non-loopback IPv4 address")
        address = str(probe.getsockname()[0])
    if address.startswith("127."):
        pytest.skip("no non-loopback IPv4 address")
    return address


# ---------------------------------------------------------------------------------------------- origins


async def test_a_projector_on_another_origin_gets_no_headers(host: Recorder, tmp_path: Path) -> None:
    projector = write_gguf(tmp_path / "p.gguf", arch="clip", tensors={"v": (4,)}).read_bytes()
    with Recorder().running() as elsewhere:
        elsewhere.routes["/mmproj.gguf"] = serve_bytes(projector)
        spec = _http(host.url("/m.gguf"), mmproj={"file": elsewhere.url("/mmproj.gguf"),
                                                  "sha256": hashlib.sha256(projector).hexdigest()})
        resolved = await resolve(spec, settings=OPEN, hf_token=None, headers=dict(KEY))
    assert resolved.mmproj is not None and elsewhere.seen
    assert all("x-api-key" not in seen for seen in elsewhere.headers_seen())
    assert all(seen["x-api-key"] == KEY["X-Api-Key"] for seen in host.headers_seen())
    # ... and its fetcher gets no headersSecretRef env either.
    model = LlamaModel.model_validate(model_body("vision", spec={
        "source": {"http": {"url": host.url("/m.gguf"), "headersSecretRef": {"name": "creds"}}},
        "mmproj": {"file": elsewhere.url("/mmproj.gguf")}}, status={
        "phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}],
        "mmproj": {"name": "mmproj.gguf", "url": elsewhere.url("/mmproj.gguf"), "sha256": "b" * 64}}))
    assert "envFrom" not in mmproj_fetch_container(model, OPEN)
    same = model.model_copy(update={"status": model.status.model_copy(update={"mmproj": model.status.mmproj.model_copy(
        update={"url": host.url("/mmproj.gguf")})})})
    assert "envFrom" in mmproj_fetch_container(same, OPEN)


async def test_an_https_to_http_redirect_of_the_hub_drops_the_token(gguf: bytes) -> None:
    seen: list[tuple[str, str | None]] = []
    resolve_path = "/org/m-GGUF/resolve/main/m.gguf"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.scheme == "https":  # the hub's alias hop, downgraded to http on the same host
            return httpx.Response(302, headers={"Location": f"http://hub.example{resolve_path}"})
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Content-Length": str(len(gguf))})
        return httpx.Response(206, stream=httpx.ByteStream(gguf),
                              headers={"Content-Range": f"bytes 0-{len(gguf) - 1}/{len(gguf)}"})

    spec = LlamaModelSpec.model_validate({"source": {"huggingFace": {"repo": "org/m-GGUF", "file": "m.gguf"}}})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        await resolve(spec, settings=Settings(huggingface_endpoint="https://hub.example"), hf_token="hf_tok3n",
                      headers={}, client=client)
    assert [auth for url, auth in seen if url.startswith("http://")] and all(
        auth is None for url, auth in seen if url.startswith("http://"))
    assert hop_headers({"Authorization": "x"}, "https://h/a", "http://h/a") == {}


# ---------------------------------------------------------------------------------------------- what hosts say


async def test_x_error_message_counts_only_from_the_hub(host: Recorder, tmp_path: Path) -> None:
    hostile = {"X-Error-Code": "GatedRepo", "X-Error-Message": "log in at https://evil.example/hf"}
    host.routes["/denied.gguf"] = lambda seen: Answer(403, hostile)
    host.routes["/org/m-GGUF/resolve/main/denied.gguf"] = lambda seen: Answer(403, hostile)
    with pytest.raises(SourceForbidden) as plain:
        await resolve(_http(host.url("/denied.gguf")), settings=OPEN, hf_token=None, headers={})
    assert "evil.example" not in str(plain.value)
    code, message = _fetch(FetchOptions(cache_dir=tmp_path, cache_key="m-1", url=host.url("/denied.gguf"),
                                        retries=1), tmp_path)
    assert code == contract.EXIT_FORBIDDEN and "evil.example" not in message
    # The hub's own explanation is still shown.
    hub = Settings(source_egress_guard=False, huggingface_endpoint=host.url())
    spec = LlamaModelSpec.model_validate({"source": {"huggingFace": {"repo": "org/m-GGUF", "file": "denied.gguf"}}})
    with pytest.raises(SourceForbidden, match="GatedRepo: log in at https://evil.example/hf"):
        await resolve(spec, settings=hub, hf_token=None, headers={})


async def test_dot_segments_are_refused(host: Recorder, tmp_path: Path) -> None:
    hub = Settings(source_egress_guard=False, huggingface_endpoint=host.url())
    for revision in ("..", "a/../b", "%2e%2e"):
        spec = LlamaModelSpec.model_validate({"source": {"huggingFace": {
            "repo": "org/m-GGUF", "file": "m.gguf", "revision": revision}}})
        with pytest.raises(InvalidSource, match="'.', '..' and empty path components are not allowed"):
            await resolve(spec, settings=hub, hf_token=None, headers={})
    with pytest.raises(InvalidSource):
        await resolve(_http(host.url("/models/..")), settings=OPEN, hf_token=None, headers={})
    with pytest.raises(InvalidSource):
        remote_files(FetchOptions(cache_dir=tmp_path, cache_key="k", url=host.url("/models/..")))
    with pytest.raises(InvalidSource):
        remote_files(FetchOptions(cache_dir=tmp_path, cache_key="k", hf_repo="o/r", hf_file="m.gguf", hf_revision=".."))
    assert host.seen == []


# ---------------------------------------------------------------------------------------------- egress guard


async def test_loopback_is_refused_with_the_guard_on(host: Recorder) -> None:
    for url in (host.url("/m.gguf"), host.url("/m.gguf", host="localhost"), f"http://[::ffff:127.0.0.1]:{host.port}/m"):
        with pytest.raises(SourceAddressRefused, match="loopback"):
            await resolve(_http(url), settings=GUARDED, hf_token=None, headers={})
    assert host.seen == []
    await resolve(_http(host.url("/m.gguf")), settings=OPEN, hf_token=None, headers={})  # switchable


async def test_a_redirect_to_loopback_is_refused(gguf: bytes) -> None:
    address = _outbound_address()
    with Recorder("0.0.0.0").running() as outside:
        outside.routes["/m.gguf"] = serve_bytes(gguf)
        outside.routes["/moved.gguf"] = lambda seen: Answer(302, {"Location": outside.url("/m.gguf", "127.0.0.1")})
        resolved = await resolve(_http(outside.url("/m.gguf", address)), settings=GUARDED, hf_token=None, headers={})
        assert resolved.size == len(gguf)  # a public address is fine
        outside.seen.clear()
        with pytest.raises(SourceAddressRefused, match="127.0.0.1 \\(loopback\\)"):
            await resolve(_http(outside.url("/moved.gguf", address)), settings=GUARDED, hf_token=None, headers={})
        assert [seen.path for seen in outside.seen] == ["/moved.gguf"]
        blocked = Settings(source_blocked_cidrs=Settings.from_env(
            {"LLAMA_OPERATOR_SOURCE_BLOCKED_CIDRS": f"{address}/32, fd00::/8"}).source_blocked_cidrs)
        with pytest.raises(SourceAddressRefused, match="a blocked range"):
            await resolve(_http(outside.url("/m.gguf", address)), settings=blocked, hf_token=None, headers={})


async def test_the_address_connected_to_is_the_one_checked(gguf: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the first lookup (the request hook's) answers a public address, the next one loopback."""
    address = _outbound_address()
    answers = iter([address, "127.0.0.1", "127.0.0.1"])

    async def getaddrinfo(self: Any, host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    with Recorder("0.0.0.0").running() as outside:
        outside.routes["/m.gguf"] = serve_bytes(gguf)
        with pytest.raises(SourceAddressRefused, match="rebind.test resolves to 127.0.0.1"):
            await resolve(_http(f"http://rebind.test:{outside.port}/m.gguf"), settings=GUARDED, hf_token=None,
                          headers={})
        assert outside.seen == []


def test_metadata_and_special_addresses_are_refused() -> None:
    for address in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "0.0.0.0", "::", "fe80::1", "224.0.0.1",
                    "::ffff:169.254.169.254"):
        assert refusal(ipaddress.ip_address(address)) is not None, address
    for address in ("18.154.227.7", "10.1.2.3", "2600:9000::1"):  # public, and private outside blocked ranges
        assert refusal(ipaddress.ip_address(address)) is None, address
    blocked = [ipaddress.ip_network("10.0.0.0/8")]
    assert refusal(ipaddress.ip_address("10.1.2.3"), blocked) == "in 10.0.0.0/8, a blocked range"


def test_the_guard_is_on_by_default_and_ranges_are_checked() -> None:
    with pytest.raises(SettingsError, match="not a CIDR range"):
        Settings.from_env({"LLAMA_OPERATOR_SOURCE_BLOCKED_CIDRS": "10.0.0.0/8,cluster"})
    assert Settings.from_env({}).source_egress_guard is True and Settings().source_egress_guard is True
    values = yaml.safe_load((Path(__file__).parents[2] / "charts/llama-operator/values.yaml").read_text())
    assert values["sourceEgress"] == {"guard": True, "blockedCIDRs": []}
    # The sandbox serves from loopback: it hands the chart guard=false (as a boolean, for the schema).
    assert values_from_env({"LLAMA_OPERATOR_SOURCE_EGRESS_GUARD": "false"}) == {"sourceEgress": {"guard": False}}


# ---------------------------------------------------------------------------------------------- size cap


def _fetch(options: FetchOptions, tmp_path: Path, *, limit: float = 60) -> tuple[int, str]:
    log = tmp_path / "termination-log"
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(fetch.run(options, termination_log=str(log))),
                              daemon=True)
    worker.start()
    worker.join(limit)
    assert result, f"the fetch was still running after {limit}s"
    return result[0], log.read_text() if log.exists() else ""


def test_an_endless_stream_without_a_size_stops_at_the_cap(host: Recorder, tmp_path: Path) -> None:
    def endless() -> Iterator[bytes]:
        yield b"GGUF"
        while True:
            yield bytes(64 * 1024)

    host.routes["/endless.gguf"] = lambda seen: Answer(200, {}, stream=endless)
    cap = 8 * 1024 * 1024
    options = FetchOptions(cache_dir=tmp_path / "cache", cache_key="m-1", url=host.url("/endless.gguf"),
                           max_unknown_size=cap, retries=1)
    code, message = _fetch(options, tmp_path)
    assert code == contract.EXIT_DISK_FULL and message.startswith("TooLarge: endless.gguf: the server declares no size")
    assert not [p for p in (tmp_path / "cache" / "m-1").iterdir() if p.name.startswith("endless")]  # discarded
