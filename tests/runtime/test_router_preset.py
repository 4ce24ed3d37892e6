"""The preset the operator renders for spec.models, started by the real llama-server in router mode.

Three tiny models on one volume, maxLoaded 2: the first loads at start (loadOnStartup), each model instance
gets its own settings (the router reports every instance's arguments in /models), a request naming an
unloaded model loads it and stops the least recently used one, an idle model with idleUnloadSeconds sleeps.
The only change to what the builder writes is where the files are: the pod's /run/llama-server mounts are
directories of this test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaModel, LlamaServer
from llama_operator.builders.router import PRESET_PATH, ROUTER_ROOT, build_preset, router_args
from llama_operator.config import Settings
from llama_operator.reconcile.router_status import model_states

from ..conftest import model_body
from ..llama_bin import on_loopback, serving
from ..tiny_gguf import write_tiny_llama

SPEC = {
    "models": [
        {"modelRef": {"name": "alpha"}, "contextSize": 512, "loadOnStartup": True},
        {"modelRef": {"name": "beta"}, "alias": "bee", "contextSize": 1024, "parallel": 2, "chatTemplate": "llama3"},
        {"modelRef": {"name": "gamma"}, "contextSize": 256, "idleUnloadSeconds": 2, "flashAttention": "on",
         "cacheTypeK": "q8_0", "cacheTypeV": "q8_0"},
    ],
    "maxLoaded": 2,
    "threads": 1,
    "args": ["--top-k", "5"],
}


def _models(root: Path) -> dict[str, LlamaModel]:
    out = {}
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        write_tiny_llama(root / "shelf" / f"{name}.gguf", seed=seed)
        spec = {"source": {"volume": {"persistentVolumeClaim": "shelf", "path": f"{name}.gguf"}}}
        status = {"phase": "Ready", "cacheKey": f"{name}-0", "files": [{"name": f"{name}.gguf"}]}
        out[name] = LlamaModel.model_validate(model_body(name, spec=spec, status=status))
    return out


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    root = tmp_path_factory.mktemp("router")
    server = LlamaServer.model_validate({"metadata": {"name": "fleet", "namespace": "default"}, "spec": SPEC})
    preset = build_preset(server, _models(root), Settings())
    # The one substitution: the pod's volume mount is this directory.
    (root / "models.ini").write_text(preset.replace(f"{ROUTER_ROOT}/model-source-0", str(root / "shelf")))
    args, port = on_loopback(router_args(server))
    args[args.index(PRESET_PATH)] = str(root / "models.ini")
    with serving(args, port, workdir=root, env={"HOME": str(root)}, timeout=30) as (url, _):
        yield url, preset


def _models_json(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/models", timeout=5).json()["data"])


def _states(url: str) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in _models_json(url)}


def _wait_states(url: str, want: dict[str, str], timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = _states(url)
        if all(states.get(k) == v for k, v in want.items()):
            return states
        time.sleep(0.2)
    return _states(url)


def _chat(url: str, model: str) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _prompt(url: str, model: str) -> str:
    response = httpx.post(f"{url}/apply-template", timeout=30,
                          json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return str(response.json()["prompt"])


def test_every_section_is_a_model_with_its_own_settings(router: tuple[str, str]) -> None:
    url, _ = router
    assert _wait_states(url, {"alpha": "loaded"}) == {"alpha": "loaded", "bee": "unloaded", "gamma": "unloaded"}
    args = {m["id"]: m["status"]["args"] for m in _models_json(url)}

    def flag(model: str, name: str) -> str:
        return str(args[model][args[model].index(name) + 1])

    assert (flag("alpha", "--ctx-size"), flag("bee", "--ctx-size"), flag("gamma", "--ctx-size")) == \
        ("512", "1024", "256")
    assert flag("bee", "--parallel") == "2" and "--parallel" not in args["alpha"]
    assert (flag("gamma", "--cache-type-v"), flag("gamma", "--flash-attn")) == ("q8_0", "on")
    assert flag("gamma", "--sleep-idle-seconds") == "2"
    assert flag("bee", "--chat-template") == "llama3" and "--no-jinja" in args["bee"]
    # What the router itself was given reaches every instance.
    assert all(flag(m, "--top-k") == "5" and flag(m, "--threads") == "1" for m in args)
    # The alias is the section name: the router names the instance after it.
    assert flag("bee", "--alias") == "bee" and flag("bee", "--model").endswith("/beta.gguf")


def test_the_third_model_loads_and_the_least_recently_used_one_stops(router: tuple[str, str]) -> None:
    url, _ = router
    _wait_states(url, {"alpha": "loaded"})
    # bee's built-in template shapes its prompts; alpha (a GGUF without a template) gets llama-server's chatml.
    # In the order of the chats, so that alpha stays the least recently used.
    assert _chat(url, "alpha")["model"] == "alpha"
    assert _prompt(url, "alpha").startswith("<|im_start|>user")
    assert _chat(url, "bee")["model"] == "bee"
    assert _prompt(url, "bee").startswith("<|start_header_id|>user")
    assert _wait_states(url, {"alpha": "loaded", "bee": "loaded"}) == \
        {"alpha": "loaded", "bee": "loaded", "gamma": "unloaded"}
    assert _chat(url, "gamma")["model"] == "gamma"
    states = _wait_states(url, {"alpha": "unloaded", "gamma": "loaded"})
    assert states == {"alpha": "unloaded", "bee": "loaded", "gamma": "loaded"}
    # The operator's reading of that answer (status.models).
    summary = {s.name: (s.state, s.loaded_replicas) for s in model_states(
        [("pod-0", _models_json(url))], [("alpha", "alpha"), ("bee", "beta"), ("gamma", "gamma")])}
    assert summary["alpha"] == ("Unloaded", 0) and summary["bee"] == ("Loaded", 1)
    assert summary["gamma"][0] in ("Loaded", "Sleeping")


def test_an_idle_model_sleeps_and_wakes_on_the_next_request(router: tuple[str, str]) -> None:
    url, _ = router
    _chat(url, "gamma")
    assert _wait_states(url, {"gamma": "sleeping"}, timeout=20)["gamma"] == "sleeping"
    summary = {s.name: s.state for s in model_states([("pod-0", _models_json(url))], [("gamma", "gamma")])}
    assert summary == {"gamma": "Sleeping"}
    assert _chat(url, "gamma")["model"] == "gamma"
    assert _states(url)["gamma"] in ("loaded", "sleeping")
