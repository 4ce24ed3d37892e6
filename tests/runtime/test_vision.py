"""A LlamaModel with spec.mmproj, served by the real llama-server: an image through the openai client.

The arguments and the router preset are the operator's own (builders), with the one substitution of where the
volume is; the model and its projector are tiny random-weight GGUFs (tests/tiny_gguf.py, tests/tiny_mmproj.py),
so the answer is gibberish but the image goes the whole way: decoded, encoded by the projector, evaluated.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llama_operator.api.v1beta1 import LlamaModel, LlamaServer
from llama_operator.builders.args import server_args
from llama_operator.builders.router import PRESET_PATH, ROUTER_ROOT, build_preset, router_args
from llama_operator.config import Settings
from llama_operator.contract import SOURCE_MOUNT

from ..conftest import model_body
from ..llama_bin import llama_server_bin
from ..tiny_gguf import write_tiny_llama
from ..tiny_mmproj import IMAGE_SIZE, PATCH_SIZE, tiny_png, write_tiny_mmproj

PROMPT = "what is in the picture?"
# Random weights may sample the end-of-generation token at once; ignoring it makes every answer run to max_tokens,
# so finish_reason says the prompt (image included) was evaluated and generation ran, not which token came first.
GENERATE = {"max_tokens": 3, "extra_body": {"ignore_eos": True}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model(name: str, mmproj: bool) -> LlamaModel:
    spec: dict[str, Any] = {"source": {"volume": {"persistentVolumeClaim": "shelf", "path": f"{name}/model.gguf"}}}
    if mmproj:
        spec["mmproj"] = {"file": f"{name}/mmproj-tiny-f32.gguf"}
    status = {"phase": "Ready", "cacheKey": f"{name}-0", "files": [{"name": "model.gguf"}]}
    return LlamaModel.model_validate(model_body(name, spec=spec, status=status))


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shelf")
    for name in ("seer", "blind"):
        write_tiny_llama(root / name / "model.gguf")
    write_tiny_mmproj(root / "seer" / "mmproj-tiny-f32.gguf")
    return root


def _start(args: list[str], home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    args = list(args)
    args[args.index("0.0.0.0")] = "127.0.0.1"
    args[args.index("8080")] = str(port)
    log = (home / f"server-{port}.log").open("wb")
    proc = subprocess.Popen([llama_server_bin(), *args], stdout=log, stderr=subprocess.STDOUT,
                            env={"HOME": str(home)}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"llama-server did not start: {(home / f'server-{port}.log').read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _image_message(text: str = PROMPT) -> list[dict[str, Any]]:
    data = base64.b64encode(tiny_png()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}]


@pytest.fixture(scope="module")
def single(shelf: Path) -> Iterator[str]:
    server = LlamaServer.model_validate({"metadata": {"name": "seer"}, "spec": {"modelRef": {"name": "seer"},
                                                                                "contextSize": 512, "threads": 1}})
    args = [a.replace(SOURCE_MOUNT, str(shelf)) for a in server_args(server, _model("seer", True))]
    assert args[args.index("--mmproj") + 1] == str(shelf / "seer" / "mmproj-tiny-f32.gguf")
    proc, url = _start(args, shelf)
    yield url
    _stop(proc)


def test_an_image_through_the_openai_client(single: str) -> None:
    client = openai.OpenAI(base_url=f"{single}/v1", api_key="unused")
    with_image = client.chat.completions.create(model="seer", messages=_image_message(),  # type: ignore[arg-type]
                                                **GENERATE)
    text_only = client.chat.completions.create(model="seer", messages=[{"role": "user", "content": PROMPT}],
                                               **GENERATE)
    assert with_image.choices[0].finish_reason == "length"
    # The picture became tokens: one per patch of the projector's grid (and the markers around them).
    patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert with_image.usage is not None and text_only.usage is not None
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + patches


def test_router_mode_serves_a_vision_model_next_to_a_text_model(shelf: Path) -> None:
    server = LlamaServer.model_validate({"metadata": {"name": "fleet"}, "spec": {
        "models": [{"modelRef": {"name": "seer"}, "contextSize": 512}, {"modelRef": {"name": "blind"},
                                                                        "contextSize": 512}],
        "threads": 1}})
    preset = build_preset(server, {"seer": _model("seer", True), "blind": _model("blind", False)}, Settings())
    assert "mmproj = /run/llama-server/model-source-0/seer/mmproj-tiny-f32.gguf" in preset
    (shelf / "models.ini").write_text(preset.replace(f"{ROUTER_ROOT}/model-source-0", str(shelf)))
    args = router_args(server)
    args[args.index(PRESET_PATH)] = str(shelf / "models.ini")
    proc, url = _start(args, shelf)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        answer = client.chat.completions.create(model="seer", messages=_image_message(),  # type: ignore[arg-type]
                                                **GENERATE)
        assert answer.model == "seer" and answer.choices[0].finish_reason == "length"
        with pytest.raises(openai.APIStatusError, match="image input is not supported"):
            client.chat.completions.create(model="blind", messages=_image_message(),  # type: ignore[arg-type]
                                           max_tokens=3)
        models = {m["id"]: m for m in httpx.get(f"{url}/models", timeout=5).json()["data"]}
        assert models["seer"]["architecture"]["input_modalities"] == ["text", "image"]
        assert models["blind"]["architecture"]["input_modalities"] == ["text"]
    finally:
        _stop(proc)
