"""The fetcher starts light: `llama-operator fetch` runs in every model pod's init container, on every start, so
its command line imports neither the API models (pydantic), the flag catalog nor httpx (llama_operator/cli.py,
REGISTERED). Measured: about 0.9 s of start-up before, 0.15-0.3 s after, on the 2-core development machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("pydantic", "llama_operator.api", "llama_operator.flags", "httpx", "kopf", "kubernetes")


def _imported_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(proc.stdout.split())


def test_the_fetch_command_line_imports_nothing_heavy() -> None:
    modules = _imported_after("from llama_operator.cli import build_parser\nbuild_parser('fetch')")
    assert "llama_operator.fetch.cli" in modules
    assert not {m for m in modules if m.startswith(HEAVY)}, sorted(m for m in modules if m.startswith(HEAVY))


def test_the_whole_command_line_still_has_every_subcommand() -> None:
    from llama_operator.cli import REGISTERED, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001 - argparse's own
    assert set(REGISTERED) | {"crds", "render", "run", "version"} == set(commands)
    for name in REGISTERED:
        assert set(next(a for a in build_parser(name)._actions if a.dest == "command").choices) >= {name}


@pytest.mark.parametrize("argv", [["fetch", "--help"], ["validate-args", "--", "--top-k", "20"]])
def test_a_named_subcommand_runs(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "llama_operator.cli", *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
