"""Reconcile throughput: create N LlamaServers against the API emulator and time until N Deployments exist.

Run: `.venv/bin/python benchmarks/reconcile.py [--servers 200]` (or `make bench`). The operator runs as a real
`llama-operator run` subprocess, so its peak RSS (VmHWM) is its own. The model is a `volume` source, so
resolution needs no network and the numbers are the operator's reconcile path: kopf watch -> validate ->
build -> server-side apply (Deployment + Service) -> list pods -> status patch.

The emulator keeps only its newest 256 requests (kmock matches each request against its whole log, which is
quadratic over a long run). The emulator still shares the machine with the operator, so the wall-clock columns
include its cost; "operator CPU ms/server" (utime + stime of the operator process) is the operator's own.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import yaml

from llama_operator.emulator import EmulatorThread, write_kubeconfig

REPO = pathlib.Path(__file__).resolve().parents[1]
CRD = "llamacpp.dev/v1alpha1"
NS = "default"


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _peak_rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(servers: int) -> dict[str, float]:
    crds = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml"))]
    with EmulatorThread(crds=crds, request_log_limit=256) as api, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = write_kubeconfig(pathlib.Path(tmp) / "kubeconfig", api.url)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LLAMA_OPERATOR_METRICS_PORT": "0"}
        log = open(pathlib.Path(tmp) / "operator.log", "w")  # noqa: SIM115
        operator = subprocess.Popen([sys.executable, "-m", "llama_operator.cli", "run"], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            api.create(CRD, "llamamodels", NS, {
                "apiVersion": CRD, "kind": "LlamaModel", "metadata": {"name": "shared"},
                "spec": {"source": {"volume": {"persistentVolumeClaim": "models", "path": "m/model.gguf"}}}})
            api.wait_for(lambda: (api.read(CRD, "llamamodels", NS, "shared") or {}).get("status", {})
                         .get("phase") == "Ready", timeout=60, message="model Ready")
            cpu_before = _cpu_seconds(operator.pid)
            started = time.monotonic()
            for i in range(servers):
                api.create(CRD, "llamaservers", NS, {
                    "apiVersion": CRD, "kind": "LlamaServer", "metadata": {"name": f"server-{i:04d}"},
                    "spec": {"modelRef": {"name": "shared"}, "contextSize": 4096, "parallel": 2}})
            created = time.monotonic()
            api.wait_for(lambda: len(api.list("apps/v1", "deployments", NS)) >= servers, timeout=600,
                         interval=0.2, message=f"{servers} Deployments")
            deployments_done = time.monotonic()
            api.wait_for(lambda: sum(1 for s in api.list(CRD, "llamaservers", NS)
                                     if (s.get("status") or {}).get("endpoint")) >= servers,
                         timeout=600, interval=0.2, message=f"{servers} statuses")
            statuses_done = time.monotonic()
            rss = _peak_rss_mib(operator.pid)
            cpu = _cpu_seconds(operator.pid) - cpu_before
        finally:
            operator.terminate()
            operator.wait(timeout=30)
            log.close()
    return {
        "servers": servers,
        "create_s": created - started,
        "deployments_s": deployments_done - started,
        "statuses_s": statuses_done - started,
        "per_server_ms": (deployments_done - started) / servers * 1000,
        "peak_rss_mib": rss,
        "operator_cpu_ms_per_server": cpu / servers * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=200)
    result = run(parser.parse_args().servers)
    print("| servers | created in (s) | all Deployments (s) | all statuses (s) | wall ms/server "
          "| operator CPU ms/server | operator peak RSS (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {result['servers']} | {result['create_s']:.1f} | {result['deployments_s']:.1f} | "
          f"{result['statuses_s']:.1f} | {result['per_server_ms']:.0f} | {result['operator_cpu_ms_per_server']:.0f} "
          f"| {result['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
