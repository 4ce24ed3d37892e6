"""Every inference endpoint of the pinned llama-server, called through the real gateway by model.

Three real llama-servers of the tiny test model, each in the mode the operator renders (`mode: chat` with a chat
template, `mode: embedding`, `mode: rerank`), behind the gateway app in-process with static routes (no cluster):
each endpoint answers through the gateway what the replica answers directly (the same vector, scores and token
counts), and a streamed answer arrives as server-sent events. docs/gateway.md has the table of endpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaServerSpec
from llama_operator.gateway.app import GatewayConfig

from ..gateway_thread import gateway_in_thread
from ..tiny_gguf import N_EMBD, write_tiny_llama
from ..tiny_reranker import write_tiny_reranker
from .test_metrics_scrape import _start

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MESSAGES = [{"role": "user", "content": "hello there"}]
DOCUMENTS = ["a b c", "hello there", "zzz", "hello"]


@dataclass
class Stack:
    gateway: str
    direct: dict[str, str]
    """model name -> the replica's own URL."""

    def post(self, path: str, body: dict[str, Any], *, direct: bool = False) -> httpx.Response:
        base = self.direct[body["model"]] if direct else self.gateway
        return httpx.post(base + path, json=body, timeout=60)

    def both(self, path: str, body: dict[str, Any]) -> tuple[Any, Any]:
        """The JSON answer through the gateway and straight from the replica; both must be 200."""
        through, straight = self.post(path, body), self.post(path, body, direct=True)
        assert through.status_code == 200, (path, through.status_code, through.text[:300])
        assert straight.status_code == 200, (path, straight.status_code, straight.text[:300])
        return through.json(), straight.json()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("endpoints")
    chat_model = write_tiny_llama(root / "chat.gguf", chat_template=TEMPLATE)
    plain = write_tiny_llama(root / "plain.gguf")
    reranker = write_tiny_reranker(root / "reranker.gguf")
    # The tiny model's header names no pooling type (an embedding model's does): mean, as a user would set it.
    modes = {"chat": ("chat", chat_model, []), "embed": ("embedding", plain, ["--pooling", "mean"]),
             "rank": ("rerank", reranker, [])}
    with ExitStack() as stack:
        direct = {}
        for name, (mode, model, args) in modes.items():
            spec = LlamaServerSpec.model_validate({"modelRef": {"name": name}, "contextSize": 1024, "mode": mode,
                                                   "args": args})
            workdir = root / name
            workdir.mkdir()
            direct[name] = stack.enter_context(_start(spec, model, workdir)).url
        config = GatewayConfig(listen="127.0.0.1:0", admin="127.0.0.1:0", autoscale=False,
                               static={name: [url] for name, url in direct.items()})
        yield Stack(stack.enter_context(gateway_in_thread(config)), direct)


def test_chat_completions_stream_as_server_sent_events(stack: Stack) -> None:
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 6, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{stack.gateway}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert sum(1 for d in deltas if d) >= 2, chunks  # the answer came in pieces, not as one body
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" or any(
        c["choices"][0].get("finish_reason") == "length" for c in chunks if c.get("choices"))


def test_completions(stack: Stack) -> None:
    reply = stack.post("/v1/completions", {"model": "chat", "prompt": "hello", "max_tokens": 5,
                                           "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5


def test_embeddings_are_vectors_of_the_model_width(stack: Stack) -> None:
    through, straight = stack.both("/v1/embeddings", {"model": "embed", "input": ["hello", "a b c"]})
    vectors = [item["embedding"] for item in through["data"]]
    assert [len(v) for v in vectors] == [N_EMBD, N_EMBD]
    assert vectors == [item["embedding"] for item in straight["data"]]
    assert vectors[0] != vectors[1]


@pytest.mark.parametrize("path", ["/embedding", "/embeddings"])
def test_native_embedding(stack: Stack, path: str) -> None:
    through, straight = stack.both(path, {"model": "embed", "content": "hello"})
    assert through == straight
    assert len(through[0]["embedding"][0]) == N_EMBD


@pytest.mark.parametrize("path", ["/v1/rerank", "/v1/reranking", "/rerank", "/reranking"])
def test_rerank_scores_in_order(stack: Stack, path: str) -> None:
    """One score per document, best first, each the score that document gets alone from the replica (the tiny
    reranker's classifier head scores a pair the same whatever it is batched with)."""
    through, straight = stack.both(path, {"model": "rank", "query": "hello", "documents": DOCUMENTS})
    results = through["results"]
    assert results == straight["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(DOCUMENTS)
    assert all(0 < score < 1 for score in scores)
    for result in results:
        alone = stack.post(path, {"model": "rank", "query": "hello", "documents": [DOCUMENTS[result["index"]]]},
                           direct=True).json()["results"]
        assert alone[0]["relevance_score"] == pytest.approx(result["relevance_score"], abs=1e-5)


def test_anthropic_messages(stack: Stack) -> None:
    reply = stack.post("/v1/messages", {"model": "chat", "max_tokens": 4, "messages": MESSAGES})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["type"] == "message" and answer["role"] == "assistant"
    assert answer["content"][0]["type"] == "text" and answer["usage"]["output_tokens"] >= 1


def test_responses(stack: Stack) -> None:
    reply = stack.post("/v1/responses", {"model": "chat", "input": "hello there", "max_output_tokens": 4})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["usage"]["output_tokens"] >= 1


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages/count_tokens", {"messages": MESSAGES}),
    ("/v1/responses/input_tokens", {"input": "hello there"}),
    ("/v1/chat/completions/input_tokens", {"messages": MESSAGES}),
    ("/chat/completions/input_tokens", {"messages": MESSAGES}),
    ("/responses/input_tokens", {"input": "hello there"}),
])
def test_token_counts(stack: Stack, path: str, body: dict[str, Any]) -> None:
    through, straight = stack.both(path, {"model": "chat", **body})
    assert through["input_tokens"] == straight["input_tokens"] > 0


@pytest.mark.parametrize(("path", "body", "key"), [
    ("/completion", {"prompt": "hello", "n_predict": 3, "ignore_eos": True}, "tokens_predicted"),
    ("/completions", {"prompt": "hello", "n_predict": 3, "ignore_eos": True}, "tokens_predicted"),
    ("/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True}, "usage"),
    ("/responses", {"input": "hello", "max_output_tokens": 3}, "usage"),
    ("/tokenize", {"content": "hello there"}, "tokens"),
    ("/detokenize", {"tokens": [300, 301, 302]}, "content"),
    ("/apply-template", {"messages": MESSAGES}, "prompt"),
])
def test_native_paths(stack: Stack, path: str, body: dict[str, Any], key: str) -> None:
    through, straight = stack.both(path, {"model": "chat", **body})
    assert key in through
    if path in ("/tokenize", "/detokenize", "/apply-template"):
        assert through == straight


def test_infill_reaches_the_replica(stack: Stack) -> None:
    """The tiny model has no fill-in-the-middle tokens: llama-server's own 501 comes back through the gateway."""
    reply = stack.post("/infill", {"model": "chat", "input_prefix": "def f(", "input_suffix": ")"})
    assert reply.status_code == 501 and "Infill is not supported" in reply.text, reply.text


@pytest.mark.parametrize("path", ["/props", "/slots", "/slots/0", "/lora-adapters", "/models", "/models/load",
                                  "/metrics", "/tools", "/cors-proxy"])
def test_a_replicas_own_state_is_not_reachable(stack: Stack, path: str) -> None:
    reply = stack.post(path, {"model": "chat"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "not_found", reply.text


def test_transcriptions_are_refused_before_reading(stack: Stack) -> None:
    """multipart/form-data is what a web page may POST cross-origin without asking: only JSON is read."""
    reply = httpx.post(f"{stack.gateway}/v1/audio/transcriptions", timeout=30,
                       data={"model": "chat"}, files={"file": ("a.wav", b"RIFF")})
    assert reply.status_code == 415, reply.text
