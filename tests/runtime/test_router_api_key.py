"""A router-mode llama-server started with an API key (spec.apiKeySecretRef), the pinned binary: only /health is
public, so the operator's status poller and the gateway's own calls (/models, /models/load|unload) send the key.

Measured on the pinned build: without the key /models, /v1/models, /props, /slots, /metrics, /models/load and
/models/unload answer 401 and /health 200; with `Authorization: Bearer <key>` (or `X-Api-Key`) /models answers 200.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaModel, LlamaServer
from llama_operator.builders.router import PRESET_PATH, ROUTER_ROOT, build_preset, router_args
from llama_operator.config import Settings
from llama_operator.kube import LLAMA_SERVERS, PODS, SECRETS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.router_status import ModelStatusPoller

from ..conftest import model_body
from ..fakekube import Events, FakeKube
from ..llama_bin import on_loopback, serving
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
