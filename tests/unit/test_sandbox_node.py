"""The sandbox node's parts that need neither root nor a control plane: chart values from the environment,
image and path mapping, the kubelet's atomic volume writes, Service targets from EndpointSlices, the egress
proxy, and the kubelet's log server (TLS with a client certificate, tail, previous, follow)."""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llama_operator.controlplane.certs import CertificateAuthority
from llama_operator.sandbox.command import expand
from llama_operator.sandbox.helm import values_from_env
from llama_operator.sandbox.images import ImageError, ImageTable, PathMap
from llama_operator.sandbox.logs import KubeletServer
from llama_operator.sandbox.network import EgressProxy, under_run
from llama_operator.sandbox.pod import ContainerStatus
from llama_operator.sandbox.proxy import ServiceProxies
from llama_operator.sandbox.volumes import write_atomic


def test_chart_values_from_operator_settings() -> None:
    values = values_from_env({
        "LLAMA_OPERATOR_HF_ENDPOINT": "http://127.0.0.1:9", "LLAMA_OPERATOR_IMAGE_NVIDIA": "reg/llama:cuda",
        "LLAMA_OPERATOR_RESYNC_SECONDS": "60", "LLAMA_OPERATOR_MODEL_RESYNC_SECONDS": "30",
        "LLAMA_OPERATOR_WEBHOOK_PORT": "1", "LLAMA_OPERATOR_CONTROL_PLANE_DIR": "/x", "HOME": "/root"})
    assert values == {"huggingFaceEndpoint": "http://127.0.0.1:9", "llamaServerImages": {"nvidia": "reg/llama:cuda"},
                      "resyncSeconds": 60,
                      "extraEnv": [{"name": "LLAMA_OPERATOR_MODEL_RESYNC_SECONDS", "value": "30"}]}


def test_images_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SERVER_BIN", "/opt/llama-server")
    image = ImageTable().resolve("ghcr.io/ggml-org/llama.cpp:server-cuda-b11312")
    assert image.command(["/app/llama-server"], ["-m", "/models/x.gguf"]) == ["/opt/llama-server", "-m",
                                                                              "/models/x.gguf"]
    with pytest.raises(ImageError, match="not available in the sandbox"):
        ImageTable().resolve("docker.io/library/busybox:1")
    paths = PathMap({"/models": "/state/a", "/models/draft": "/state/b", "/tmp": "/state/tmp"})
    assert [paths.rewrite(v) for v in ("/models/x.gguf", "/models/draft/y", "/tmp", "/models2", "x")] == [
        "/state/a/x.gguf", "/state/b/y", "/state/tmp", "/models2", "x"]
    assert under_run("/var/run/secrets/kubernetes.io/serviceaccount") == "/run/secrets/kubernetes.io/serviceaccount"
    assert under_run("/run") == "/run" and under_run("/running") is None and under_run("/tmp") is None
    assert expand("$(A)-$$(A)-$(B)", {"A": "1"}) == "1-$(A)-$(B)"


def test_atomic_volume_update(tmp_path: Path) -> None:
    volume = tmp_path / "token-volume"
    write_atomic(volume, {"token": (b"one", 0o600), "ca.crt": (b"ca", 0o644)})
    assert (volume / "token").read_text() == "one" and (volume / "token").is_symlink()
    first = (volume / "..data").resolve()
    write_atomic(volume, {"token": (b"two", 0o600), "ca.crt": (b"ca", 0o644)})
    assert (volume / "token").read_text() == "two"
    assert not first.exists() and (volume / "..data").resolve() != first
    assert oct((volume / "token").resolve().stat().st_mode & 0o777) == "0o600"


def test_service_targets_are_the_ready_endpointslice_addresses() -> None:
    proxies = ServiceProxies(None, port_base=0, quiet_namespaces=(), on_service=lambda *_: None)  # type: ignore[arg-type]
    service = {"metadata": {"namespace": "ns", "name": "chat"}, "spec": {"ports": [{"name": "http", "port": 8080}]}}
    proxies.slices.objects = {("ns", "chat-abc"): {
        "metadata": {"namespace": "ns", "name": "chat-abc", "labels": {"kubernetes.io/service-name": "chat"}},
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.250.1.3"], "conditions": {"ready": True}},
                      {"addresses": ["10.250.1.4"], "conditions": {"ready": False}},
                      {"addresses": ["10.250.1.5"]}]},
        ("ns", "other-x"): {"metadata": {"namespace": "ns", "name": "other-x",
                                         "labels": {"kubernetes.io/service-name": "other"}},
                            "ports": [{"name": "http", "port": 9}], "endpoints": [{"addresses": ["10.250.1.9"]}]}}
    assert proxies.targets(service, service["spec"]["ports"][0]) == [("10.250.1.3", 8080), ("10.250.1.5", 8080)]


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


async def test_egress_proxy_forwards_plain_http_and_connect() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = EgressProxy("127.0.0.1", 0)
    await proxy.start()
    assert proxy._server is not None
    port = proxy._server.sockets[0].getsockname()[1]
    target = f"http://127.0.0.1:{server.server_address[1]}/a?b=1"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(target, proxy=f"http://127.0.0.1:{port}") as response:
                assert await response.text() == "hello /a?b=1"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"CONNECT 127.0.0.1:{server.server_address[1]} HTTP/1.1\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        writer.write(b"GET /tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).endswith(b"hello /tunnel")
        writer.close()
    finally:
        await proxy.close()
        server.shutdown()


class _Runtime:
    """What KubeletServer needs of a PodRuntime."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.status = ContainerStatus({"name": "app"})
        self.status.instance = 2

    def container(self, name: str) -> ContainerStatus | None:
        return self.status if name == "app" else None

    def log_path(self, container: str, *, previous: bool = False) -> Path:
        return self.dir / (f"{container}.previous.log" if previous else f"{container}.log")


async def test_container_logs_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "pki")
    serving = ca.issue("kubelet", common_name="sandbox", server=True, ip_addresses=["127.0.0.1"])
    client = ca.issue("apiserver", common_name="kube-apiserver-kubelet-client", client=True)
    runtime = _Runtime(tmp_path)
    runtime.log_path("app").write_text("one\ntwo\nthree\n")
    runtime.log_path("app", previous=True).write_text("old\n")
    server = KubeletServer("127.0.0.1", 0, cert=serving.cert, key=serving.key, client_ca=ca.cert_path,
                           lookup=lambda ns, name: runtime if (ns, name) == ("ns", "pod") else None)  # type: ignore
    await server.start()
    assert server._runner is not None
    port = server._runner.addresses[0][1]
    base = f"https://127.0.0.1:{port}/containerLogs/ns/pod"
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    context.load_cert_chain(str(client.cert), str(client.key))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            async def get(path: str) -> tuple[int, str]:
                async with session.get(base + path) as response:
                    return response.status, await response.text()

            assert await get("/app") == (200, "one\ntwo\nthree\n")
            assert await get("/app?tailLines=2") == (200, "two\nthree\n")
            assert await get("/app?limitBytes=5") == (200, "one\nt")
            assert await get("/app?previous=true") == (200, "old\n")
            assert (await get("/nope"))[0] == 404

            runtime.status.exited.clear()
            async with session.get(base + "/app?follow=true&tailLines=0") as response:
                with runtime.log_path("app").open("a") as log:
                    log.write("four\n")
                assert await response.content.readline() == b"four\n"
                runtime.status.exited.set()
                assert await response.read() == b""  # the stream ends with the container
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(
                cafile=str(ca.cert_path)))) as anonymous:
            with pytest.raises(aiohttp.ClientError):
                async with anonymous.get(base + "/app") as response:
                    await response.text()
    finally:
        await server.close()


def test_a_crash_looping_operator_is_reported_once_per_restart() -> None:
    from llama_operator.sandbox.app import restarted_containers

    def operator_pod(restarts: int) -> dict[str, Any]:
        last = {"terminated": {"exitCode": 1, "message": "Traceback (most recent call last):\nImportError: boom\n"}}
        return {"metadata": {"name": "llama-operator-6d9f"}, "status": {"containerStatuses": [
            {"name": "operator", "restartCount": restarts, **({"lastState": last} if restarts else {})}]}}

    seen: dict[str, int] = {}
    assert restarted_containers([operator_pod(0)], seen) == []
    assert restarted_containers([operator_pod(1)], seen) == [
        "Pod llama-system/llama-operator-6d9f: operator restarted (1x, exit code 1): ImportError: boom "
        "(kubectl -n llama-system logs --previous llama-operator-6d9f)"]
    assert restarted_containers([operator_pod(1)], seen) == []  # not again for the same restart
    assert restarted_containers([operator_pod(2)], seen)[0].startswith("Pod llama-system/llama-operator-6d9f: "
                                                                        "operator restarted (2x")


def test_a_second_sandbox_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    from llama_operator.sandbox.app import SandboxError, lock_state_dir

    held = lock_state_dir(tmp_path)
    with pytest.raises(SandboxError, match=rf"another sandbox \(pid {os.getpid()}\) is running with state "
                                           rf"directory {tmp_path}: stop it first"):
        lock_state_dir(tmp_path)
    held.close()  # the first one stopped: the directory is free again
    lock_state_dir(tmp_path).close()
