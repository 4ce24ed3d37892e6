"""contextSize auto on the real llama-server: the plan's rendered args for a tiny model and a memory limit start
a server whose /props reports the context the plan chose (the largest the estimate fits in the limit)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from llama_operator.api.v1beta1 import LlamaServer
from llama_operator.builders.plan import ServerPlan, plan_server
from llama_operator.config import Settings
from llama_operator.fit import estimate_server, model_info
from llama_operator.fit.estimate import MiB
from llama_operator.gguf import FileByteSource, read_header
from tests.conftest import resolved_model, server_body

from ..llama_bin import on_loopback, serving
from ..tiny_gguf import write_tiny_llama

TRAINED = 65536


@contextmanager
def _start(args: list[str], model: Path, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """llama-server with the plan's args, the model at its local path, on loopback: (url, pid)."""
    args, port = on_loopback(args)
    args[args.index("--model") + 1] = str(model)
    with serving(args, port, workdir=tmp_path) as (url, proc):
        yield url, proc.pid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny.gguf", context_length=TRAINED)
    info = model_info(asyncio.run(read_header(FileByteSource(path))))
    status = {"phase": "Ready", "cacheKey": "tiny-0123456789ab", "files": [{"name": "tiny.gguf"}],
              "gguf": info.to_wire()}
    return path, status


def _plan(status: dict, limit: int, **spec: object) -> ServerPlan:
    server = LlamaServer.model_validate(server_body(
        contextSize="auto", resources={"limits": {"memory": f"{limit}"}}, **spec))
    plan = plan_server(server, {"qwen": resolved_model(status=status)}, Settings())
    assert isinstance(plan, ServerPlan), plan
    return plan


def _peak(pid: int) -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match
    return int(match.group(1)) * 1024


@pytest.mark.parametrize("spec", [{}, {"parallel": 2}], ids=["unified", "parallel-2"])
def test_llama_server_runs_the_context_the_plan_chose_for_the_limit(spec: dict, tiny: tuple[Path, dict],
                                                                   tmp_path: Path) -> None:
    path, status = tiny
    info = model_info(asyncio.run(read_header(FileByteSource(path))))
    probe = LlamaServer.model_validate(server_body(contextSize=8192, **spec)).spec
    at_8k = estimate_server(probe, info)
    assert at_8k is not None
    limit = at_8k.host.total + 2 * MiB  # a limit between 8k and the trained 64k tokens
    plan = _plan(status, limit, **spec)
    chosen = int(plan.args[plan.args.index("--ctx-size") + 1])
    assert 8192 < chosen < TRAINED and plan.estimate is not None and plan.estimate.host.total <= limit
    step = 256 * (spec.get("parallel") or 1)
    above = estimate_server(probe.model_copy(update={"context_size": chosen + step}), info)
    assert above is not None and above.host.total > limit  # the largest that fits
    with _start(plan.args, path, tmp_path) as (url, pid):
        props = httpx.get(f"{url}/props", timeout=10).json()
        assert props["default_generation_settings"]["n_ctx"] * (spec.get("parallel") or 1) == chosen
        # A prompt that fills a slot touches the KV cache, the masks and the compute buffers.
        prompt = [100 + i % 50 for i in range(plan.estimate.context_per_slot - 16)]
        reply = httpx.post(f"{url}/completion", json={"prompt": prompt, "n_predict": 4}, timeout=300)
        assert reply.status_code == 200
        peak = _peak(pid)
    # The limit holds the real process: the estimate is the one docs/memory-fit.md measured within 15%.
    assert peak <= limit, f"peak {peak / MiB:.1f} MiB, limit {limit / MiB:.1f} MiB, context {chosen}"


def test_a_large_limit_gets_the_trained_context(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    path, status = tiny
    plan = _plan(status, 8 * 1024 * MiB)
    assert plan.args[plan.args.index("--ctx-size") + 1] == str(TRAINED)
    with _start(plan.args, path, tmp_path) as (url, _):
        assert httpx.get(f"{url}/props", timeout=10).json()["default_generation_settings"]["n_ctx"] == TRAINED
