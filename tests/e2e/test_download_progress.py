"""Download progress while it runs: the fetcher's progress lines, read back by the operator through the
API server (`pods/log`, served by the sandbox kubelet), shown by `kubectl get lserver` and in status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llama_operator.nodes.host import HOST_ADDRESS
from tests.e2e.conftest import wait_for
from tests.e2e.test_sandbox import _create, _status, _wait_phase
from tests.fakehub import FakeHub

pytestmark = pytest.mark.nodes

MiB = 1024 * 1024


def test_download_progress_is_visible_while_it_runs(sandbox_factory: Any, tiny_gguf: Path) -> None:
    hub = FakeHub()
    # A real GGUF with padding after its tensors (llama.cpp reads tensors by offset): 24 MiB to fetch slowly.
    served = hub.add("test/slow-GGUF", "slow.gguf", tiny_gguf.read_bytes() + b"\0" * (24 * MiB))
    with hub.running(HOST_ADDRESS):
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url})
        _create(sandbox, "llamamodels", "slow", {"source": {"huggingFace": {"repo": "test/slow-GGUF",
                                                                           "file": "slow.gguf"}}})
        _wait_phase(sandbox, "llamamodels", "slow", "Ready", timeout=60)
        served.faults.rate = MiB // 4  # bytes per second and connection, from now on: the download takes a while
        _create(sandbox, "llamaservers", "slow", {"modelRef": {"name": "slow"}, "contextSize": 256})

        status = _wait_phase(sandbox, "llamaservers", "slow", "Downloading", timeout=120,
                             check=lambda s: (s.get("download") or {}).get("bytesDone"))
        download = status["download"]
        assert download["file"] == "slow.gguf" and download["bytesTotal"] == served.size
        assert 0 < download["bytesDone"] < served.size and 0 <= download["percent"] < 100
        assert download["bytesPerSecond"] > 0
        assert f"({download['summary']})" in status["message"] and "% of " in download["summary"]
        table = sandbox.kubectl("get", "lserver", "slow").stdout.splitlines()
        assert table[0].split()[:5] == ["NAME", "MODEL", "PHASE", "READY", "DOWNLOAD"]
        assert "% of" in table[1] and "MB/s" in table[1], table
        # It advances: the operator reads the log again every few seconds while the fetch runs.
        wait_for(lambda: ((_status(sandbox, "llamaservers", "slow").get("download") or {}).get("bytesDone") or 0)
                 > download["bytesDone"], timeout=30, message="progress advancing")

        served.faults.rate = None  # let it finish
        done = _wait_phase(sandbox, "llamaservers", "slow", "Ready", timeout=120)
        assert "download" not in done
