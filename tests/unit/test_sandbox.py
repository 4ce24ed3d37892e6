"""The sandbox's parts that need neither root nor a control plane: its command line (the retired process node
says so), chart values from the environment and for the registry's images, Service targets from EndpointSlices
and the host-port forwarding, the crash-looping operator's report, and the state directory's lock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from llama_operator.cli import build_parser
from llama_operator.nodes.processes import NodesError
from llama_operator.sandbox.helm import values_from_env
from llama_operator.sandbox.proxy import ServiceProxies, ServiceProxy
from llama_operator.sandbox.real_nodes import chart_values, find_images, operator_env

REFS = {"operator": "10.0.0.1:5000/llama-operator:dev", "llama-server": "10.0.0.1:5000/llama.cpp:server-b1"}


def test_nodes_is_a_count_of_real_nodes() -> None:
    parser = build_parser()
    assert parser.parse_args(["sandbox"]).nodes == 2
    assert parser.parse_args(["sandbox", "--nodes", "1"]).nodes == 1


@pytest.mark.parametrize(("argv", "says"), [
    (["--nodes", "process"], "argument --nodes: the process node was retired"),
    (["--nodes", "5"], "argument --nodes: '5': expected how many real nodes, 1 to 4"),
    (["--image", "x=/bin/true"], "argument --image: --image mapped images to local executables for the process "
                                 "node, which was retired"),
])
def test_retired_and_wrong_options_fail_at_parsing_with_one_line(argv: list[str], says: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["sandbox", *argv])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"llama-operator sandbox: error: {says}")
    if "process" in argv:
        assert "use --nodes 1 to 4" in error


def test_values_and_operator_environment_for_the_registry_images() -> None:
    assert chart_values(REFS) == {"image": {"repository": "10.0.0.1:5000/llama-operator", "tag": "dev"},
                                  "llamaServerImages": {"cpu": REFS["llama-server"]},
                                  "rpcImages": {"cpu": REFS["llama-server"]}}
    with_policies = chart_values(REFS, network_policies=True, node_addresses=["10.244.0.1"])
    assert with_policies["networkPolicy"] == {
        "operator": {"webhookFrom": [{"ipBlock": {"cidr": "10.244.0.1/32"}}]}, "llamaServers": {"enabled": True}}
    # --operator local sets through the environment what the chart sets through these values
    assert operator_env(REFS) == {"LLAMA_OPERATOR_IMAGE_CPU": REFS["llama-server"],
                                  "LLAMA_OPERATOR_RPC_IMAGE_CPU": REFS["llama-server"],
                                  "LLAMA_OPERATOR_FETCHER_IMAGE": REFS["operator"]}


def test_missing_images_say_how_to_build_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_OPERATOR_IMAGES_DIR", raising=False)
    monkeypatch.setenv("LLAMA_OPERATOR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NodesError, match=r"holds no `make images` build; `make images` builds them$"):
        find_images()
    with pytest.raises(NodesError, match="has no images.json"):
        find_images(str(tmp_path))
    (tmp_path / "images.json").write_text("{}")
    assert find_images(str(tmp_path)) == tmp_path


def test_chart_values_from_operator_settings() -> None:
    values = values_from_env({
        "LLAMA_OPERATOR_HF_ENDPOINT": "http://127.0.0.1:9", "LLAMA_OPERATOR_IMAGE_NVIDIA": "reg/llama:cuda",
        "LLAMA_OPERATOR_RESYNC_SECONDS": "60", "LLAMA_OPERATOR_MODEL_RESYNC_SECONDS": "30",
        "LLAMA_OPERATOR_WEBHOOK_PORT": "1", "LLAMA_OPERATOR_CONTROL_PLANE_DIR": "/x", "HOME": "/root"})
    assert values == {"huggingFaceEndpoint": "http://127.0.0.1:9", "llamaServerImages": {"nvidia": "reg/llama:cuda"},
                      "resyncSeconds": 60,
                      "extraEnv": [{"name": "LLAMA_OPERATOR_MODEL_RESYNC_SECONDS", "value": "30"}]}


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


async def test_a_service_port_forwards_both_ways_and_passes_the_half_close_on() -> None:
    async def echo_upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write((await reader.read()).upper())  # read() returns once the client half-closed
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(echo_upper, "127.0.0.1", 0)
    proxy = ServiceProxy("ns/chat:http")
    await proxy.listen(0)
    try:
        proxy.targets = [("127.0.0.1", 1), ("127.0.0.1", upstream.sockets[0].getsockname()[1])]  # 1: refused
        for _ in range(2):  # round-robin: the refused endpoint is skipped either way
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"hello")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"HELLO"
            writer.close()
        proxy.targets = []  # no ready endpoint: the connection is closed at once, like kube-proxy's
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await proxy.close()
        upstream.close()


async def test_an_upstream_reset_cuts_the_client_at_once() -> None:
    """A gateway pod SIGKILLed with a request unread resets its connection: the client, still waiting for an
    answer with its own side open, sees its connection closed at once (it once waited for its 60 s timeout)."""
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends a RST
        writer.transport.abort()

    upstream = await asyncio.start_server(reset, "127.0.0.1", 0)
    proxy = ServiceProxy("ns/gateway:http")
    await proxy.listen(0)
    try:
        proxy.targets = [("127.0.0.1", upstream.sockets[0].getsockname()[1])]
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")  # no half-close: an HTTP client waits for its answer with its side open
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await proxy.close()
        upstream.close()


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


def test_values_an_earlier_chart_does_not_know_are_left_out(tmp_path: Path) -> None:
    from llama_operator.sandbox.helm import known_values

    (tmp_path / "values.schema.json").write_text('{"properties": {"image": {}, "llamaServerImages": {}}}')
    values = {"image": {"tag": "dev"}, "llamaServerImages": {"cpu": "x"}, "rpcImages": {"cpu": "x"}}
    assert known_values(tmp_path, values) == ({"image": {"tag": "dev"}, "llamaServerImages": {"cpu": "x"}},
                                              ["rpcImages"])
    assert known_values(tmp_path / "missing", values) == (values, [])  # no schema: everything goes to helm


def test_a_disk_the_nodes_would_fill_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_operator.nodes import cluster

    real = shutil.disk_usage

    def usage(free: int) -> None:
        monkeypatch.setattr(cluster.shutil, "disk_usage", lambda path: real(path)._replace(free=free))

    usage(1 << 30)
    with pytest.raises(NodesError, match=rf"^the disk holding {tmp_path}/nodes has 1.0 GiB free; the nodes need "
                                         r"2.0 GiB for their images: free some space or pass another state directory$"):
        cluster.check_disk(tmp_path / "nodes", ["node-a", "node-b"])  # the directory need not exist yet
    (tmp_path / "nodes" / "node-a" / "containerd").mkdir(parents=True)  # a warm start: node-a has its images
    cluster.check_disk(tmp_path / "nodes", ["node-a"])
    with pytest.raises(NodesError, match="need 1.2 GiB"):
        cluster.check_disk(tmp_path / "nodes", ["node-a", "node-b"])
    usage(3 << 30)
    cluster.check_disk(tmp_path / "nodes", ["node-a", "node-b"])
