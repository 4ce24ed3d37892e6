"""The drain sidecar against the pinned llama-server, one model and router mode: /drain answers only after a
stream in progress has ended with its final chunk, and never loads an unloaded router model while it polls."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llama_operator.contract import API_KEY_ENV, DRAIN_PATH
from llama_operator.drain import Drain, ServerState, Timing, make_server

from ..llama_bin import free_port, serving
from ..tiny_gguf import write_tiny_llama

CONTEXT = 65536
"""The servers' context, all of it for one slot (`--parallel 1`: with llama-server's 4 slots a stream stopped at a
quarter of it, 0.9 s on a fast machine): room for a stream of several seconds (the tiny model's KV cache for it is
32 MiB)."""
STREAM_SECONDS = 2.0


def _tokens(url: str, model: str | None) -> int:
    """Tokens for a stream of about STREAM_SECONDS, from this machine's speed (a fixed count ran under a second on
    a faster CI machine than the 3,500 tokens/s of the dev one, and the test then proved nothing); the context is
    the trained one too, which llama-server caps a slot at."""
    body = {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True, **({"model": model} if model else {})}
    started = time.monotonic()
    httpx.post(f"{url}/v1/completions", json=body, timeout=60).raise_for_status()
    rate = 2000 / max(time.monotonic() - started, 1e-3)
    return int(min(max(rate * STREAM_SECONDS, 4000), CONTEXT - 512))


def _stream(url: str, model: str | None, done: dict[str, float | str], started: threading.Event,
            tokens: int) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": tokens,
            "ignore_eos": True, **({"model": model} if model else {})}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        # Lines split on b"\n" alone: the random tiny model emits U+2028 and U+0085 unescaped in JSON strings,
        # where iter_lines (str.splitlines) would cut an event in two.
        pending = b""
        for chunk in response.iter_bytes():
            started.set()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"data: {"):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("finish_reason"):
                        done["finish_reason"] = choices[0]["finish_reason"]
    done["ended"] = time.monotonic()


@pytest.fixture
def sidecar() -> Iterator[Callable[[str], str]]:
    servers = []

    def start(url: str) -> str:
        server = make_server(Drain(ServerState(url).busy, Timing(budget=30, min_wait=0.5, poll=0.2)), 0, "127.0.0.1")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}{DRAIN_PATH}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _drain_after_stream(url: str, drain_url: str, model: str | None) -> tuple[float, float]:
    done: dict[str, float | str] = {}
    started = threading.Event()
    client = threading.Thread(target=_stream, args=(url, model, done, started, _tokens(url, model)))
    client.start()
    assert started.wait(30)
    called = time.monotonic()
    with urllib.request.urlopen(drain_url, timeout=40) as response:
        outcome = response.read().decode()
    answered = time.monotonic()
    client.join(60)
    assert outcome.startswith("idle"), outcome
    assert done.get("finish_reason") == "length", done
    assert float(done["ended"]) <= answered + 0.2, "the drain answered while the stream was still running"
    # The stream, not the minimum wait (0.5 s), held the answer: else this test proves nothing.
    assert float(done["ended"]) - called > 1.0, f"the stream ended {float(done['ended']) - called:.2f} s after the call"
    return float(done["ended"]), answered


def test_one_model_drain_waits_for_the_stream(tmp_path: Path, sidecar: Callable[[str], str]) -> None:
    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model, context_length=CONTEXT)
    port = free_port()
    args = ["-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--metrics", "--no-slots",
            "-c", str(CONTEXT), "-np", "1", "-t", "1"]
    with serving(args, port, workdir=tmp_path) as (url, _):
        ended, answered = _drain_after_stream(url, sidecar(url), None)
        print(f"one model: stream ended, drain answered {answered - ended:.2f} s later")


def test_router_drain_waits_for_the_stream_and_loads_nothing(tmp_path: Path, sidecar: Callable[[str], str]) -> None:
    for name in ("a", "b"):
        write_tiny_llama(tmp_path / f"{name}.gguf", seed=ord(name), context_length=CONTEXT)
    preset = tmp_path / "models.ini"
    preset.write_text("".join(f"[{n}]\nmodel = {tmp_path / n}.gguf\nctx-size = {CONTEXT}\nparallel = 1\nthreads = 1\n"
                              for n in ("a", "b")))
    port = free_port()
    args = ["--models-preset", str(preset), "--host", "127.0.0.1", "--port", str(port), "--metrics", "--no-slots"]
    with serving(args, port, workdir=tmp_path) as (url, _):
        ended, answered = _drain_after_stream(url, sidecar(url), "a")
        print(f"router: stream ended, drain answered {answered - ended:.2f} s later")
        states = {m["id"]: m["status"]["value"] for m in httpx.get(f"{url}/models", timeout=5).json()["data"]}
        assert states == {"a": "loaded", "b": "unloaded"}


def test_a_server_with_an_api_key_drains_at_once_with_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """llama-server guards /metrics with its API key: without the key the sidecar cannot read it and waits out its
    whole budget; with the key (the pod gives the sidecar the server's Secret) an idle server drains at once."""
    model = write_tiny_llama(tmp_path / "tiny.gguf")
    port = free_port()
    args = ["-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--metrics", "--no-slots",
            "-c", "512", "-np", "1", "-t", "1", "--api-key", "sk-drain"]
    with serving(args, port, workdir=tmp_path) as (url, _):
        def drain() -> str:
            return Drain(ServerState(url).busy, Timing(budget=2, min_wait=0, poll=0.2)).wait()

        monkeypatch.delenv(API_KEY_ENV, raising=False)
        assert drain().startswith("budget of 2 s spent: state unknown (/metrics answered 401)")
        monkeypatch.setenv(API_KEY_ENV, "sk-drain")
        assert drain().startswith("idle after")
