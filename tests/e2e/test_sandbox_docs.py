"""docs/sandbox.md's walkthrough, run as written: every ```bash block, in order, in one shell.

The only differences from a user's machine: HOME is a temporary directory (so the state directory is
fresh), the operator's Hugging Face endpoint is a local fake hub serving the real Gemma 3 270M file under
the repository examples/tiny-cpu.yaml names, and the sandbox's own llama-operator is first on PATH.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import tree_processes
from tests.fakehub import FakeHub
from tests.llama_bin import llama_server_bin

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.runtime]


def walkthrough_script() -> str:
    text = (ROOT / "docs" / "sandbox.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, "docs/sandbox.md has no bash blocks"
    return "\n".join(blocks)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_walkthrough_runs(tmp_path: Path, gemma_gguf: Path) -> None:
    if not _port_free(18080):
        pytest.skip("port 18080 (the walkthrough's Service URL) is taken on this machine")
    hub = FakeHub()
    hub.add("unsloth/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf", gemma_gguf)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "XDG_"))}
    env.update(HOME=str(home), LLAMA_SERVER_BIN=llama_server_bin(),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    script = "set -euo pipefail\n" + walkthrough_script()
    with hub.running():
        env["LLAMA_OPERATOR_HF_ENDPOINT"] = hub.url
        result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "LlamaServer default/gemma3-270m is Ready: http://127.0.0.1:18080/v1" in output
    assert '"id":"gemma3-270m"' in output.replace(" ", "")  # /v1/models
    assert '"chat.completion"' in output
    assert "deployment \"gemma3-270m\" successfully rolled out" in output
    assert "Sandbox stopped" in output
    assert tree_processes(str(home)) == []
