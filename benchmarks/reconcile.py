"""Reconcile throughput: create N LlamaServers against a real control plane and time until N Deployments exist.

Run: `make bench` (or `.venv/bin/python benchmarks/reconcile.py [--servers 200]` with
LLAMA_OPERATOR_CONTROL_PLANE_DIR from `make control-plane`). etcd, kube-apiserver and kube-controller-manager
run on 127.0.0.1 (the real Deployment and ReplicaSet controllers make a ReplicaSet and a pending pod per server,
which the operator watches too); the operator runs as a real `llama-operator run` subprocess, so its peak RSS
(VmHWM) and CPU are its own. The model is a `volume` source, so resolution needs no network and the numbers are
the operator's reconcile path: kopf watch -> validate -> build -> server-side apply (Deployment + Service) ->
list pods -> status patch. The control plane shares the 2 cores with the operator: its CPU is reported too.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import needs  # benchmarks/needs.py, beside this file
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llama_operator.controlplane import ControlPlane  # noqa: E402
from tests.cluster import ApiError, ClusterApi, apply_objects  # noqa: E402

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


def crds_served(api: ClusterApi) -> bool:
    """A CRD's resource is 404 until the API server has loaded it (wait_for does not retry on exceptions)."""
    try:
        api.request("GET", f"/apis/{CRD}/llamaservers", params={"limit": "1"})
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def run(servers: int) -> dict[str, float]:
    crds = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml"))]
    with tempfile.TemporaryDirectory() as tmp, ControlPlane(pathlib.Path(tmp) / "cp", controllers=True) as cluster:
        api = ClusterApi(cluster, NS)
        apply_objects(api, crds)
        api.wait_for(lambda: crds_served(api), timeout=30, message="CRDs served")
        env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig), "LLAMA_OPERATOR_METRICS_PORT": "0"}
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
            plane_before = {name: _cpu_seconds(pid) for name, pid in cluster.pids().items()}
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
            plane = {name: _cpu_seconds(pid) - plane_before.get(name, 0.0) for name, pid in cluster.pids().items()}
        finally:
            operator.terminate()
            operator.wait(timeout=30)
            log.close()
            api.close()
    return {
        "servers": servers,
        "create_s": created - started,
        "deployments_s": deployments_done - started,
        "statuses_s": statuses_done - started,
        "per_server_ms": (deployments_done - started) / servers * 1000,
        "peak_rss_mib": rss,
        "operator_cpu_ms_per_server": cpu / servers * 1000,
        "control_plane_cpu_s": sum(plane.values()),
        "apiserver_cpu_s": plane.get("kube-apiserver", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=200)
    servers = parser.parse_args().servers
    # One line when the binaries are missing; found where `make control-plane` left them, ControlPlane uses them.
    os.environ[needs.tiers.ENV_DIR] = needs.tool(needs.tiers.CONTROL_PLANE)
    result = run(servers)
    print("| servers | created in (s) | all Deployments (s) | all statuses (s) | wall ms/server "
          "| operator CPU ms/server | operator peak RSS (MiB) | control plane CPU (s) | of it kube-apiserver (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {result['servers']} | {result['create_s']:.1f} | {result['deployments_s']:.1f} | "
          f"{result['statuses_s']:.1f} | {result['per_server_ms']:.0f} | {result['operator_cpu_ms_per_server']:.0f} "
          f"| {result['peak_rss_mib']:.0f} | {result['control_plane_cpu_s']:.1f} | {result['apiserver_cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
