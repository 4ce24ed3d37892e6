"""Source resolution against the fake hub: sha256/size from linked headers, errors, split models, cache key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from llama_operator.api.v1beta1 import DNS_LABEL, LlamaModelSpec
from llama_operator.config import Settings as OperatorSettings
from llama_operator.sources import (
    ChecksumMismatch,
    NotAGguf,
    SourceError,
    SourceForbidden,
    SourceNotFound,
    SourceUnauthorized,
    SourceUnreachable,
    cache_key,
    redact_url,
    resolve,
    shard_names,
)
from tests.fakehub import FakeHub, write_gguf

REPO = "acme/tiny-GGUF"
Settings = partial(OperatorSettings, source_egress_guard=False)  # the fake hub and servers listen on 127.0.0.1


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub().running() as running:
        yield running


@pytest.fixture
def model(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "m.gguf", tensors={"a": (10, 10), "b": (5,)}).read_bytes()


def hf_spec(file: str = "model.gguf", repo: str = REPO, **extra: Any) -> LlamaModelSpec:
    return LlamaModelSpec.model_validate({"source": {"huggingFace": {"repo": repo, "file": file}}, **extra})


async def test_hugging_face_file(hub: FakeHub, model: bytes) -> None:
    served = hub.add(REPO, "sub/model.gguf", model)
    resolved = await resolve(hf_spec("sub/model.gguf"), settings=Settings(huggingface_endpoint=hub.url),
                             hf_token=None, headers={})
    assert resolved.sha256 == served.sha256 and resolved.size == len(model)
    assert [f.name for f in resolved.files] == ["model.gguf"]
    assert resolved.files[0].url == f"{hub.url}/{REPO}/resolve/main/sub/model.gguf"
    assert resolved.gguf is not None and resolved.gguf.parameter_count == 105
    assert resolved.gguf.architecture == "llama" and resolved.gguf.file_type == "Q4_K_M"
    assert resolved.cache_key == cache_key(hf_spec("sub/model.gguf"), served.sha256)
    heads = [r for r in hub.requests if r.method == "HEAD"]
    assert len(heads) == 1 and heads[0].path.startswith(f"/{REPO}/resolve/")  # the redirect was not followed


async def test_user_sha256_must_match_the_hub(hub: FakeHub, model: bytes) -> None:
    served = hub.add(REPO, "model.gguf", model)
    settings = Settings(huggingface_endpoint=hub.url)
    ok = await resolve(hf_spec(sha256=served.sha256), settings=settings, hf_token=None, headers={})
    assert ok.sha256 == served.sha256
    with pytest.raises(ChecksumMismatch, match="the source publishes " + served.sha256):
        await resolve(hf_spec(sha256="a" * 64), settings=settings, hf_token=None, headers={})


@pytest.mark.parametrize(
    ("token", "error", "message", "reason"),
    [(None, SourceUnauthorized, "tokenSecretRef", "Unauthorized"), ("wrong", SourceForbidden, "refused", "Forbidden")],
)
async def test_gated_repository(hub: FakeHub, model: bytes, token: str | None, error: type, message: str,
                                reason: str) -> None:
    hub.add("acme/gated", "model.gguf", model, gated=True)
    settings = Settings(huggingface_endpoint=hub.url)
    with pytest.raises(error, match=message) as info:
        await resolve(hf_spec(repo="acme/gated"), settings=settings, hf_token=token, headers={})
    # The same class, reason and exit code as the fetcher's for the same answer (errors.py).
    assert info.value.reason == reason and not info.value.transient
    assert isinstance(info.value, SourceUnauthorized)
    assert "wrong" not in str(info.value)
    resolved = await resolve(hf_spec(repo="acme/gated"), settings=settings, hf_token=hub.token, headers={})
    assert resolved.gguf is not None
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert cdn and all(r.authorization is None for r in cdn)  # the token never leaves the hub's origin


async def test_not_found_not_gguf_unreachable(hub: FakeHub, model: bytes) -> None:
    settings = Settings(huggingface_endpoint=hub.url)
    with pytest.raises(SourceNotFound, match="EntryNotFound"):
        hub.add(REPO, "model.gguf", model)
        await resolve(hf_spec("other.gguf"), settings=settings, hf_token=None, headers={})
    hub.add(REPO, "page.gguf", b"<html>" + b"x" * 100)
    with pytest.raises(NotAGguf, match="not a GGUF"):
        await resolve(hf_spec("page.gguf"), settings=settings, hf_token=None, headers={})
    flaky = hub.add(REPO, "flaky.gguf", model)
    flaky.faults.fail, flaky.faults.retry_after = 1, 7
    with pytest.raises(SourceUnreachable) as info:
        await resolve(hf_spec("flaky.gguf"), settings=settings, hf_token=None, headers={})
    assert info.value.transient and info.value.retry_after == 7
    with pytest.raises(SourceUnreachable):
        await resolve(hf_spec(), settings=Settings(huggingface_endpoint="http://127.0.0.1:9"), hf_token=None,
                      headers={})


async def test_split_model_expands_to_every_shard(hub: FakeHub, tmp_path: Path) -> None:
    names = [f"big-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    shards = [
        hub.add(REPO, name, write_gguf(tmp_path / name, tensors={f"t{i}": (10, i + 1)}, split=(i, 3)).read_bytes())
        for i, name in enumerate(names)
    ]
    resolved = await resolve(hf_spec(names[0]), settings=Settings(huggingface_endpoint=hub.url), hf_token=None,
                             headers={})
    assert [f.name for f in resolved.files] == names
    assert [f.sha256 for f in resolved.files] == [s.sha256 for s in shards]
    assert resolved.size == sum(s.size for s in shards)
    assert resolved.gguf is not None and resolved.gguf.parameter_count == 10 * (1 + 2 + 3)


async def test_plain_url_with_headers(hub: FakeHub, model: bytes) -> None:
    hub.add_plain("m.gguf", model)
    hub.required_headers = {"X-Api-Key": "k3y"}
    spec = LlamaModelSpec.model_validate({"source": {"http": {"url": f"{hub.url}/plain/m.gguf"}}})
    with pytest.raises(SourceUnauthorized, match="headersSecretRef"):
        await resolve(spec, settings=Settings(), hf_token=None, headers={})
    resolved = await resolve(spec, settings=Settings(), hf_token=None, headers={"X-Api-Key": "k3y"})
    assert resolved.size == len(model) and resolved.sha256 is None
    assert resolved.gguf is not None and resolved.gguf.parameter_count == 105


async def test_secret_headers_are_not_sent_to_another_origin(hub: FakeHub, model: bytes) -> None:
    hub.add_plain("m.gguf", model)
    spec = LlamaModelSpec.model_validate({"source": {"http": {"url": f"{hub.url}/moved/m.gguf"}}})
    resolved = await resolve(spec, settings=Settings(), hf_token=None, headers={"X-Api-Key": "k3y"})
    assert resolved.gguf is not None and resolved.size == len(model)
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert cdn and all("x-api-key" not in r.header_names for r in cdn)


async def test_volume_source_needs_no_network() -> None:
    spec = LlamaModelSpec.model_validate(
        {"source": {"volume": {"persistentVolumeClaim": "models", "path": "q/m-00001-of-00002.gguf"}}}
    )
    resolved = await resolve(spec, settings=Settings(huggingface_endpoint="http://127.0.0.1:9"), hf_token=None,
                             headers={})
    assert [f.name for f in resolved.files] == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
    assert resolved.size is None and resolved.gguf is None and resolved.sha256 is None


def test_cache_key_is_a_readable_deterministic_dns_label() -> None:
    spec = hf_spec("Qwen2.5-0.5B-Instruct-Q4_K_M-00001-of-00002.gguf", repo="Qwen/Qwen2.5-GGUF")
    key = cache_key(spec, None)
    assert key.startswith("qwen2-5-0-5b-instruct-q4-k-m-")
    assert re.match(DNS_LABEL, key) and len(key) <= 63
    assert key == cache_key(spec, None)
    assert cache_key(spec, "a" * 64) != key  # content sha256 wins over the source identity
    other_revision = hf_spec("Qwen2.5-0.5B-Instruct-Q4_K_M-00001-of-00002.gguf", repo="Qwen/Qwen2.5-GGUF")
    assert cache_key(other_revision, "a" * 64) == cache_key(spec, "a" * 64)  # same bytes, same directory
    long = cache_key(hf_spec("x" * 80 + ".gguf"), None)
    assert re.match(DNS_LABEL, long) and len(long) == 40 + 1 + 12
    assert re.match(DNS_LABEL, cache_key(hf_spec("___.gguf"), None))


def test_helpers() -> None:
    assert shard_names("d/m-00002-of-00003.gguf") == [f"d/m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert shard_names("m.gguf") == ["m.gguf"]
    assert redact_url("https://user:pw@cdn.example:8443/a/b.gguf?X-Amz-Signature=s#f") == (
        "https://cdn.example:8443/a/b.gguf"
    )
    assert issubclass(SourceUnreachable, SourceError) and SourceUnreachable.transient
