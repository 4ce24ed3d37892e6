"""What an Inference Extension endpoint picker scrapes, asked of the pinned llama-server: `GET /metrics` on the pool's
target port, no query. A one-model server answers with every metric of the llama.cpp mapping as a gauge (what the
EPP reads); a router answers 400 without `?model=`, which is why router-mode servers get no InferencePool
(builders/inference_pool.py). If a llama.cpp update makes the router answer, this test fails: give them pools."""

from __future__ import annotations

from pathlib import Path

import httpx

from llama_operator.builders.inference_pool import LLAMA_CPP_METRICS

from ..llama_bin import free_port, serving
from ..tiny_gguf import write_tiny_llama


def _types(page: str) -> dict[str, str]:
    """Metric name -> its `# TYPE` in a Prometheus text page."""
    types = {}
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
    return types


def test_a_one_model_server_serves_the_mapped_metrics_as_gauges(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    write_tiny_llama(model)
    port = free_port()
    args = ["-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--metrics", "-c", "512", "-t", "1"]
    with serving(args, port, workdir=tmp_path) as (url, _):
        response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    types = _types(response.text)
    mapped = [spec for spec in LLAMA_CPP_METRICS.values() if spec]
    assert mapped and {name: types.get(name) for name in mapped} == dict.fromkeys(mapped, "gauge")


def test_a_router_answers_metrics_only_per_model(tmp_path: Path) -> None:
    write_tiny_llama(tmp_path / "a.gguf")
    preset = tmp_path / "models.ini"
    preset.write_text(f"[a]\nmodel = {tmp_path / 'a.gguf'}\nctx-size = 512\nthreads = 1\n")
    port = free_port()
    args = ["--models-preset", str(preset), "--host", "127.0.0.1", "--port", str(port), "--metrics"]
    with serving(args, port, workdir=tmp_path) as (url, _):
        response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 400, (response.status_code, response.text[:300])
