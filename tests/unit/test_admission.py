"""AdmissionReview requests over HTTPS to kopf's webhook server running our validating handlers."""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import kopf
import pytest
from kopf._cogs.structs import references
from kopf._core.engines.admission import serve_admission_request
from kopf._core.engines.indexing import OperatorIndexers
from kopf._core.reactor.inventory import ResourceMemories

from llama_operator import admission
from llama_operator.api.v1beta1 import GROUP, VERSION
from llama_operator.config import Settings

from .flag_cases import BAD_CASES

RESOURCES = {
    "llamaservers": references.Resource(GROUP, VERSION, "llamaservers", kind="LlamaServer", namespaced=True,
                                        verbs=["create", "update"]),
    "llamamodels": references.Resource(GROUP, VERSION, "llamamodels", kind="LlamaModel", namespaced=True,
                                       verbs=["create", "update"]),
}
GOOD_MODEL = {"source": {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                                         "file": "qwen2.5-0.5b-instruct-q4_k_m.gguf"}}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _self_signed(cert_dir: Path) -> None:
    """tls.crt + tls.key for localhost, as cert-manager would mount them (openssl: no extra Python deps)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(cert_dir / "tls.key"), "-out", str(cert_dir / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("webhook-certs")
    _self_signed(path)
    return path


@pytest.fixture(scope="module")
def registry() -> kopf.OperatorRegistry:
    """A registry holding exactly this package's webhook handlers, as the operator's startup registers them."""
    fresh = kopf.OperatorRegistry()
    admission.register(fresh, Settings())
    return fresh


@pytest.fixture
async def webhook(cert_dir: Path, registry: kopf.OperatorRegistry) -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    """kopf's WebhookServer, configured by admission.configure_webhook, serving this package's handlers."""
    tmp_path = cert_dir
    port = _free_port()
    settings = kopf.OperatorSettings()
    admission.configure_webhook(settings, Settings(webhook_port=port, webhook_cert_dir=str(tmp_path)))
    insights = references.Insights()
    insights.webhook_resources.update(RESOURCES.values())
    fn = functools.partial(
        serve_admission_request, settings=settings, memories=ResourceMemories(), memobase=kopf.Memo(),
        registry=registry, insights=insights, indices=OperatorIndexers().indices,
    )  # fmt: skip
    configs = settings.admission.server(fn)
    await anext(configs)  # the server listens once it yields its client config
    context = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))
    try:
        yield f"https://localhost:{port}", context
    finally:
        await configs.aclose()
        await asyncio.sleep(0)


def _review(plural: str, kind: str, spec: dict, *, namespace: str = "default") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": GROUP, "version": VERSION, "kind": kind},
            "resource": {"group": GROUP, "version": VERSION, "resource": plural},
            "operation": "CREATE",
            "namespace": namespace,
            "userInfo": {"username": "tester"},
            "object": {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind,
                       "metadata": {"name": "x", "namespace": namespace}, "spec": spec},
        },
    }


async def _post(webhook: tuple[str, ssl.SSLContext], path: str, review: dict) -> dict:
    url, context = webhook
    async with httpx.AsyncClient(verify=context) as client:
        response = await client.post(f"{url}/{path}", json=review, timeout=10)
    response.raise_for_status()
    return response.json()["response"]


async def test_good_objects_are_allowed(webhook):
    server = _review("llamaservers", "LlamaServer", {"modelRef": {"name": "m"}, "args": ["--top-k", "20"]})
    assert (await _post(webhook, admission.SERVER_WEBHOOK_ID, server))["allowed"] is True
    model = _review("llamamodels", "LlamaModel", GOOD_MODEL)
    assert (await _post(webhook, admission.MODEL_WEBHOOK_ID, model))["allowed"] is True


@pytest.mark.parametrize(("title", "fields", "messages", "rules"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
async def test_each_bad_server_is_refused_with_its_message(webhook, title, fields, messages, rules):
    review = _review("llamaservers", "LlamaServer", {"modelRef": {"name": "m"}, **fields})
    response = await _post(webhook, admission.SERVER_WEBHOOK_ID, review)
    assert response["allowed"] is False
    assert response["status"]["message"] == "invalid LlamaServer: " + "; ".join(messages)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"modelRef": {"name": "m"}, "contextSize": "4k"},
         "spec.contextSize: must be a number of tokens or 'auto' (got '4k')"),
        ({"modelRef": {"name": "m"}, "flashAttention": "true"}, "spec.flashAttention: Input should be 'auto'"),
        ({"modelRef": {"name": "m", "namespace": "other"}}, "spec.modelRef.namespace: must be omitted or 'default'"),
        ({}, "spec: exactly one of modelRef, models must be set (got none)"),
    ],
)
async def test_schema_errors_are_refused(webhook, spec, message):
    response = await _post(webhook, admission.SERVER_WEBHOOK_ID, _review("llamaservers", "LlamaServer", spec))
    assert response["allowed"] is False and message in response["status"]["message"]


async def test_bad_model_is_refused(webhook):
    bad = {"source": {"huggingFace": {"repo": "a/b", "file": "x.bin"}, "http": {"url": "https://h/x.gguf"}}}
    response = await _post(webhook, admission.MODEL_WEBHOOK_ID, _review("llamamodels", "LlamaModel", bad))
    assert response["allowed"] is False
    assert "invalid LlamaModel: spec.source" in response["status"]["message"]


def test_configure_webhook(tmp_path: Path):
    settings = kopf.OperatorSettings()
    admission.configure_webhook(settings, Settings())
    assert settings.admission.server is None
    admission.configure_webhook(settings, Settings(webhook_port=9443, webhook_cert_dir=str(tmp_path)))
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert (server.port, server.certfile, server.pkeyfile) == (9443, str(tmp_path / "tls.crt"),
                                                               str(tmp_path / "tls.key"))


async def test_update_that_leaves_an_invalid_spec_alone_is_allowed(webhook):
    # An object admitted under older rules must stay manageable (kopf's annotations) and deletable.
    bad = {"modelRef": {"name": "m"}, "args": ["--mlock"]}
    review = _review("llamaservers", "LlamaServer", bad)
    review["request"]["operation"] = "UPDATE"
    review["request"]["oldObject"] = review["request"]["object"]
    response = await _post(webhook, admission.SERVER_WEBHOOK_ID, review)
    assert response["allowed"] is True
    changed = _review("llamaservers", "LlamaServer", {**bad, "contextSize": 4096})
    changed["request"]["operation"] = "UPDATE"
    changed["request"]["oldObject"] = review["request"]["object"]
    response = await _post(webhook, admission.SERVER_WEBHOOK_ID, changed)
    assert response["allowed"] is False and "--mlock" in response["status"]["message"]
