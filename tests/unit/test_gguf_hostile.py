"""Hostile GGUF headers (issue 17): every one ends as a one-line `NotAGguf` (or `SourceUnreachable` for a host
that is too slow) within a time bound and a memory bound, never a traceback, an internal error or an OOM.

The files are made here (tests/hostile_gguf.py: virtual files, served over HTTP from 127.0.0.1), so the egress
guard is off for these resolves.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llama_operator import sources
from llama_operator.api.v1beta1 import LlamaModelSpec
from llama_operator.config import Settings
from llama_operator.errors import NotAGguf, SourceUnreachable
from llama_operator.fit import model_info
from llama_operator.fit.shape import memory_shape
from llama_operator.gguf import Budget, FileByteSource, HttpByteSource, read_header
from llama_operator.llamacpp.ggml import TensorSummary
from tests.hostile_gguf import (
    ARRAY,
    CASE_BY_NAME,
    STRING,
    U8,
    Case,
    Virtual,
    gguf_string,
    kv_str,
    kv_u32,
    prefix,
    serving,
)

ROOT = Path(__file__).resolve().parents[2]
_NOT_GGUF_CASES = ["block-count-30M", "long-strings", "kv-count-2^63", "nested-arrays", "dims-2^64",
                   "huge-heads", "endless-vocab"]
_ENDLESS = Case("endless-short-strings", "1-byte strings forever, under every count bound",
                lambda: Virtual().data(prefix(1) + gguf_string("tokenizer.ggml.tokens")
                                       + struct.pack("<IIQ", ARRAY, STRING, 2**23 - 1))
                .records(lambda i: gguf_string("a"), 9, None), ignore_range=True)


def _settings() -> Settings:
    guard = {"source_egress_guard": False} if "source_egress_guard" in Settings.__dataclass_fields__ else {}
    return Settings(**guard)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serving((*CASE_BY_NAME.values(), _ENDLESS)) as url:
        yield url


async def _resolve(url: str, **kwargs: float) -> sources.ResolvedModel:
    spec = LlamaModelSpec.model_validate({"source": {"http": {"url": url}}})
    return await sources.resolve(spec, settings=_settings(), hf_token=None, headers={}, **kwargs)


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize("name", _NOT_GGUF_CASES)
async def test_hostile_header_is_one_line_not_a_gguf_in_time(base: str, name: str) -> None:
    started = time.perf_counter()
    with pytest.raises(NotAGguf) as caught:
        await _resolve(f"{base}/{name}.gguf")
    assert time.perf_counter() - started < 5
    _one_line(caught.value)


def test_peak_memory_of_the_worst_headers_stays_far_below_the_chart_limit(base: str) -> None:
    """The 102-byte block count (1648 MiB before), eight 64 MiB strings (669 MiB) and 2^63 keys (979 MiB after
    40 s): one fresh process resolves them all, its peak RSS is what the operator would add."""
    script = (
        "import asyncio, re, sys\n"
        "from tests.unit.test_gguf_hostile import _resolve\n"
        "for url in sys.argv[1:]:\n"
        "    try:\n"
        "        asyncio.run(_resolve(url))\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__)\n"
        # VmHWM, not ru_maxrss: Linux carries the parent's peak over fork+exec, so a big pytest would count.
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)\n"
    )
    urls = [f"{base}/{name}.gguf" for name in ("block-count-30M", "long-strings", "kv-count-2^63")]
    result = subprocess.run([sys.executable, "-c", script, *urls], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, check=True)
    *outcomes, peak = result.stdout.split()
    assert outcomes == ["NotAGguf"] * 3, result.stdout + result.stderr
    assert int(peak) < 128, f"peak RSS {peak} MiB"


async def test_a_dripping_host_ends_at_the_header_deadline(base: str) -> None:
    url = f"{base}/drip-1-byte-per-s.gguf"
    started = time.perf_counter()
    async with httpx.AsyncClient() as client:
        with pytest.raises(SourceUnreachable, match="not read within 2 s"):
            await read_header(HttpByteSource(client, url), budget=Budget(seconds=2))
    assert time.perf_counter() - started < 3.5


async def test_a_dripping_host_is_cut_at_the_minimum_rate(base: str) -> None:
    """Long before the deadline: a dripping host holds one of the few parser threads only for seconds."""
    url = f"{base}/drip-1-byte-per-s.gguf"
    started = time.perf_counter()
    async with httpx.AsyncClient() as client:
        with pytest.raises(SourceUnreachable, match="slower than 1024 KiB/s") as caught:
            await read_header(HttpByteSource(client, url), budget=Budget(read_grace=0.5, min_rate=1024 * 1024))
    assert time.perf_counter() - started < 2.5
    _one_line(caught.value)


async def test_every_resolve_has_a_deadline(base: str) -> None:
    started = time.perf_counter()
    with pytest.raises(SourceUnreachable, match="not resolved within 1.5 s") as caught:
        await _resolve(f"{base}/drip-1-byte-per-s.gguf", deadline=1.5)
    assert time.perf_counter() - started < 3
    _one_line(caught.value)


async def test_a_host_that_streams_forever_is_cut_at_the_fetch_budget(base: str) -> None:
    started = time.perf_counter()
    async with httpx.AsyncClient() as client:
        source = HttpByteSource(client, f"{base}/endless-short-strings.gguf")
        with pytest.raises(NotAGguf, match="more than 4 MiB of reads"):
            await read_header(source, budget=Budget(fetched_bytes=4 * 1024 * 1024, max_chunk=1024 * 1024))
    assert time.perf_counter() - started < 10
    assert source.bytes_fetched <= 5 * 1024 * 1024


@pytest.mark.parametrize("name", ["block-count-30M", "nested-arrays", "huge-array", "dims-2^64", "huge-heads"])
def test_inspect_prints_one_line_and_fails(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(CASE_BY_NAME[name].make().bytes())
    result = subprocess.run([sys.executable, "-m", "llama_operator.cli", "inspect", str(path)],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("llama-operator inspect: ")


async def test_a_huge_fixed_array_in_a_file_is_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "huge.gguf"
    path.write_bytes(CASE_BY_NAME["huge-array"].make().bytes())
    with pytest.raises(NotAGguf, match="of 2305843009213693952 elements"):
        await read_header(FileByteSource(path))


async def test_parameter_count_stays_an_exact_int64(tmp_path: Path) -> None:
    path = tmp_path / "dims.gguf"
    path.write_bytes(CASE_BY_NAME["dims-2^64"].make().bytes())
    with pytest.raises(NotAGguf, match="more than 9007199254740992 elements"):
        await read_header(FileByteSource(path))
    # Each shard within the bound, together past it (a split model's parameter count is their sum).
    big = TensorSummary(count=1, parameter_count=2**52 + 1)
    header = await read_header(FileByteSource(_write(tmp_path / "ok.gguf", kv_str("general.architecture", "llama"))))
    with pytest.raises(NotAGguf, match="parameters: out of range"):
        header.info(tensors=big.merged(big))


def _write(path: Path, *kvs: bytes) -> Path:
    path.write_bytes(prefix(len(kvs)) + b"".join(kvs))
    return path


async def test_absurd_layer_and_head_counts_are_refused_quickly(tmp_path: Path) -> None:
    arch = kv_str("general.architecture", "llama")
    started = time.perf_counter()
    path = _write(tmp_path / "b.gguf", arch, kv_u32("llama.block_count", 30_000_000))
    blocks = await read_header(FileByteSource(path))
    with pytest.raises(NotAGguf, match="'llama.block_count' is 30000000: out of range"):
        model_info(blocks)
    heads = {"general.architecture": "llama", "llama.block_count": 512, "llama.attention.head_count": 2**40}
    with pytest.raises(NotAGguf, match="head_count' is 1099511627776"):
        memory_shape(heads, TensorSummary())
    per_layer = {**heads, "llama.attention.head_count": [8] * 100 + [2**33]}
    with pytest.raises(NotAGguf, match="8589934592"):
        memory_shape(per_layer, TensorSummary())
    floats = {**heads, "llama.attention.head_count": 8, "llama.attention.head_count_kv": [float("nan")]}
    with pytest.raises(NotAGguf, match="head_count_kv' is nan"):
        memory_shape(floats, TensorSummary())
    # Every input within its bound, their product past 2^53: the recurrent state of 512 Mamba layers.
    mamba = {"general.architecture": "mamba", "mamba.block_count": 512, "mamba.ssm.conv_kernel": 2**20,
             "mamba.ssm.inner_size": 2**20, "mamba.ssm.state_size": 2**20, "mamba.ssm.group_count": 2**20}
    with pytest.raises(NotAGguf, match="recurrent_state_width would be"):
        memory_shape(mamba, TensorSummary())
    # The largest model llama.cpp loads still has a shape.
    shape = memory_shape({**heads, "llama.attention.head_count": 128, "llama.embedding_length": 16384},
                         TensorSummary())
    assert shape is not None and shape.layers == 512 and shape.key_width == 512 * 128 * 128
    assert time.perf_counter() - started < 1


async def test_header_strings_are_cut_before_status(base: str) -> None:
    resolved = await _resolve(f"{base}/long-name.gguf")
    assert resolved.gguf is not None and resolved.gguf.name is not None
    assert len(resolved.gguf.name) == 256 and resolved.gguf.name.endswith("…")
    assert len(json.dumps(resolved.gguf.to_wire())) < 2048


async def test_long_strings_are_skipped_not_kept(tmp_path: Path) -> None:
    template = "{{ x }}" * 20_000  # 140 kB: past what is kept, still a template
    path = _write(tmp_path / "t.gguf", kv_str("general.architecture", "llama"), kv_str("general.license", "l" * 10**6),
                  kv_str("tokenizer.chat_template", template))
    source = FileByteSource(path)
    header = await read_header(source)
    assert header.metadata["general.license"] == {"type": "string", "length": 10**6}
    assert header.info().has_chat_template is True
    assert source.bytes_fetched < path.stat().st_size - 500_000  # the megabyte licence was seeked over


async def test_many_long_keys_are_bounded(tmp_path: Path) -> None:
    keys = [gguf_string(f"{i:05d}" + "k" * 60_000) + struct.pack("<IB", U8, 1) for i in range(100)]
    with pytest.raises(NotAGguf, match="metadata keys larger than 1024 KiB"):
        await read_header(FileByteSource(_write(tmp_path / "k.gguf", *keys)))


async def test_parsing_a_big_vocabulary_leaves_the_event_loop_free(tmp_path: Path) -> None:
    count = 3_000_000
    vocab = (Virtual().data(prefix(1) + gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING,
                                                                                          count))
             .records(lambda i: gguf_string("tok"), 11, count))
    path = tmp_path / "vocab.gguf"
    path.write_bytes(vocab.bytes())
    stall = 0.0

    async def tick() -> None:
        nonlocal stall
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.005)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    header = await read_header(FileByteSource(path))
    await asyncio.sleep(0.02)
    ticker.cancel()
    assert header.metadata["tokenizer.ggml.tokens"] == {"type": "string", "count": count}
    assert stall < 0.15, f"the event loop stalled {stall:.3f} s"
