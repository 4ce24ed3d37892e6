"""The real llama-server, started with the args the operator renders: its /metrics (what the pod annotations
and the PodMonitor scrape, and what the Grafana dashboard queries) and its resident memory against the estimate."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaServerSpec
from llama_operator.fit import estimate_server, model_info
from llama_operator.flags.render import render_args
from llama_operator.gguf import FileByteSource, read_header

from ..llama_bin import on_loopback, serving
from ..metric_names import LLAMA_SERVER
from ..tiny_gguf import write_tiny_llama


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], url: str) -> None:
        self.proc, self.url = proc, url

    def status_bytes(self, key: str) -> int:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{self.proc.pid}/status").read_text(), re.MULTILINE)
        assert match, key
        return int(match.group(1)) * 1024


@contextmanager
def _start(spec: LlamaServerSpec, model: Path, tmp_path: Path) -> Iterator[Server]:
    args, port = on_loopback(render_args(spec, model_path=str(model), model_name="tiny", threads=2))
    with serving(args, port, workdir=tmp_path) as (url, proc):
        yield Server(proc, url)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf")


def test_llama_server_metrics_have_the_names_the_dashboard_uses(tiny: Path, tmp_path: Path) -> None:
    spec = LlamaServerSpec.model_validate({"modelRef": {"name": "tiny"}, "contextSize": 1024})
    with _start(spec, tiny, tmp_path) as server:
        reply = httpx.post(f"{server.url}/completion", json={"prompt": "hello", "n_predict": 4}, timeout=60)
        assert reply.status_code == 200
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        names = {line.split()[0].split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
        assert LLAMA_SERVER <= names, f"not served: {sorted(LLAMA_SERVER - names)}"
        tokens = re.search(r"^llamacpp:tokens_predicted_total (\S+)$", text, re.MULTILINE)
        assert tokens and float(tokens.group(1)) == 4


@pytest.mark.parametrize("fields", [
    {"contextSize": 2048},
    {"contextSize": 4096, "cacheTypeK": "q8_0", "cacheTypeV": "q8_0"},
    {"contextSize": 4096, "parallel": 2},
], ids=["f16-2048", "q8_0-4096", "parallel-2"])
def test_estimate_holds_the_peak_within_15_percent(fields: dict[str, object], tiny: Path, tmp_path: Path) -> None:
    spec = LlamaServerSpec.model_validate({"modelRef": {"name": "tiny"}, **fields})
    info = model_info(asyncio.run(read_header(FileByteSource(tiny))))
    fit = estimate_server(spec, info)
    assert fit is not None
    with _start(spec, tiny, tmp_path) as server:
        # a prompt that fills one slot's context touches the KV cache, the masks and the compute buffers
        prompt = [100 + i % 50 for i in range(fit.context_per_slot - 16)]
        reply = httpx.post(f"{server.url}/completion", json={"prompt": prompt, "n_predict": 4}, timeout=300)
        assert reply.status_code == 200
        peak = server.status_bytes("VmHWM")
        error = (fit.host.total - peak) / peak
        assert abs(error) < 0.15, f"estimate {fit.host.total / 2**20:.1f} MiB vs peak {peak / 2**20:.1f} MiB"
