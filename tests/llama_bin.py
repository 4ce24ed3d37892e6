"""The pinned llama-server for tests: where the binary is ($LLAMA_SERVER_BIN, set by `make test`, else the one
built before), the ggml-rpc-server built beside it, and one way to run it on loopback until it is healthy."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.tiers import LLAMA_SERVER, in_ci, require


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
