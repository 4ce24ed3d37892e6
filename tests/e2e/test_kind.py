"""The kind e2e: `make kind-e2e` (a kind cluster in Docker, the image built, the chart installed). Opt-in:
LLAMA_OPERATOR_KIND_E2E=1 on a machine with Docker."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.chart.chart import REPO

# Its own cluster in Docker, not the sandbox: it needs helm and Docker (checked here: the test is opt-in).
pytestmark = pytest.mark.kind


def _docker_usable() -> str | None:
    """None if a Docker engine answers, else why not."""
    docker = shutil.which("docker")
    if not docker:
        return "no docker command"
    proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    return None if proc.returncode == 0 else "no Docker engine answers `docker info`"


def test_kind_e2e(helm: str) -> None:
    if not os.environ.get("LLAMA_OPERATOR_KIND_E2E"):
        pytest.skip("set LLAMA_OPERATOR_KIND_E2E=1 to run the kind e2e (creates a cluster, ~10 minutes)")
    reason = _docker_usable()
    assert reason is None, f"the kind e2e needs a Docker engine ({reason}); LLAMA_OPERATOR_KIND_E2E=1 asked for it"
    proc = subprocess.run(["make", "kind-e2e", f"HELM={helm}"], cwd=REPO, timeout=3600)
    assert proc.returncode == 0
