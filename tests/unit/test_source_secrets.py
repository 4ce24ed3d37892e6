"""Secrets of model sources (issue 17): a value ending in a newline, a value with a line break inside, a Secret
that did not opt in, and secret values echoed by a host: in the operator's resolve path (status, Events, log)
and in the fetcher (termination message, log). A value never appears in any message."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_operator import contract
from llama_operator.api.v1beta1 import LlamaModel
from llama_operator.config import Settings
from llama_operator.errors import InvalidSecret, RetryLater
from llama_operator.fetch.secrets import REDACTED, SOURCE_CREDENTIALS_LABEL, SOURCE_CREDENTIALS_TYPE, clean, scrub
from llama_operator.kube import LLAMA_MODELS, SECRETS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.model import reconcile_model, resolve_source
from llama_operator.sources import transport_error
from tests.conftest import model_body
from tests.fakehub import write_gguf
from tests.fakekube import Events, FakeKube
from tests.http_recorder import Answer, Recorder, Seen, serve_bytes

TOKEN = "hf_SECRETTOKEN123"
SETTINGS = Settings(source_egress_guard=False)  # the recorder listens on 127.0.0.1


@pytest.fixture
def gguf(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "m.gguf", tensors={"a": (4, 4)}).read_bytes()


@pytest.fixture
def host(gguf: bytes) -> Iterator[Recorder]:
    with Recorder().running() as recorder:
        recorder.routes["/m.gguf"] = serve_bytes(gguf)
        yield recorder


def _secret(name: str, data: dict[str, str], *, opted_in: bool = True, type_: str = "Opaque") -> dict[str, Any]:
    labels = {SOURCE_CREDENTIALS_LABEL: "true"} if opted_in else {}
    return {"apiVersion": "v1", "kind": "Secret", "type": type_, "metadata": {"name": name, "labels": labels},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def _http_model(url: str) -> LlamaModel:
    return LlamaModel.model_validate(model_body(spec={"source": {"http": {
        "url": url, "headersSecretRef": {"name": "creds"}}}}))


def _context(kube: FakeKube, settings: Settings = SETTINGS) -> Context:
    return Context(kube=kube, settings=settings, record_event=Events())


def _everything(status: Any) -> str:
    return status.model_dump_json()


# ---------------------------------------------------------------------------------------------- operator


async def test_a_header_value_ending_in_a_newline_is_sent_without_it(host: Recorder) -> None:
    kube = FakeKube()
    kube.put(SECRETS, _secret("creds", {"Authorization": f"Bearer {TOKEN}\n"}))
    status = await resolve_source(_http_model(host.url("/m.gguf")), _context(kube))
    assert status.phase == "Ready", status.message
    assert {seen["authorization"] for seen in host.headers_seen()} == {f"Bearer {TOKEN}"}


async def test_a_value_with_a_line_break_inside_is_refused_by_name_never_shown(host: Recorder) -> None:
    kube = FakeKube()
    kube.put(SECRETS, _secret("creds", {"X-Api-Key": f"{TOKEN}\r\nX-Injected: yes"}))
    status = await resolve_source(_http_model(host.url("/m.gguf")), _context(kube))
    assert status.phase == "Failed"
    assert status.conditions is not None and status.conditions[0].reason == "InvalidSecret"
    assert "Secret default/creds key 'X-Api-Key'" in (status.message or "")
    assert TOKEN not in _everything(status)
    assert host.seen == []


async def test_a_secret_that_did_not_opt_in_is_never_read(host: Recorder) -> None:
    kube = FakeKube()
    kube.put(SECRETS, _secret("creds", {"db-password": "hunter2"}, opted_in=False))
    kube.put(LLAMA_MODELS, model_body(spec={"source": {"http": {"url": host.url("/m.gguf"),
                                                                "headersSecretRef": {"name": "creds"}}}}))
    ctx = _context(kube)
    with pytest.raises(RetryLater):  # fixed by labelling the Secret, not by a spec change: tried again
        await reconcile_model(kube.objects[("llamamodels", "default", "qwen")], ctx)
    status = kube.objects[("llamamodels", "default", "qwen")]["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert status["phase"] == "Failed" and ready["reason"] == "SecretNotAllowed"
    assert "Secret default/creds" in ready["message"] and f"{SOURCE_CREDENTIALS_LABEL}=true" in ready["message"]
    assert host.seen == [] and "hunter2" not in str(status)

    kube.edit("secrets", "creds", lambda s: s["metadata"]["labels"].update({SOURCE_CREDENTIALS_LABEL: "true"}),
              spec=False)
    await reconcile_model(kube.objects[("llamamodels", "default", "qwen")], ctx)  # the retry resolves it
    assert kube.objects[("llamamodels", "default", "qwen")]["status"]["phase"] == "Ready"
    assert {seen["db-password"] for seen in host.headers_seen()} == {"hunter2"}


async def test_a_secret_of_the_credentials_type_is_read(host: Recorder) -> None:
    kube = FakeKube()
    kube.put(SECRETS, _secret("creds", {"X-Api-Key": "k3y-value"}, opted_in=False, type_=SOURCE_CREDENTIALS_TYPE))
    status = await resolve_source(_http_model(host.url("/m.gguf")), _context(kube))
    assert status.phase == "Ready", status.message


async def test_a_host_echoing_the_token_does_not_get_it_into_status(host: Recorder) -> None:
    def echo(seen: Seen) -> Answer:  # the hub's X-Error-Message is shown: this "hub" puts the token in it
        return Answer(401, {"X-Error-Code": "Denied", "X-Error-Message": f"bad {seen.headers.get('authorization')}"})

    host.routes["/org/m-GGUF/resolve/main/m.gguf"] = echo
    kube = FakeKube()
    kube.put(SECRETS, _secret("hf", {"token": f"{TOKEN}\n"}))
    model = LlamaModel.model_validate(model_body(spec={"source": {"huggingFace": {
        "repo": "org/m-GGUF", "file": "m.gguf", "tokenSecretRef": {"name": "hf", "key": "token"}}}}))
    settings = Settings(source_egress_guard=False, huggingface_endpoint=host.url())
    status = await resolve_source(model, _context(kube, settings))
    assert status.phase == "Failed" and REDACTED in (status.message or "")
    assert TOKEN not in _everything(status)


def test_a_header_the_http_stack_refuses_is_reported_without_its_value() -> None:
    error = transport_error("m.gguf", httpx.LocalProtocolError(f"Illegal header value b'Bearer {TOKEN} '"))
    assert not error.transient and TOKEN not in str(error) and "cannot be sent" in str(error)


def test_scrub_finds_escaped_forms() -> None:
    message = f"Invalid header value b'Bearer {TOKEN}\\n' or {TOKEN!r}"
    assert TOKEN not in scrub(message, [f"{TOKEN}\n"])
    assert scrub("HTTP 401", ["1"]) == "HTTP 401"  # values too short to be secrets are left alone


def test_clean_strips_one_newline_and_refuses_other_control_characters() -> None:
    assert clean(f"{TOKEN}\n", where="w") == TOKEN
    assert clean(f"{TOKEN}\r\n", where="w") == TOKEN
    for bad in (f"{TOKEN}\n\n", f"{TOKEN}\x00", f"a\tb{TOKEN}", f"{TOKEN}é"):
        with pytest.raises(InvalidSecret) as caught:
            clean(bad, where="Secret ns/s key 'k'")
        assert "Secret ns/s key 'k'" in str(caught.value) and TOKEN not in str(caught.value)


# ---------------------------------------------------------------------------------------------- fetcher


def _fetch(url: str, cache: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    log = cache / "termination-log"
    argv = [sys.executable, "-m", "llama_operator.cli", "fetch", "--cache-dir", str(cache), "--cache-key", "m-1",
            "--url", url, "--retries", "1", "--termination-log", str(log), *args]
    clean_env = {k: v for k, v in os.environ.items()
                 if k != contract.TOKEN_ENV and not k.startswith(contract.HEADER_ENV_PREFIX)}
    done = subprocess.run(argv, capture_output=True, text=True, env={**clean_env, **env}, timeout=60)
    return done.returncode, log.read_text() if log.exists() else "", done.stderr


def test_fetcher_sends_a_header_without_its_trailing_newline(host: Recorder, tmp_path: Path) -> None:
    code, message, _ = _fetch(host.url("/m.gguf"), tmp_path, {f"{contract.HEADER_ENV_PREFIX}X_Api_Key": f"{TOKEN}\n"})
    assert code == contract.EXIT_OK, message
    assert {seen["x-api-key"] for seen in host.headers_seen()} == {TOKEN}


def test_fetcher_refuses_a_line_break_inside_without_showing_it(host: Recorder, tmp_path: Path) -> None:
    code, message, stderr = _fetch(host.url("/m.gguf"), tmp_path,
                                   {f"{contract.HEADER_ENV_PREFIX}X_Api_Key": f"{TOKEN}\r\nX-Injected: yes"})
    assert code == contract.EXIT_USAGE and message.startswith("InvalidSecret: LLAMA_FETCH_HEADER_X_Api_Key")
    assert TOKEN not in message and TOKEN not in stderr
    assert host.seen == []


def test_fetcher_scrubs_a_token_a_host_echoes(host: Recorder, tmp_path: Path) -> None:
    def echo(seen: Seen) -> Answer:
        return Answer(403, {"X-Error-Code": "Denied", "X-Error-Message": f"bad {seen.headers.get('authorization')}"})

    host.routes["/org/m-GGUF/resolve/main/m.gguf"] = echo
    log = tmp_path / "termination-log"
    argv = [sys.executable, "-m", "llama_operator.cli", "fetch", "--cache-dir", str(tmp_path), "--cache-key", "m-1",
            "--hf-endpoint", host.url(), "--hf-repo", "org/m-GGUF", "--hf-file", "m.gguf", "--retries", "1",
            "--termination-log", str(log)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={**os.environ, contract.TOKEN_ENV: f"{TOKEN}\n"})
    assert done.returncode == contract.EXIT_FORBIDDEN
    assert REDACTED in log.read_text() and TOKEN not in log.read_text() and TOKEN not in done.stderr
