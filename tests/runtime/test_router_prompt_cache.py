"""The kept prompt caches of a router-mode server (spec.models with promptCache.persist) with the pinned
llama-server router and two tiny models made here: the gateway's unload saves the model's slots through the
router (`POST /slots/<i>?action=save`, the body's model picking the instance) into that model's own
`slot-save-path` (the preset's, as builders/router.py writes it), its load restores them, and the next turn of
the same conversation after the model was unloaded and loaded again is served from the cache; without the
feature it pays the whole prefill. The drain sidecar of a stopping router pod (`llama-operator drain
--model-keys`) saves every loaded model's slots the same way, and the gateway's load on the next pod restores
them. Files never cross models: each model saves into and restores from its own directory only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import aiohttp
import httpx
import pytest

from llama_operator.contract import DRAIN_PATH
from llama_operator.gateway.app import GatewayConfig
from llama_operator.gateway.room import MemoryKeeper

from ..gateway_thread import gateway_in_thread
from ..llama_bin import drain_sidecar, free_port, serving
from ..tiny_gguf import write_tiny_llama

PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
"""About 700 tokens of the tiny model's vocabulary: a first turn."""
KEYS = {"a": "0123456789abcdef", "b": "fedcba9876543210"}


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("router-slots")
    for seed, name in enumerate(KEYS):
        write_tiny_llama(root / f"{name}.gguf", seed=seed)
    return root


@contextmanager
def _router(root: Path, slots: Path, models_max: int = 2) -> Iterator[str]:
    for key in KEYS.values():
        (slots / key).mkdir(parents=True, exist_ok=True)
    (root / "models.ini").write_text("".join(
        f"[{n}]\nmodel = {root / n}.gguf\nctx-size = 4096\nparallel = 2\nslot-save-path = {slots / key}\n"
        for n, key in KEYS.items()))
    port = free_port()
    args = ["--models-preset", str(root / "models.ini"), "--host", "127.0.0.1", "--port", str(port),
            "--threads", "2", "--models-max", str(models_max), "--metrics"]
    with serving(args, port, workdir=root, env={"HOME": str(root)}, timeout=30) as (url, _):
        yield url


def _turn(url: str, model: str, prompt: str) -> dict[str, float]:
    reply = httpx.post(f"{url}/completion", json={"model": model, "prompt": prompt, "n_predict": 4,
                                                  "temperature": 0, "cache_prompt": True}, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["timings"]


async def _unload_and_load(url: str, model: str, slots: bool) -> None:
    keeper = MemoryKeeper()
    async with aiohttp.ClientSession() as session:
        await keeper.unload(session, url, model, slots=slots)
        await keeper.load(session, url, model, None, {}, slots=slots)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "not-kept"])
def test_a_conversation_survives_its_models_unload(shelf: Path, tmp_path: Path, keep: bool) -> None:
    slots = tmp_path / "slots"
    with _router(shelf, slots) as url:
        first = _turn(url, "a", PROMPT)
        assert first["cache_n"] == 0, first
        _turn(url, "b", PROMPT)  # the other model holds a conversation too
        asyncio.run(_unload_and_load(url, "a", keep))
        second = _turn(url, "a", PROMPT + " and then the dog sleeps")
    print(f"keep={keep}: second turn after unload+load: cache_n={second['cache_n']} prompt_n={second['prompt_n']}")
    if keep:
        assert second["cache_n"] >= 500 and second["prompt_n"] < 20, second
        assert {f.name for f in (slots / KEYS["a"]).iterdir()} == {"a-0.slot", "a-1.slot"}
        assert list((slots / KEYS["b"]).iterdir()) == []  # b was not unloaded: nothing saved for it
    else:
        assert second["cache_n"] == 0, second
        assert list((slots / KEYS["a"]).iterdir()) == []


def test_a_restore_never_crosses_models(shelf: Path, tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    with _router(shelf, slots) as url:
        _turn(url, "a", PROMPT)
        asyncio.run(_unload_and_load(url, "a", True))  # a's slots saved in a's directory
        asyncio.run(_unload_and_load(url, "b", True))  # b's load finds nothing of its own to restore
        turn = _turn(url, "b", PROMPT)
    assert turn["cache_n"] == 0, turn
    assert {f.name for f in (slots / KEYS["b"]).iterdir()} <= {"b-0.slot", "b-1.slot"}


def _sidecar(url: str, slots: Path, workdir: Path) -> AbstractContextManager[str]:
    return drain_sidecar(url, slots, workdir, hostname="fleet-7d9f-abcde", model_keys=list(KEYS.values()))


async def _load(url: str, model: str) -> None:
    async with aiohttp.ClientSession() as session:
        await MemoryKeeper().load(session, url, model, None, {}, slots=True)


def test_a_drained_router_pods_conversations_come_back_when_the_gateway_loads_the_model(
        shelf: Path, tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    with _router(shelf, slots) as url, _sidecar(url, slots, tmp_path) as sidecar:
        _turn(url, "a", PROMPT)
        outcome = httpx.get(f"{sidecar}{DRAIN_PATH}", timeout=60).text
    assert "saved 1 slot(s) of 1 loaded model(s)" in outcome, outcome
    assert {f.name for f in (slots / KEYS["a"]).iterdir()} == {"a-0.slot", "a-1.slot"}  # b was not loaded
    second = PROMPT + " and then the dog sleeps"
    with _router(shelf, slots) as url:  # the next pod; the request loads the model itself: nothing restored
        cold = _turn(url, "a", second)
    with _router(shelf, slots) as url:  # the next pod; the gateway loads the model and restores its slots
        asyncio.run(_load(url, "a"))
        warm = _turn(url, "a", second)
    print(f"after a pod stop: cold cache_n={cold['cache_n']}, restored cache_n={warm['cache_n']} "
          f"prompt_n={warm['prompt_n']}")
    assert cold["cache_n"] == 0, cold
    assert warm["cache_n"] >= 500 and warm["prompt_n"] < 20, warm


def _chat(base: str, model: str, content: str) -> dict[str, float]:
    answer = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()["timings"]


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "not-kept"])
def test_through_the_gateway_two_models_taking_turns_keep_their_conversations(
        shelf: Path, tmp_path: Path, keep: bool) -> None:
    """One model loaded at a time (maxLoaded 1): each request for the other one evicts the first. With the kept
    caches the gateway saves the evicted model's slots, loads the other one and restores its own; without them
    llama-server evicts and loads on the request, and every turn starts cold."""
    spec: dict = {"models": [{"modelRef": {"name": n}} for n in KEYS], "maxLoaded": 1}
    if keep:
        spec["promptCache"] = {"persist": True}
    server = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer",
              "metadata": {"namespace": "static", "name": "fleet"}, "spec": spec}
    slots = tmp_path / "slots"
    with _router(shelf, slots, models_max=1) as router, gateway_in_thread(GatewayConfig(
            listen="127.0.0.1:0", admin="127.0.0.1:0", autoscale=False, static={"fleet": [router]}),
            servers=[server]) as gateway:
        _chat(gateway, "a", PROMPT)
        _chat(gateway, "b", PROMPT + " in the other model")
        back = _chat(gateway, "a", PROMPT + " and then the dog sleeps")
    print(f"keep={keep}: a's second turn after b took its place: cache_n={back['cache_n']} "
          f"prompt_n={back['prompt_n']}")
    if keep:  # the new words with the chat template's tokens around them are what is prefilled
        assert back["cache_n"] >= 500 and back["prompt_n"] < 100, back
    else:
        assert back["cache_n"] == 0, back
