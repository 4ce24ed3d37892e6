"""What big request bodies cost the gateway: peak memory and event-loop stalls under concurrent large POSTs.

    .venv/bin/python benchmarks/gateway_bodies.py                       # about 1 minute
    .venv/bin/python benchmarks/gateway_bodies.py --kind image --clients 8 --mib 30

Starts `llama-operator gateway` as a child process (static upstream: a sink process that reads the body and
answers a small JSON), then sends `--clients` concurrent POSTs of `--mib` MiB each and reports, per body kind:
the gateway's resident memory before, its peak (VmHWM) and the growth; the longest answer time of `GET /health`
on the same listener, polled every 20 ms while the bodies are read (how long the event loop stalled); the status
codes the clients got; the wall time. The `/health` probe is a process of its own (this one is busy with the
bodies), so its worst answer time is the gateway's. Body kinds:

- `image`: one chat message whose content is a base64 data URL (what a vision request looks like);
- `small-values`: a valid request with an extra top-level array of `[]` (a hostile body: parsing it into Python
  objects costs about 19 times its size).

`PYTHONPATH` is passed on to the gateway, so another checkout's package can be measured the same way (`--` then
gateway arguments, e.g. `-- --max-buffered-bytes 67108864`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from harness import free_port, wait_http  # benchmarks/harness.py, beside this file

MIB = 1 << 20


def make_body(kind: str, size: int) -> bytes:
    if kind == "image":
        head = b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, ' \
               b'{"type": "image_url", "image_url": {"url": "data:image/png;base64,'
        tail = b'"}}]}]}'
        return head + b"A" * (size - len(head) - len(tail)) + tail
    if kind == "small-values":
        head = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "pad": ['
        tail = b"[]]}"
        count = (size - len(head) - len(tail)) // 3
        return head + b"[]," * count + tail
    raise ValueError(kind)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


PROBE = """
import sys, threading, time, urllib.request
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
worst = 0.0
while not stop.is_set():
    start = time.perf_counter()
    with urllib.request.urlopen(sys.argv[1], timeout=60) as response:
        response.read()
    worst = max(worst, time.perf_counter() - start)
    time.sleep(0.02)
print(worst)
"""


SINK = """
import sys
from aiohttp import web

async def sink(request):
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"received": size})

app = web.Application()
app.router.add_post("/{tail:.*}", sink)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


async def send(port: int, body: bytes, clients: int) -> list[object]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def post() -> int:
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(post() for _ in range(clients)), return_exceptions=True)


def measure(kind: str, clients: int, size: int, extra_args: list[str]) -> dict[str, object]:
    upstream_port, port, admin = free_port(), free_port(), free_port()
    log = Path(tempfile.mkdtemp(prefix="gateway-bodies-")) / "gateway.log"
    children: list[subprocess.Popen[bytes]] = []
    try:
        children.append(subprocess.Popen([sys.executable, "-c", SINK, str(upstream_port)]))
        with open(log, "wb") as out:
            gateway = subprocess.Popen([sys.executable, "-m", "llama_operator.cli", "gateway", "--listen",
                                        f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--upstream",
                                        f"m=http://127.0.0.1:{upstream_port}", *extra_args],
                                       stdout=out, stderr=subprocess.STDOUT)
        children.append(gateway)
        wait_http(f"http://127.0.0.1:{admin}/readyz")
        body = make_body(kind, size)
        before = status_kib(gateway.pid, "VmRSS")
        # The probe runs in a process of its own: this one is busy sending the bodies.
        probe = subprocess.Popen([sys.executable, "-c", PROBE, f"http://127.0.0.1:{port}/health"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        children.append(probe)
        time.sleep(0.5)
        start = time.perf_counter()
        codes = asyncio.run(send(port, body, clients))
        wall = time.perf_counter() - start
        worst = float(probe.communicate(b"stop\n", timeout=30)[0] or "nan")
        peak = status_kib(gateway.pid, "VmHWM")
        return {"kind": kind, "clients": clients, "mib": size / MIB, "rss_before_mib": before / 1024,
                "peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024,
                "worst_health_ms": worst * 1000, "wall_s": wall,
                "codes": sorted(str(c) if isinstance(c, int) else type(c).__name__ for c in codes)}
    finally:
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", action="append", choices=("image", "small-values"),
                        help="body kinds to send (repeatable; default both)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent POSTs (default %(default)s)")
    parser.add_argument("--mib", type=float, default=30, help="MiB per body (default %(default)s)")
    parser.add_argument("gateway_args", nargs="*", help="extra arguments for `llama-operator gateway` (after --)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print("| body | clients x MiB | RSS before | peak | growth | worst /health | wall | codes |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kind or ["image", "small-values"]:
        r = measure(kind, args.clients, int(args.mib * MIB), args.gateway_args)
        print(f"| {r['kind']} | {r['clients']} x {r['mib']:g} | {r['rss_before_mib']:.0f} MiB | "
              f"{r['peak_mib']:.0f} MiB | {r['growth_mib']:.0f} MiB | {r['worst_health_ms']:.0f} ms | "
              f"{r['wall_s']:.1f} s | {' '.join(r['codes'])} |", flush=True)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
