"""A router-mode llama-server started with an API key (spec.apiKeySecretRef), the pinned binary: only /health is
public, so the operator's status poller and the gateway's own calls (/models, /models/load|unload) send the key.

Measured on the pinned build: without the key /models, /v1/models, /props, /slots, /metrics, /models/load and
/models/unload answer 401 and /health 200; with `Authorization: Bearer <key>` (or `X-Api-Key`) /models answers 200.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaModel, LlamaServer
from llama_operator.builders.router import PRESET_PATH, ROUTER_ROOT, build_preset, router_args
from llama_operator.config import Settings
from llama_operator.gateway.room import MemoryKeeper, RoomError, auth_headers
from llama_operator.kube import LLAMA_SERVERS, PODS, SECRETS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.router_status import ModelStatusPoller

from ..conftest import model_body
from ..fakekube import Events, FakeKube
from ..llama_bin import free_port, on_loopback, serving
from ..tiny_gguf import write_tiny_llama
from ..watch_cache import watched_over

KEY = "router-test-key"
SPEC = {"models": [{"modelRef": {"name": "alpha"}, "contextSize": 256, "loadOnStartup": True},
                   {"modelRef": {"name": "beta"}, "contextSize": 256}],
        "threads": 1, "apiKeySecretRef": {"name": "fleet-key", "key": "api-key"}}


def _body() -> dict[str, Any]:
    return {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer",
            "metadata": {"name": "fleet", "namespace": "default", "generation": 1, "uid": "uid-fleet"}, "spec": SPEC}


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("router-key")
    models = {}
    for seed, name in enumerate(("alpha", "beta")):
        write_tiny_llama(root / "shelf" / f"{name}.gguf", seed=seed)
        spec = {"source": {"volume": {"persistentVolumeClaim": "shelf", "path": f"{name}.gguf"}}}
        status = {"phase": "Ready", "cacheKey": f"{name}-0", "files": [{"name": f"{name}.gguf"}]}
        models[name] = LlamaModel.model_validate(model_body(name, spec=spec, status=status))
    server = LlamaServer.model_validate(_body())
    preset = build_preset(server, models, Settings())
    (root / "models.ini").write_text(preset.replace(f"{ROUTER_ROOT}/model-source-0", str(root / "shelf")))
    args, port = on_loopback(router_args(server))
    args[args.index(PRESET_PATH)] = str(root / "models.ini")
    # The pod gets the key from the Secret in LLAMA_API_KEY (builders/pod.py); here as the flag.
    with serving([*args, "--api-key", KEY], port, workdir=root, env={"HOME": str(root)}, timeout=30) as (url, _):
        yield url, port


def test_only_health_is_public(router: tuple[str, int]) -> None:
    url, _ = router
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    for path in ("/models", "/v1/models", "/props"):
        assert httpx.get(f"{url}{path}", timeout=5).status_code == 401, path
        assert httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200
        assert httpx.get(f"{url}{path}", headers={"X-Api-Key": KEY}, timeout=5).status_code == 200
    assert httpx.post(f"{url}/models/load", json={"model": "beta"}, timeout=5).status_code == 401


def _poller(port: int, secret: dict[str, Any] | None) -> tuple[FakeKube, ModelStatusPoller]:
    kube = FakeKube()
    kube.put(LLAMA_SERVERS, _body())
    kube.put(PODS, {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "fleet-0", "labels": {"app.kubernetes.io/name": "llama-server",
                                                               "llamacpp.dev/server": "fleet"}},
                    "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}})
    if secret is not None:
        kube.put(SECRETS, {"apiVersion": "v1", "kind": "Secret",
                           "metadata": {"name": "fleet-key", "namespace": "default"},
                           "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}})
    ctx = Context(kube=kube, settings=Settings(), record_event=Events(), watched=watched_over(kube))
    return kube, ModelStatusPoller(ctx, port=port, timeout=5)


def _models(kube: FakeKube) -> list[dict[str, Any]]:
    return list((kube.objects[("llamaservers", "default", "fleet")].get("status") or {})["models"])


async def test_the_status_poller_reads_models_with_the_key_from_the_secret(router: tuple[str, int]) -> None:
    _, port = router
    kube, poller = _poller(port, {"api-key": KEY})
    try:
        await poller.poll_once()
    finally:
        await poller.close()
    models = _models(kube)
    assert {m["name"]: m["state"] for m in models}["alpha"] == "Loaded"
    assert all("message" not in m for m in models), models


async def test_a_wrong_or_missing_key_is_said_in_status(router: tuple[str, int]) -> None:
    _, port = router
    kube, poller = _poller(port, {"api-key": "not-the-key"})
    try:
        await poller.poll_once()
    finally:
        await poller.close()
    assert all("HTTP 401: the pod refused the API key of spec.apiKeySecretRef" in m["message"] for m in _models(kube))
    kube, poller = _poller(port, None)
    try:
        await poller.poll_once()
    finally:
        await poller.close()
    assert all("Secret default/fleet-key, key 'api-key' (spec.apiKeySecretRef) is missing" in m["message"]
               for m in _models(kube))


# ------------------------------------------------ the gateway's own calls: unload+save, load+restore, with the key

PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
SLOT_KEYS = {"a": "0123456789abcdef", "b": "fedcba9876543210"}


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """A router with an API key whose models keep their slots (a slot-save-path each, as the preset writes it)."""
    root = tmp_path_factory.mktemp("router-key-slots")
    slots = root / "slots"
    for seed, (name, key) in enumerate(SLOT_KEYS.items()):
        write_tiny_llama(root / f"{name}.gguf", seed=seed)
        (slots / key).mkdir(parents=True)
    (root / "models.ini").write_text("".join(
        f"[{n}]\nmodel = {root / n}.gguf\nctx-size = 4096\nparallel = 2\nslot-save-path = {slots / key}\n"
        for n, key in SLOT_KEYS.items()))
    port = free_port()
    args = ["--models-preset", str(root / "models.ini"), "--host", "127.0.0.1", "--port", str(port),
            "--threads", "2", "--models-max", "2", "--api-key", KEY]
    with serving(args, port, workdir=root, env={"HOME": str(root)}, timeout=30) as (url, _):
        yield url, slots


def _turn(url: str, model: str, prompt: str) -> dict[str, float]:
    reply = httpx.post(f"{url}/completion", json={"model": model, "prompt": prompt, "n_predict": 4,
                                                  "temperature": 0, "cache_prompt": True},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert reply.status_code == 200, reply.text
    return dict(reply.json()["timings"])


async def _unload_and_load(url: str, model: str, auth: dict[str, str] | None) -> None:
    keeper = MemoryKeeper()
    async with aiohttp.ClientSession() as session:
        await keeper.unload(session, url, model, slots=True, auth=auth)
        await keeper.load(session, url, model, None, {}, slots=True, auth=auth)


def test_the_gateways_unload_and_load_keep_the_conversation_with_the_requesters_key(kept: tuple[str, Any]) -> None:
    url, slots = kept
    _turn(url, "a", PROMPT)
    with pytest.raises(RoomError) as refused:  # without the key: 401, said as such (not a failed replica)
        asyncio.run(_unload_and_load(url, "a", None))
    assert refused.value.status == 401 and not refused.value.replica_failed
    # The client's own header, as the gateway passes it on (room.auth_headers): X-Api-Key works as well.
    asyncio.run(_unload_and_load(url, "a", auth_headers({"X-Api-Key": KEY, "Content-Type": "application/json"})))
    second = _turn(url, "a", PROMPT + " and then the dog sleeps")
    print(f"with the key: second turn after the gateway's unload+load: cache_n={second['cache_n']} "
          f"prompt_n={second['prompt_n']}")
    assert second["cache_n"] >= 500 and second["prompt_n"] < 20, second
    assert {f.name for f in (slots / SLOT_KEYS["a"]).iterdir()} == {"a-0.slot", "a-1.slot"}
