"""`llama-operator fetch` against a local fake hub: resume, parallel segments, verification, locking, errors."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_operator import contract, fetch
from llama_operator.fetch import Fetcher, FetchOptions, headers_from_env
from tests.fakehub import FakeHub

MiB = 1024 * 1024
REPO = "acme/tiny-GGUF"


def gguf_bytes(size: int, seed: int = 1) -> bytes:
    """Bytes that pass the magic check (fetch never parses beyond it)."""
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub().running() as running:
        yield running


def options(hub: FakeHub, cache: Path, file: str = "model.gguf", **kw: object) -> FetchOptions:
    base: dict[str, object] = dict(
        cache_dir=cache, cache_key="model-abc", hf_repo=REPO, hf_file=file, hf_endpoint=hub.url,
        backoff_base=0.01, backoff_cap=0.05, progress_interval=60.0,
    )
    base.update(kw)
    return FetchOptions(**base)  # type: ignore[arg-type]


def run(opts: FetchOptions, tmp_path: Path, **kw: object) -> tuple[int, str]:
    log_path = tmp_path / "termination-log"
    log_path.unlink(missing_ok=True)
    code = fetch.run(opts, termination_log=str(log_path), **kw)  # type: ignore[arg-type]
    return code, log_path.read_text() if log_path.exists() else ""


def cli(hub: FakeHub, cache: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "llama_operator.cli", "fetch", "--cache-dir", str(cache), "--cache-key",
            "model-abc", "--hf-endpoint", hub.url, "--hf-repo", REPO, "--progress-interval", "0.2", *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def settled_bytes(hub: FakeHub, name: str) -> int:
    last = -1
    while (now := hub.served_bytes(name)) != last:
        last = now
        time.sleep(0.3)
    return now


def files_in(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_downloads_verifies_and_marks(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(3 * MiB))
    code, message = run(options(hub, tmp_path), tmp_path)
    assert (code, message) == (0, "")
    model_dir = tmp_path / "model-abc"
    assert (model_dir / "model.gguf").read_bytes() == served.data
    marker = json.loads((model_dir / "model.gguf.verified").read_text())
    assert marker["size"] == served.size and marker["sha256"] == served.sha256
    assert marker["source"] == f"hf:{REPO}@main/model.gguf"
    assert files_in(model_dir) == {"model.gguf", "model.gguf.verified", ".fetch.lock"}
    assert hub.served_bytes("model.gguf") == served.size


def test_cache_hit_is_immediate_and_offline(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(2 * MiB))
    assert run(options(hub, tmp_path, sha256=served.sha256), tmp_path)[0] == 0
    requests_before = len(hub.requests)
    started = time.perf_counter()
    assert run(options(hub, tmp_path, sha256=served.sha256), tmp_path)[0] == 0
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1, elapsed
    assert len(hub.requests) == requests_before  # no network at all: works with the hub down
    assert hub.served_bytes("model.gguf") == served.size


def test_parallel_segments_fetch_every_byte_once(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(12 * MiB))
    opts = options(hub, tmp_path, connections=4, parallel_threshold=MiB, min_piece=MiB)
    assert run(opts, tmp_path)[0] == 0
    assert (tmp_path / "model-abc" / "model.gguf").read_bytes() == served.data
    ranges = [r.range for r in hub.requests if r.method == "GET" and r.path.startswith("/cdn/")]
    assert len(ranges) == 12  # 1 MiB pieces
    assert hub.served_bytes("model.gguf") == served.size


def test_dropped_connections_and_5xx_are_retried_without_refetching(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(4 * MiB))
    served.faults.drop_after = [300_000, 1_000_000]
    hub.add(REPO, "other.gguf", b"")  # unused: keeps the repo shape realistic
    code, _ = run(options(hub, tmp_path), tmp_path)
    assert code == 0
    assert hub.served_bytes("model.gguf") == served.size  # each retry continued where the drop happened
    gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/cdn/")]
    assert [g.range for g in gets] == ["bytes=0-4194303", "bytes=300000-4194303", "bytes=1300000-4194303"]


def test_5xx_burst_with_retry_after(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(MiB))
    served.faults.fail, served.faults.fail_status, served.faults.retry_after = 3, 429, 0.1
    started = time.perf_counter()
    assert run(options(hub, tmp_path), tmp_path)[0] == 0
    assert time.perf_counter() - started >= 0.3  # Retry-After honoured although the backoff cap is 0.05 s


def test_backoff_is_capped_exponential_with_jitter() -> None:
    opts = FetchOptions(cache_dir=Path("/x"), cache_key="k", backoff_base=1.0, backoff_cap=8.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        delays = [fetch._backoff(attempt, opts, None) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    assert fetch._backoff(1, opts, 30.0) == 30.0


def test_sha_mismatch_leaves_nothing_at_the_final_path(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(2 * MiB))
    served.faults.wrong_content = True
    code, message = run(options(hub, tmp_path), tmp_path)
    assert code == fetch.EXIT_CHECKSUM == 13
    assert message.startswith("ChecksumMismatch: model.gguf: sha256 mismatch: expected " + served.sha256)
    assert files_in(tmp_path / "model-abc") == {".fetch.lock"}


def test_user_sha_differing_from_the_hub_fails_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    hub.add(REPO, "model.gguf", gguf_bytes(MiB))
    code, message = run(options(hub, tmp_path, sha256="0" * 64), tmp_path)
    assert code == 13 and "the source publishes" in message
    assert hub.served_bytes("model.gguf") == 0


def test_not_a_gguf_is_rejected(hub: FakeHub, tmp_path: Path) -> None:
    hub.add(REPO, "model.gguf", b"<html>rate limited</html>" * 1000)
    code, message = run(options(hub, tmp_path), tmp_path)
    assert code == fetch.EXIT_NOT_GGUF == 14
    assert message.startswith("NotAGguf:")
    assert files_in(tmp_path / "model-abc") == {".fetch.lock"}


@pytest.mark.parametrize(
    ("file", "token", "code", "reason", "hint"),
    [
        ("missing.gguf", None, 10, "NotFound", "HTTP 404"),
        ("model.gguf", None, 11, "Unauthorized", "tokenSecretRef"),
        ("model.gguf", "wrong", 12, "Forbidden", "refused"),
    ],
)
def test_permanent_errors_fail_fast_with_distinct_codes(
    hub: FakeHub, tmp_path: Path, file: str, token: str | None, code: int, reason: str, hint: str
) -> None:
    hub.add("acme/gated", "model.gguf", gguf_bytes(MiB), gated=True)
    hub.add(REPO, "model.gguf", gguf_bytes(MiB))
    repo = REPO if file == "missing.gguf" else "acme/gated"
    started = time.perf_counter()
    got, message = run(options(hub, tmp_path, file=file, hf_repo=repo, hf_token=token), tmp_path)
    assert got == code
    assert message.startswith(f"{reason}:") and hint in message
    assert time.perf_counter() - started < 1.0  # no retries
    if token:
        assert token not in message


def test_gated_repo_with_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.add("acme/gated", "model.gguf", gguf_bytes(MiB), gated=True)
    assert run(options(hub, tmp_path, hf_repo="acme/gated", hf_token=hub.token), tmp_path)[0] == 0
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert cdn and all(r.authorization is None for r in cdn)  # the token stays with the hub


def test_unreachable_after_retries(tmp_path: Path) -> None:
    opts = FetchOptions(
        cache_dir=tmp_path, cache_key="k", url="http://127.0.0.1:9/model.gguf", retries=2,
        backoff_base=0.01, backoff_cap=0.02, connect_timeout=1.0,
    )
    code, message = run(opts, tmp_path)
    assert code == fetch.EXIT_UNREACHABLE == 16
    assert message.startswith("Unreachable:") and "giving up after 2 retries" in message


def test_disk_full_is_reported_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    hub.add(REPO, "model.gguf", gguf_bytes(3 * MiB))
    code, message = run(options(hub, tmp_path), tmp_path, free_space=lambda path: MiB)
    assert code == fetch.EXIT_DISK_FULL == 15
    assert "needs 3.0 MiB more, only 1.0 MiB free" in message
    assert hub.served_bytes("model.gguf") == 0


def test_split_gguf_fetches_every_shard(hub: FakeHub, tmp_path: Path) -> None:
    names = [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    shards = [hub.add(REPO, f"sub/{name}", gguf_bytes(MiB, seed=i)) for i, name in enumerate(names)]
    assert run(options(hub, tmp_path, file=f"sub/{names[0]}", sha256=shards[0].sha256), tmp_path)[0] == 0
    for name, shard in zip(names, shards, strict=True):
        assert (tmp_path / "model-abc" / name).read_bytes() == shard.data
        assert json.loads((tmp_path / "model-abc" / f"{name}.verified").read_text())["sha256"] == shard.sha256


def test_plain_url_with_secret_headers_from_env(hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    served = hub.add_plain("m.gguf", gguf_bytes(MiB))
    hub.required_headers = {"X-Api-Key": "s3cr3t-value"}
    headers = headers_from_env({"LLAMA_FETCH_HEADER_X_Api_Key": "s3cr3t-value", "PATH": "/bin"})
    assert headers == {"X-Api-Key": "s3cr3t-value"}
    opts = FetchOptions(cache_dir=tmp_path, cache_key="k", url=f"{hub.url}/plain/m.gguf?token=in-url",
                        headers=headers)
    with caplog.at_level(logging.DEBUG, logger="llama_operator.fetch"):
        assert run(opts, tmp_path)[0] == 0
    assert (tmp_path / "k" / "m.gguf").read_bytes() == served.data
    assert "s3cr3t-value" not in caplog.text and "in-url" not in caplog.text


def test_slow_response_times_out_and_is_retried(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(MiB))
    served.faults.delays = [2.0]  # headers at once, then silence longer than the read timeout
    assert run(options(hub, tmp_path, read_timeout=0.3), tmp_path)[0] == 0
    assert (tmp_path / "model-abc" / "model.gguf").read_bytes() == served.data


def test_secret_headers_stay_on_their_origin(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add_plain("m.gguf", gguf_bytes(MiB))
    opts = FetchOptions(cache_dir=tmp_path, cache_key="k", url=f"{hub.url}/moved/m.gguf",
                        headers={"X-Api-Key": "k3y"})
    assert run(opts, tmp_path)[0] == 0
    assert (tmp_path / "k" / "m.gguf").read_bytes() == served.data
    moved = [r for r in hub.requests if r.path.startswith("/moved/")]
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert moved and all("x-api-key" in r.header_names for r in moved)
    assert cdn and all("x-api-key" not in r.header_names for r in cdn)


def test_progress_lines(hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(2 * MiB))
    served.faults.rate = 4 * MiB
    with caplog.at_level(logging.INFO, logger="llama_operator.fetch"):
        assert run(options(hub, tmp_path, progress_interval=0.1), tmp_path)[0] == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Progress")]
    assert len(lines) >= 3
    assert all("%" in line and "MB/s" in line and "ETA" in line and "/ 2.0 MiB" in line for line in lines)
    # What the operator reads back from the container's log (contract.parse_progress): exact bytes.
    parsed = [contract.parse_progress(line) for line in lines]
    assert all(p is not None and p.file == "model.gguf" and p.total == 2 * MiB and 0 <= p.done <= p.total
               for p in parsed)
    assert [p.done for p in parsed if p] == sorted(p.done for p in parsed if p)
    assert contract.parse_progress("\n".join(["noise", *lines, "Downloaded model.gguf"])) == parsed[-1]


def test_parallel_resume_after_stop_fetches_only_missing_bytes(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(8 * MiB))
    served.faults.rate = 8 * MiB  # per connection: ~0.25 s for the whole file over 4 connections
    opts = options(hub, tmp_path, connections=4, parallel_threshold=MiB, min_piece=MiB)
    stop = threading.Event()
    threading.Timer(0.12, stop.set).start()
    with pytest.raises(fetch.InterruptedFetch):
        Fetcher(opts, stop=stop).run()
    state = json.loads((tmp_path / "model-abc" / "model.gguf.part.json").read_text())
    recorded = sum(piece[2] for piece in state["pieces"])
    assert 0 < recorded < served.size
    before = settled_bytes(hub, "model.gguf")
    served.faults.rate = None
    assert run(opts, tmp_path)[0] == 0
    assert hub.served_bytes("model.gguf") - before == served.size - recorded
    assert (tmp_path / "model-abc" / "model.gguf").read_bytes() == served.data


def test_resume_after_kill_transfers_only_missing_bytes(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(6 * MiB))
    served.faults.rate = 2 * MiB
    proc = cli(hub, tmp_path, "--hf-file", "model.gguf")
    state_path = tmp_path / "model-abc" / "model.gguf.part.json"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if state_path.exists() and json.loads(state_path.read_text())["pieces"][0][2] > MiB:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # like an OOM kill or a node losing the pod: no cleanup at all
    proc.wait()
    recorded = json.loads(state_path.read_text())["pieces"][0][2]
    before = settled_bytes(hub, "model.gguf")  # the server notices the dead peer only on its next write
    served.faults.rate = None
    assert run(options(hub, tmp_path), tmp_path)[0] == 0
    assert hub.served_bytes("model.gguf") - before == served.size - recorded
    assert hub.requests[-1].range == f"bytes={recorded}-{served.size - 1}"
    assert (tmp_path / "model-abc" / "model.gguf").read_bytes() == served.data


def test_sigterm_saves_state_and_exits_143(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add(REPO, "model.gguf", gguf_bytes(4 * MiB))
    served.faults.rate = MiB
    term_log = tmp_path / "term"
    proc = cli(hub, tmp_path, "--hf-file", "model.gguf", "--termination-log", str(term_log))
    while hub.served_bytes("model.gguf") < 256 * 1024:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 143, stderr
    assert term_log.read_text().startswith("Interrupted:")
    state = json.loads((tmp_path / "model-abc" / "model.gguf.part.json").read_text())
    assert state["pieces"][0][2] > 0


def test_two_concurrent_fetches_one_download_two_successes(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add("acme/gated", "model.gguf", gguf_bytes(4 * MiB), gated=True)
    served.faults.rate = 8 * MiB
    env = {"HF_TOKEN": hub.token}
    procs = [cli(hub, tmp_path, "--hf-repo", "acme/gated", "--hf-file", "model.gguf", env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert hub.served_bytes("model.gguf") == served.size
    logs = "".join(err for _, err in outputs)
    assert "Cache hit" in logs  # the second waited for the lock, then found the verified file
    assert hub.token not in logs and "secret-signature" not in logs
