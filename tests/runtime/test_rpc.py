"""llama.cpp's RPC split on real processes (a LlamaServer's spec.distributed): a leader llama-server with `--rpc`
over two ggml-rpc-server workers on loopback answers at temperature 0 token for token as one process does; its log
puts each layer slot (the output layer is slot n_layer) on the worker that -ngl and --tensor-split predict; a worker
that dies takes the leader down at once (SIGABRT, not a hang), a leader cannot start while a worker is down, and a
leader restarted once the worker is back serves again."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..llama_bin import free_port, llama_server_bin, rpc_server_bin, serving
from ..tiny_gguf import write_tiny_llama

N_LAYER = 4
NGL = 3  # blocks 2 and 3 and the output layer (slot 4) offloaded, blocks 0 and 1 on the leader's CPU
SPLIT = (1, 2)
PROMPT = "Once upon a time"
NO_BACKTRACE = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # an abort exits at once, without attaching gdb


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny.gguf", n_layer=N_LAYER)


@contextmanager
def worker(workdir: Path, port: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A ggml-rpc-server on 127.0.0.1 until it accepts connections: (process, port); killed on exit."""
    port = port or free_port()
    with (workdir / f"rpc-{port}.log").open("ab") as out:
        proc = subprocess.Popen([rpc_server_bin(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ggml-rpc-server did not listen: {(workdir / f'rpc-{port}.log').read_text()}")
                time.sleep(0.05)
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Two workers' ports. A worker serves one leader at a time: the tests using them start one leader at a time."""
    workdir = tmp_path_factory.mktemp("workers")
    with ExitStack() as stack:
        yield [stack.enter_context(worker(workdir))[1] for _ in range(2)]


def leader_args(model: Path, port: int, workers: list[int], *extra: str) -> list[str]:
    """What the operator gives a leader, on loopback: explicit -ngl and --tensor-split, and no --fit (which sizes
    against what a worker reports: its host's RAM, not its pod's limit)."""
    return ["-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "256", "--fit", "off",
            "--rpc", ",".join(f"127.0.0.1:{p}" for p in workers), "-ngl", str(NGL),
            "--tensor-split", ",".join(map(str, SPLIT)), *extra]


def complete(url: str) -> tuple[str, list[int]]:
    reply = httpx.post(f"{url}/completion", json={"prompt": PROMPT, "n_predict": 32, "temperature": 0, "seed": 42,
                                                  "return_tokens": True}, timeout=60)
    reply.raise_for_status()
    return reply.json()["content"], reply.json()["tokens"]


def predicted_devices(n_layer: int, ngl: int, split: tuple[int, ...]) -> dict[int, str]:
    """llama.cpp's load_tensors: slots from n_layer + 1 - ngl to n_layer are offloaded, slot i to the first device
    whose cumulative share of the split exceeds (i - first) / ngl (float32, as there); the others stay on CPU."""
    first = max(n_layer + 1 - ngl, 0)
    bounds = np.cumsum(np.array(split, dtype=np.float32)) / np.float32(sum(split))
    return {slot: "CPU" if slot < first else
            f"RPC{int(np.searchsorted(bounds, np.float32(slot - first) / np.float32(ngl), side='right'))}"
            for slot in range(n_layer + 1)}


def placed_devices(log: str) -> dict[int, str]:
    """The device of each layer slot, from the leader's debug log: `layer   3 assigned to device RPC1` (-lv 5; the
    default verbosity, 3, logs no placement at all, 4 the buffer sizes and `offloaded N/M layers`)."""
    return {int(slot): dev for slot, dev in re.findall(r"layer +(\d+) assigned to device (\w+),", log)}


def test_split_answers_as_one_process(model: Path, workers: list[int], tmp_path: Path) -> None:
    port = free_port()
    with serving(leader_args(model, port, workers), port, workdir=tmp_path) as (url, _):
        split = complete(url)
    port = free_port()
    with serving(["-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "256"], port,
                 workdir=tmp_path) as (url, _):
        single = complete(url)
    assert len(split[1]) == 32
    assert split == single


def test_placement_follows_ngl_and_tensor_split(model: Path, workers: list[int], tmp_path: Path) -> None:
    port = free_port()
    with serving(leader_args(model, port, workers, "-lv", "5"), port, workdir=tmp_path):
        pass
    log = (tmp_path / f"llama-server-{port}.log").read_text()
    assert placed_devices(log) == predicted_devices(N_LAYER, NGL, SPLIT) == {
        0: "CPU", 1: "CPU", 2: "RPC0", 3: "RPC1", 4: "RPC1"}
    assert f"offloaded {NGL}/{N_LAYER + 1} layers" in log
    # A buffer is named after the worker's own device and its endpoint: RPC0[127.0.0.1:<port>] for both workers.
    for p in workers:
        assert re.search(rf"RPC0\[127\.0\.0\.1:{p}\] model buffer size = +\d", log), p
        assert re.search(rf"RPC0\[127\.0\.0\.1:{p}\] KV buffer size = +\d", log), p


def test_a_dead_worker_stops_the_leader_and_a_restart_serves_again(model: Path, tmp_path: Path) -> None:
    with worker(tmp_path) as (_, first), worker(tmp_path) as (doomed, second):
        port = free_port()
        with serving(leader_args(model, port, [first, second]), port, workdir=tmp_path, env=NO_BACKTRACE) as (
                url, leader):
            before = complete(url)
            body = {"prompt": PROMPT, "n_predict": 2000, "ignore_eos": True, "stream": True}
            with pytest.raises(httpx.HTTPError), httpx.stream("POST", f"{url}/completion", json=body,
                                                              timeout=30) as reply:
                for n, _ in enumerate(reply.iter_lines()):
                    if n == 4:  # tokens are streaming: the worker dies mid-generation
                        doomed.kill()
                        killed = time.monotonic()
            leader.wait(timeout=10)
            assert leader.returncode == -signal.SIGABRT
            assert time.monotonic() - killed < 5
        log = (tmp_path / f"llama-server-{port}.log").read_text()
        assert "Remote RPC server crashed or returned malformed response" in log, log[-2000:]

        # While the worker is down a leader exits at start (a pod's container would restart until it is back).
        port = free_port()
        down = subprocess.run([llama_server_bin(), *leader_args(model, port, [first, second])], capture_output=True,
                              text=True, timeout=30, env=NO_BACKTRACE)
        assert down.returncode == -signal.SIGABRT
        assert f"Failed to connect to 127.0.0.1:{second}" in down.stderr + down.stdout

        with worker(tmp_path, second):
            port = free_port()
            with serving(leader_args(model, port, [first, second]), port, workdir=tmp_path) as (url, _):
                assert complete(url) == before
