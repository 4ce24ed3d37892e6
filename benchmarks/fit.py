"""The memory estimate (`llama_operator.fit`) against the real llama-server's resident memory.

    .venv/bin/python benchmarks/fit.py                # tiny, tiny-128k and gemma3-270m, 3 contexts x 2 cache types
    .venv/bin/python benchmarks/fit.py --model tiny   # one model
    .venv/bin/python benchmarks/fit.py --components   # also llama.cpp's own buffer sizes from its log

Each case starts the pinned llama-server (CPU) with the operator's defaults (`--parallel` unset: 4 slots, one
unified KV stream) and the case's `--ctx-size` and `--cache-type-k/-v`, and reads `/proc/<pid>/status`:
- load: VmRSS once `/health` answers 200 (weights paged in by the warm-up, KV cache cleared = touched);
- peak: VmHWM after one completion whose prompt fills the context (up to 4096 tokens; larger contexts get one
  full 512-token ubatch, as filling 32k tokens takes minutes on 2 cores), which touches the KV cache, the masks
  and the compute buffers the way real traffic does. A memory limit has to hold this: the estimate aims at it.
The error is (estimate - measured) / measured. Needs the binary: `make llama-server` (or LLAMA_SERVER_BIN).

    .venv/bin/python benchmarks/fit.py --cgroup --model tiny   # as root: the cases as containers on a real node

`--cgroup` (a mode, not a column always present: it needs root, the node kit and the images, and starts a sandbox)
runs the same cases as LlamaServers on one real node (benchmarks/fit_cgroup.py: one `llama-operator sandbox
--nodes 1`, one pod per case, deleted before the next) and adds `cgroup peak`: the llama-server container's
cgroup v1 `memory.max_usage_in_bytes`, what its memory limit is enforced against. load/peak RSS then come from
the container's own llama-server process (VmRSS at Ready, VmHWM after the completion, read on the host), so all
three numbers are one run; `--components` then prints the cgroup's kernel-memory peak, the pod cgroup's peak and
its memory.stat (rss, cache, mapped_file) instead of llama.cpp's buffers. One run per case (docs/memory-fit.md has
the tables): the container's cgroup peak is its anonymous + kernel memory (kmem 0.7-1.5 MiB, which VmHWM lacks),
not the file pages it maps: the GGUF, written by the fetch init container, is charged to the pod's cgroup, the
binary to whoever read it first. So it sits a constant below VmHWM (11.6 MiB for tiny, 245.5 MiB for gemma3:
the mapped GGUF and the binary), while the pod's cgroup peaks at VmHWM + 3 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import needs  # benchmarks/needs.py, beside this file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "operator"))

from llama_operator.fit import FitSettings, estimate, model_info  # noqa: E402
from llama_operator.fit.estimate import MiB  # noqa: E402
from llama_operator.gguf import FileByteSource, read_header  # noqa: E402
from tests.tiny_gguf import write_tiny_llama  # noqa: E402

CONTEXTS = {"tiny": (1024, 2048, 4096), "tiny-128k": (1024, 2048, 4096), "gemma": (2048, 8192, 32768)}
CACHE_TYPES = ("f16", "q8_0")
FILL_UP_TO = 4096
"""Contexts up to this are filled by the prompt (every KV cell and the whole attention mask in use); larger ones
get one full ubatch (512 tokens): prompt processing of 32k tokens takes minutes on 2 cores."""


@dataclass
class Measured:
    load: int
    peak: int
    buffers: dict[str, float]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_kib(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _get(url: str, body: dict | None = None, timeout: float = 120) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


_BUFFER_RE = re.compile(r"(\S+) +(KV|compute|model|output|RS) buffer size = +([0-9.]+) MiB")


def prompt_tokens(ctx: int) -> int:
    return ctx - 16 if ctx <= FILL_UP_TO else 512


def measure(binary: str, model: Path, ctx: int, cache_type: str, log_dir: Path) -> Measured:
    port = _free_port()
    log_path = log_dir / f"{model.stem}-{ctx}-{cache_type}.log"
    args = [binary, "--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--metrics",
            "--ctx-size", str(ctx), "--cache-type-k", cache_type, "--cache-type-v", cache_type,
            "--threads", "2", "--log-verbosity", "4"]  # fmt: skip (verbosity 4: llama.cpp logs its buffer sizes)
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while _get(f"http://127.0.0.1:{port}/health", timeout=5) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not become healthy; see {log_path}")
            time.sleep(0.1)
        time.sleep(0.5)
        load = _status_kib(proc.pid, "VmRSS")
        status = _get(f"http://127.0.0.1:{port}/completion",
                      {"prompt": [100 + i % 50 for i in range(prompt_tokens(ctx))], "n_predict": 4,
                       "cache_prompt": False}, timeout=900)
        if status != 200:
            raise RuntimeError(f"completion answered HTTP {status}; see {log_path}")
        peak = _status_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    buffers: dict[str, float] = {}
    for _device, kind, size in _BUFFER_RE.findall(log_path.read_text()):
        buffers[kind] = buffers.get(kind, 0.0) + float(size)
    return Measured(load, peak, buffers)


def _mib(size: float) -> str:
    return f"{size / MiB:8.1f}"


def _real_node(models: dict[str, Path]) -> Any:
    """benchmarks/fit_cgroup.py's RealNode, imported only for --cgroup (it needs the e2e harness's kubernetes)."""
    import fit_cgroup  # benchmarks/fit_cgroup.py, beside this file

    try:
        return fit_cgroup.RealNode(models)
    except RuntimeError as exc:  # no cgroup v1 memory hierarchy: one line
        raise SystemExit(f"fit.py --cgroup: {exc}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "tiny-128k", "gemma", "all"], default="all")
    parser.add_argument("--components", action="store_true", help="print llama.cpp's buffer sizes too")
    parser.add_argument("--cgroup", action="store_true",
                        help="run the cases as containers on one real node and add the container cgroup's peak")
    args = parser.parse_args()
    binary = needs.tool(needs.tiers.LLAMA_SERVER)
    if args.cgroup:
        for tool in (needs.tiers.ROOT, needs.tiers.CONTROL_PLANE, needs.tiers.HELM, needs.tiers.NODE_KIT,
                     needs.tiers.IMAGES):
            needs.tool(tool)
    work = Path(tempfile.mkdtemp(prefix="fit-bench-"))
    models: dict[str, Path] = {}
    if args.model in ("tiny", "all"):
        models["tiny"] = write_tiny_llama(work / "tiny.gguf")
    if args.model in ("tiny-128k", "all"):  # the tiny model with a 131072-token vocabulary: tokenizer overhead
        models["tiny-128k"] = write_tiny_llama(work / "tiny-128k.gguf", vocab_size=131072)
    if args.model in ("gemma", "all"):
        gemma: Any = needs.gemma()
        models["gemma"] = Path(gemma.assemble(work / "gemma-3-270m-it-Q4_K_M.gguf"))

    header = (f"{'model':<10}{'ctx':>7} {'cache':<6}{'prompt':>7}{'estimate':>9}{'load RSS':>10}{'err':>7}"
              f"{'peak RSS':>10}{'err':>7}")
    if args.cgroup:
        header += f"{'cgroup peak':>12}{'err':>7}"
    if args.components and args.cgroup:  # the cgroup's kernel memory, the pod's peak, memory.stat at the end
        header += "   kmem peak  pod peak   rss   cache  mapped_file  (MiB)"
    elif args.components:  # llama.cpp's "compute" here is its compute buffer plus its output (logits) buffer
        header += "   est KV / llama KV   est compute / llama compute  (MiB)"
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(_real_node(models)) if args.cgroup else None
        if node is not None:
            print(f"sandbox with one real node ready in {node.start_s:.1f} s", flush=True)
        print(header)
        print("-" * len(header))
        errors, cgroup_errors = [], []
        for name, path in models.items():
            info = model_info(asyncio.run(read_header(FileByteSource(path))))
            assert info.memory is not None
            for ctx in CONTEXTS[name]:
                for cache_type in CACHE_TYPES:
                    fit = estimate(info.memory, FitSettings(context_size=ctx, cache_type_k=cache_type,
                                                            cache_type_v=cache_type),
                                   trained_context=info.context_length)
                    predicted = fit.host.total
                    got = (node.measure(name, ctx, cache_type, prompt_tokens(ctx)) if node is not None
                           else measure(binary, path, ctx, cache_type, work))
                    err_load = (predicted - got.load) / got.load * 100
                    err_peak = (predicted - got.peak) / got.peak * 100
                    errors.append(abs(err_peak))
                    line = (f"{name:<10}{ctx:>7} {cache_type:<6}{prompt_tokens(ctx):>7}{_mib(predicted):>9}"
                            f"{_mib(got.load):>10}"
                            f"{err_load:>+6.1f}%{_mib(got.peak):>10}{err_peak:>+6.1f}%")
                    if node is not None:
                        err_cgroup = (predicted - got.cgroup_peak) / got.cgroup_peak * 100
                        cgroup_errors.append(abs(err_cgroup))
                        line += f"{_mib(got.cgroup_peak):>12}{err_cgroup:>+6.1f}%"
                    if args.components and node is not None:
                        line += (f"   {_mib(got.kmem_peak)} {_mib(got.pod_peak)} {_mib(got.stat['rss'])}"
                                 f" {_mib(got.stat['cache'])} {_mib(got.stat['mapped_file'])}")
                    elif args.components:
                        line += (f"   {_mib(fit.host.kv_cache)} / {got.buffers.get('KV', 0):7.1f}"
                                 f"   {_mib(fit.host.compute)} / "
                                 f"{got.buffers.get('compute', 0) + got.buffers.get('output', 0):7.1f}")
                    print(line, flush=True)
    print(f"\nlargest |error| against peak RSS: {max(errors):.1f}% (goal: 15%); logs in {work}")
    if cgroup_errors:
        print(f"largest |error| against the container cgroup's peak: {max(cgroup_errors):.1f}%")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
