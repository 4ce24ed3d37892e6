"""Where the pinned llama-server binary is: $LLAMA_SERVER_BIN (set by `make test`) or built/cached by the script."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@cache
def llama_server_bin() -> str:
    """Path of the pinned llama-server; builds it (minutes, once, cached) when the env var is not set."""
    path = os.environ.get("LLAMA_SERVER_BIN")
    if not path:
        out = subprocess.run(
            [str(ROOT / "scripts/build-llama-server.sh")],
            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        path = out.stdout.strip().splitlines()[-1]
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"llama-server binary {path!r} is not executable")
    return path
