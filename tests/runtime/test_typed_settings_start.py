"""Each typed LlamaServer setting (and a sample of combinations) renders args that START the real llama-server.

The tiny random-weight GGUF loads in a fraction of a second; a case passes when /health answers 200.
Every spec is validated first: what validate_server_spec accepts must start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaServerSpec
from llama_operator.flags.render import render_args
from llama_operator.flags.validate import validate_server_spec

from ..llama_bin import on_loopback, serving
from ..tiny_gguf import write_tiny_llama

DRAFT = {"draftModelRef": {"name": "draft"}}
CASES: dict[str, dict] = {
    "defaults": {},
    "contextSize": {"contextSize": 1024},
    "parallel": {"parallel": 2},
    "flashAttention": {"flashAttention": "on"},
    "cacheTypeK": {"cacheTypeK": "q8_0"},
    "cacheTypeV+fa": {"cacheTypeV": "q8_0", "flashAttention": "on"},
    "batchSize": {"batchSize": 256},
    "ubatchSize": {"ubatchSize": 128},
    "gpuLayers": {"gpuLayers": 0},
    "splitMode": {"splitMode": "none"},
    "threads": {"threads": 1},
    "alias": {"alias": "tiny"},
    "mode-embedding": {"mode": "embedding"},
    "mode-rerank": {"mode": "rerank"},
    "chatTemplate": {"chatTemplate": "chatml"},
    "loadMode": {"loadMode": "none"},
    "speculative": {"speculative": {**DRAFT, "draftMax": 4, "draftMin": 1, "draftPMin": 0.5}},
    "args": {"args": ["--top-k", "20", "--temp", "0.7", "--no-webui", "--jinja"]},
    "combo-chat": {"contextSize": 2048, "parallel": 4, "batchSize": 512, "ubatchSize": 256, "flashAttention": "on",
                   "cacheTypeK": "q8_0", "cacheTypeV": "q4_0", "threads": 2, "loadMode": "mmap"},
    "combo-embedding": {"mode": "embedding", "batchSize": 512, "contextSize": 1024, "args": ["--pooling", "mean"]},
    "combo-speculative": {"parallel": 2, "contextSize": 1024, "speculative": {**DRAFT, "draftMax": 8},
                          "args": ["--top-k", "1"]},
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny.gguf")


@contextlib.contextmanager
def _serving(fields: dict, model: Path, tmp_path: Path) -> Iterator[str]:
    """Start llama-server with the args rendered from `fields`; yield its URL once /health answers 200."""
    spec = LlamaServerSpec.model_validate({"modelRef": {"name": "tiny"}, **fields})
    assert validate_server_spec(spec) == []
    args = render_args(spec, model_path=str(model), model_name=spec.alias or "tiny", threads=spec.threads,
                       draft_model_path=str(model))
    # The pod listens on 0.0.0.0:8080; locally: loopback and a free port, everything else as rendered.
    args, port = on_loopback(args)
    with serving(args, port, workdir=tmp_path) as (url, _):
        yield url


@pytest.mark.parametrize("fields", list(CASES.values()), ids=list(CASES))
def test_rendered_args_start_llama_server(fields: dict, tiny_model: Path, tmp_path: Path):
    with _serving(fields, tiny_model, tmp_path):
        pass


@pytest.mark.parametrize(("name", "marker"), [("llama3", "<|start_header_id|>user<|end_header_id|>"),
                                              ("gemma", "<start_of_turn>user\n"), ("chatml", "<|im_start|>user\n")])
def test_a_builtin_chat_template_formats_the_prompt(name: str, marker: str, tiny_model: Path, tmp_path: Path):
    # The tiny GGUF has no template of its own; a named one must shape the prompt (with Jinja on, llama-server
    # took the name as the template's text and the whole prompt was the word itself).
    with _serving({"chatTemplate": name}, tiny_model, tmp_path) as url:
        prompt = httpx.post(f"{url}/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]},
                            timeout=10).json()["prompt"]
    assert marker in prompt and "Hi" in prompt, prompt
