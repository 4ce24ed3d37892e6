"""LlamaModel spec.mmproj: resolved and verified like the weights (fake hub), fetched by its own init container,
given to llama-server as --mmproj; the same in router mode."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from llama_operator.api.v1beta1 import LlamaModel, LlamaModelSpec, LlamaServer
from llama_operator.builders import build_deployment
from llama_operator.config import Settings as OperatorSettings
from llama_operator.reconcile.model import offline_status
from llama_operator.sources import ChecksumMismatch, NotAGguf, SourceError, resolve
from tests import crdschema
from tests.conftest import model_body
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama
from tests.tiny_mmproj import write_tiny_mmproj

Settings = partial(OperatorSettings, source_egress_guard=False)  # the fake hub and servers listen on 127.0.0.1

REPO = "acme/vision-GGUF"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, bytes]:
    return {"model": write_tiny_llama(tmp_path / "m.gguf").read_bytes(),
            "mmproj": write_tiny_mmproj(tmp_path / "p.gguf").read_bytes()}


@pytest.fixture
def hub(files: dict[str, bytes]) -> Iterator[FakeHub]:
    with FakeHub().running() as running:
        running.add(REPO, "model-Q4.gguf", files["model"])
        running.add(REPO, "mmproj/mmproj-f16.gguf", files["mmproj"])
        running.add(REPO, "other-model.gguf", files["model"])
        running.add_plain("model.gguf", files["model"])
        running.add_plain("mmproj.gguf", files["mmproj"])
        yield running


def _spec(source: dict[str, Any], **mmproj: Any) -> LlamaModelSpec:
    return LlamaModelSpec.model_validate({"source": source, "mmproj": mmproj})


HF = {"huggingFace": {"repo": REPO, "file": "model-Q4.gguf"}}


async def test_a_hub_projector_is_resolved_with_its_published_sha256(hub: FakeHub, files: dict[str, bytes]) -> None:
    resolved = await resolve(_spec(HF, file="mmproj/mmproj-f16.gguf"), settings=Settings(huggingface_endpoint=hub.url),
                             hf_token=None, headers={})
    assert resolved.mmproj is not None
    assert resolved.mmproj.name == "mmproj-f16.gguf"
    assert resolved.mmproj.sha256 == hashlib.sha256(files["mmproj"]).hexdigest()
    assert resolved.mmproj.size == len(files["mmproj"])
    assert resolved.mmproj.url == f"{hub.url}/{REPO}/resolve/main/mmproj/mmproj-f16.gguf"
    # The weights are what they were: the projector does not change the cache key.
    without = await resolve(LlamaModelSpec.model_validate({"source": HF}),
                            settings=Settings(huggingface_endpoint=hub.url), hf_token=None, headers={})
    assert resolved.cache_key == without.cache_key


async def test_a_projector_that_is_not_one_is_refused(hub: FakeHub) -> None:
    settings = Settings(huggingface_endpoint=hub.url)
    with pytest.raises(NotAGguf, match="general.architecture is 'llama', not a multimodal projector"):
        await resolve(_spec(HF, file="other-model.gguf"), settings=settings, hf_token=None, headers={})
    with pytest.raises(ChecksumMismatch, match="spec.mmproj.sha256 is"):
        await resolve(_spec(HF, file="mmproj/mmproj-f16.gguf", sha256="0" * 64), settings=settings, hf_token=None,
                      headers={})
    with pytest.raises(SourceError, match="is a file of the model itself"):
        await resolve(_spec(HF, file="model-Q4.gguf"), settings=settings, hf_token=None, headers={})


async def test_a_plain_url_projector_is_next_to_the_model_and_needs_a_sha256(hub: FakeHub,
                                                                            files: dict[str, bytes]) -> None:
    source = {"http": {"url": f"{hub.url}/plain/model.gguf"}}
    with pytest.raises(SourceError, match="publishes no sha256 for the projector; set spec.mmproj.sha256"):
        await resolve(_spec(source, file="mmproj.gguf"), settings=Settings(), hf_token=None, headers={})
    sha = hashlib.sha256(files["mmproj"]).hexdigest()
    resolved = await resolve(_spec(source, file="mmproj.gguf", sha256=sha), settings=Settings(), hf_token=None,
                             headers={})
    assert resolved.mmproj is not None and resolved.mmproj.url == f"{hub.url}/plain/mmproj.gguf"
    assert resolved.mmproj.sha256 == sha


async def test_a_volume_projector_is_a_path_in_the_same_volume() -> None:
    spec = _spec({"volume": {"persistentVolumeClaim": "shelf", "path": "g/model.gguf"}}, file="g/mmproj.gguf")
    resolved = await resolve(spec, settings=Settings(), hf_token=None, headers={})
    assert resolved.mmproj is not None and (resolved.mmproj.name, resolved.mmproj.url) == ("mmproj.gguf", None)


def _ready(spec: dict[str, Any], mmproj: dict[str, Any]) -> LlamaModel:
    status = {"phase": "Ready", "cacheKey": "model-q4-0123456789ab", "sha256": "a" * 64,
              "files": [{"name": "model-Q4.gguf"}], "mmproj": mmproj}
    return LlamaModel.model_validate(model_body("vision", spec=spec, status=status))


def _pod(model: LlamaModel, **spec: Any) -> dict[str, Any]:
    server = LlamaServer.model_validate({"metadata": {"name": "v", "namespace": "default"},
                                         "spec": {"modelRef": {"name": "vision"}, **spec}})
    return build_deployment(server, model, Settings())["spec"]["template"]["spec"]


def test_the_projector_has_its_own_verified_fetch_and_reaches_llama_server() -> None:
    model = _ready({"source": HF, "mmproj": {"file": "mmproj/mmproj-f16.gguf"}},
                   {"name": "mmproj-f16.gguf", "sha256": "b" * 64, "url": "https://hub/x"})
    pod = _pod(model)
    fetch, fetch_mmproj, drain = pod["initContainers"]
    assert drain["name"] == "drain"
    assert fetch_mmproj["name"] == "fetch-mmproj"
    assert fetch_mmproj["args"] == ["fetch", "--cache-dir", "/models", "--cache-key", "model-q4-0123456789ab",
                                    "--hf-repo", REPO, "--hf-file", "mmproj/mmproj-f16.gguf", "--hf-revision", "main",
                                    "--hf-endpoint", "https://huggingface.co", "--sha256", "b" * 64]
    assert fetch_mmproj["volumeMounts"] == fetch["volumeMounts"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--mmproj") + 1] == "/models/model-q4-0123456789ab/mmproj-f16.gguf"
    assert args[args.index("--model") + 1] == "/models/model-q4-0123456789ab/model-Q4.gguf"


def test_a_plain_url_projector_is_fetched_from_its_resolved_url() -> None:
    model = _ready({"source": {"http": {"url": "https://files.example/m/model-Q4.gguf"}},
                    "mmproj": {"file": "mmproj.gguf", "sha256": "c" * 64}},
                   {"name": "mmproj.gguf", "sha256": "c" * 64, "url": "https://files.example/m/mmproj.gguf"})
    fetch_mmproj = _pod(model)["initContainers"][1]
    assert fetch_mmproj["args"][5:] == ["--url", "https://files.example/m/mmproj.gguf", "--sha256", "c" * 64]
    # The model has a published sha256 here; the projector is never trusted on first use either way.
    assert all(e["name"] != "LLAMA_FETCH_TRUSTED_SHA256" for e in fetch_mmproj["env"])


def test_a_volume_projector_needs_no_fetch() -> None:
    model = _ready({"source": {"volume": {"persistentVolumeClaim": "shelf", "path": "g/model.gguf"}},
                    "mmproj": {"file": "g/mmproj.gguf"}}, {"name": "mmproj.gguf"})
    pod = _pod(model)
    assert [c["name"] for c in pod["initContainers"]] == ["drain"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--mmproj") + 1] == "/model-source/g/mmproj.gguf"


def test_offline_render_knows_where_the_projector_comes_from() -> None:
    model = LlamaModel.model_validate(model_body("vision", spec={"source": HF, "mmproj": {"file": "p/mm.gguf"}}))
    status = offline_status(model, Settings())
    assert status.mmproj is not None
    assert status.mmproj.name == "mm.gguf"
    assert status.mmproj.url == "https://huggingface.co/acme/vision-GGUF/resolve/main/p/mm.gguf"


@pytest.mark.parametrize(("mmproj", "message"), [
    ({"file": "/abs/mmproj.gguf"},
     "spec.mmproj.file: must be a relative path inside the repository or volume, without '..'"),
    ({"file": "mmproj.bin"},
     "spec.mmproj.file: must name a .gguf file (for a split model, its first shard: name-00001-of-0000N.gguf)"),
])
def test_a_bad_projector_file_is_refused_by_the_schema(mmproj: dict[str, Any], message: str) -> None:
    body = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaModel", "metadata": {"name": "x"},
            "spec": {"source": HF, "mmproj": mmproj}}
    assert crdschema.errors(body) == [message]
