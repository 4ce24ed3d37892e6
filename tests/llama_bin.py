"""The pinned llama-server for tests: where the binary is ($LLAMA_SERVER_BIN, set by `make test`, else the one
built before), the ggml-rpc-server built beside it, and one way to run it on loopback until it is healthy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.tiers import LLAMA_SERVER, in_ci, require
from tests.waiting import wait_for


def llama_server_bin() -> str:
    """Path of the pinned llama-server; never builds it (tests/tiers.py: a test that runs it is marked `runtime`)."""
    return require(LLAMA_SERVER)


def rpc_server_bin() -> str:
    """Path of the ggml-rpc-server next to the pinned llama-server (an RPC worker, docs/distributed.md); a
    llama-server built without it skips the test (fails it in CI), like a missing tool (tests/tiers.py)."""
    path = Path(llama_server_bin()).with_name("ggml-rpc-server")
    if not os.access(path, os.X_OK):
        message = f"needs ggml-rpc-server: {path} is missing: `make llama-server` builds it beside llama-server"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def on_loopback(args: Sequence[str]) -> tuple[list[str], int]:
    """A pod's llama-server args (listening on 0.0.0.0:8080) with loopback and a free port instead."""
    args, port = list(args), free_port()
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    return args, port


@contextmanager
def serving(args: Sequence[str], port: int, *, workdir: Path, env: Mapping[str, str] | None = None,
            timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """llama-server with `args` (already listening on 127.0.0.1:`port`) until its /health is 200: (url, process);
    a start that fails or times out fails the test with the end of its log. Stopped on exit."""
    log = workdir / f"llama-server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([llama_server_bin(), *args], stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                                env=dict(env) if env is not None else None, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama-server {list(args)} did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def drain_sidecar(url: str, slots: Path, workdir: Path, *, hostname: str, slot_key: str = "",
                  model_keys: Sequence[str] = (), timeout: float = 30.0) -> Iterator[str]:
    """`llama-operator drain` beside the llama-server at `url`, keeping slots under `slots`: one server's
    (`slot_key`) or a router's, a directory per model key (`model_keys`). Yields its base URL once its readiness
    path is 200 (after its restore); stopped on exit."""
    from llama_operator.contract import DRAIN_READY_PATH

    port = free_port()
    log_path = workdir / f"drain-{port}.log"
    which = ["--model-keys", ",".join(model_keys)] if model_keys else ["--slot-key", slot_key]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_operator.cli", "drain", "--port", str(port), "--server", url,
             "--budget-seconds", "30", "--min-wait", "0", "--poll", "0.2", "--slots-dir", str(slots), *which,
             "--slots-max-bytes", str(64 << 20)],
            stdout=log, stderr=subprocess.STDOUT, env={"HOSTNAME": hostname, "PATH": "/usr/bin:/bin"})
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"{base}{DRAIN_READY_PATH}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=timeout, interval=0.1, message=f"the drain sidecar's readiness ({log_path})")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)
