"""LoRA adapters through the real gateway: `<model>:<adapter>` is that adapter applied by the pinned llama-server.

One real llama-server of the tiny test model (tests/tiny_gguf.py) with two tiny LoRA adapters of it
(tests/tiny_lora.py), started with the arguments the operator renders for spec.adapters (render_args), behind
the gateway app in-process (no cluster). With greedy sampling and a fixed number of tokens, a request for
`tiny:<adapter>` through the gateway answers what the replica answers directly to the `lora` field of that
adapter's index and scale, a request for `tiny` what the base model answers (every adapter at scale 0), and the
three answers differ from each other: the gateway picked the right adapter, at the right scale, and the operator
loaded them in spec.adapters' order without applying any.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaServerSpec
from llama_operator.flags.render import render_args
from llama_operator.gateway.app import GatewayConfig

from ..gateway_thread import gateway_in_thread
from ..llama_bin import on_loopback, serving
from ..tiny_gguf import write_tiny_llama
from ..tiny_lora import write_tiny_lora

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MODEL = "tiny"
ADAPTERS = [{"name": "pirate"}, {"name": "legal", "scale": 0.5}]
"""spec.adapters: llama-server's adapter ids are their indexes, 0 and 1."""
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}

REQUESTS = {
    "/v1/completions": ({"prompt": "hello there"}, lambda answer: answer["choices"][0]["text"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hello there"}]},
                             lambda answer: answer["choices"][0]["message"]["content"]),
}


@dataclass
class Stack:
    gateway: str
    replica: str

    def text(self, path: str, model: str, *, direct: bool = False, **extra: Any) -> str:
        """The generated text for `model` through the gateway (or straight from the replica), 200 asserted."""
        fields, read = REQUESTS[path]
        reply = httpx.post((self.replica if direct else self.gateway) + path,
                           json={"model": model, **fields, **GREEDY, **extra}, timeout=60)
        assert reply.status_code == 200, (path, model, extra, reply.status_code, reply.text[:300])
        return str(read(reply.json()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("adapters")
    model = write_tiny_llama(root / "tiny.gguf", chat_template=TEMPLATE)
    paths = [str(write_tiny_lora(root / f"{a['name']}.gguf", seed=index + 1)) for index, a in enumerate(ADAPTERS)]
    # One slot: every request meets the prompt cache of the one before (what the base-model tests are about).
    spec_fields = {"modelRef": {"name": MODEL}, "contextSize": 1024, "parallel": 1, "mode": "chat",
                   "adapters": ADAPTERS}
    spec = LlamaServerSpec.model_validate(spec_fields)
    args, port = on_loopback(render_args(spec, model_path=str(model), model_name=MODEL, threads=2,
                                         adapter_paths=paths))
    server = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer",
              "metadata": {"namespace": "static", "name": MODEL}, "spec": {**spec_fields, "replicas": 1}}
    with ExitStack() as stack:
        replica, _ = stack.enter_context(serving(args, port, workdir=root))
        # The static upstream gives the EndpointSlice; the LlamaServer object replaces its route with adapters.
        config = GatewayConfig(listen="127.0.0.1:0", admin="127.0.0.1:0", autoscale=False,
                               static={MODEL: [replica]})
        yield Stack(stack.enter_context(gateway_in_thread(config, servers=[server])), replica)


@pytest.mark.parametrize("path", list(REQUESTS))
def test_an_adapter_name_is_that_adapter_applied(stack: Stack, path: str) -> None:
    answers = {}
    for index, adapter in enumerate(ADAPTERS):
        name = f"{MODEL}:{adapter['name']}"
        answers[name] = stack.text(path, name)
        lora = [{"id": index, "scale": adapter.get("scale", 1.0)}]
        assert answers[name] == stack.text(path, MODEL, direct=True, lora=lora), name
    answers[MODEL] = stack.text(path, MODEL, direct=True, lora=[{"id": 0, "scale": 0.0}])  # the base model
    assert len(set(answers.values())) == 3, answers  # the adapters change the greedy answer, each its own way


BASE = [{"id": 0, "scale": 0.0}]
"""The base model, asked for explicitly (adapters not listed are at scale 0)."""


@pytest.mark.parametrize("path", list(REQUESTS))
def test_the_model_name_is_the_base_model_even_after_an_adapter(stack: Stack, path: str) -> None:
    base = stack.text(path, MODEL, direct=True, lora=BASE)
    # Every adapter loaded at scale 0: a request that names none on a fresh slot is the base model too.
    scales = [a["scale"] for a in httpx.get(f"{stack.replica}/lora-adapters", timeout=10).json()]
    assert scales == [0.0] * len(ADAPTERS), "llama-server applies adapters to requests that name none"
    stack.text(path, f"{MODEL}:pirate")  # the slot's prompt cache now holds the adapter's KV for this prompt
    assert stack.text(path, MODEL) == base


def test_llama_server_reuses_an_adapters_prompt_cache_for_a_request_without_lora(stack: Stack) -> None:
    """Why the gateway sends the base model's `lora` explicitly (gateway/adapters.py BASE): the pinned llama-server
    clears a slot's prompt cache when `lora` changes, but a request without `lora` after one with an adapter
    reuses the adapter's KV cache of the same prompt and answers otherwise than the base model; and since the slot
    then counts as the base model's, the next explicit base request keeps that cache too, until an adapter
    request changes `lora` again. So every request must say `lora` (docs/adapters.md). The day this fails,
    llama-server clears it itself and the explicit field may go."""
    path = "/v1/completions"
    base = stack.text(path, MODEL, direct=True, lora=BASE)
    stack.text(path, MODEL, direct=True, lora=[{"id": 0, "scale": 1.0}])
    assert stack.text(path, MODEL, direct=True) != base
    assert stack.text(path, MODEL, direct=True, lora=BASE) != base
    stack.text(path, MODEL, direct=True, lora=[{"id": 1, "scale": 1.0}])
    assert stack.text(path, MODEL, direct=True, lora=BASE) == base  # a change of `lora` clears the slot's cache


def test_the_model_name_passes_the_clients_own_lora_on(stack: Stack) -> None:
    path = "/v1/completions"
    assert stack.text(path, MODEL, lora=[{"id": 1, "scale": 0.5}]) == stack.text(path, f"{MODEL}:legal")


def test_models_lists_the_model_and_each_adapter(stack: Stack) -> None:
    listing = httpx.get(f"{stack.gateway}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listing] == [MODEL, f"{MODEL}:pirate", f"{MODEL}:legal"]
    assert {m["state"] for m in listing} == {"ready"}
    one = httpx.get(f"{stack.gateway}/v1/models/static/{MODEL}:legal", timeout=10)
    assert one.status_code == 200 and one.json()["id"] == f"{MODEL}:legal"


def test_an_adapter_request_with_its_own_lora_is_400(stack: Stack) -> None:
    fields, _ = REQUESTS["/v1/completions"]
    reply = httpx.post(f"{stack.gateway}/v1/completions", timeout=10,
                       json={"model": f"{MODEL}:pirate", **fields, **GREEDY, "lora": [{"id": 1, "scale": 1.0}]})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == ("lora", "invalid_lora")
    assert "names the adapter pirate" in error["message"] and "\n" not in error["message"]


def test_the_adapter_files_are_what_llama_server_loaded(stack: Stack) -> None:
    """The replica numbers the adapters in spec.adapters' order: id i is the i-th file."""
    loaded = httpx.get(f"{stack.replica}/lora-adapters", timeout=10).json()
    assert [(a["id"], Path(a["path"]).stem) for a in loaded] == [(i, a["name"]) for i, a in enumerate(ADAPTERS)]
