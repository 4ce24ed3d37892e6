"""The import contracts of pyproject.toml ([tool.importlinter]: the layers, no cycle, pure modules) hold, and they
catch what they are for: on a copy of the package with one cycle put back, lint-imports fails and names it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports with the repository's contracts on the package under `root` (found first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(root / "operator")}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "operator" / "llama_operator", tmp_path / "operator" / "llama_operator",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_repository_keeps_its_import_contracts() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_cycle_hidden_in_a_lazy_import_breaks_the_contracts(copy: Path) -> None:
    # The cycle issue 18 removed: the gateway's command took CliError from cli, which registers the gateway.
    gateway = copy / "operator/llama_operator/gateway/__init__.py"
    text = gateway.read_text()
    assert "    from ..errors import CliError\n" in text
    gateway.write_text(text.replace("    from ..errors import CliError\n", "    from ..cli import CliError\n"))
    (copy / "operator/llama_operator/cli.py").write_text(
        (copy / "operator/llama_operator/cli.py").read_text() + "\n\ndef _gateway() -> object:\n"
        "    from . import gateway\n\n    return gateway\n")
    result = _lint(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Layers: a module imports only from the layers below it BROKEN" in result.stdout
    assert "No import cycle between the modules of any package BROKEN" in result.stdout
    assert "llama_operator.gateway -> llama_operator.cli" in result.stdout
