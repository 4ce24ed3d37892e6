"""`helm template` of the chart with the real helm binary (the `helm` fixture: tests/tiers.py finds it)."""

from __future__ import annotations

import pathlib
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "llama-operator"


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
