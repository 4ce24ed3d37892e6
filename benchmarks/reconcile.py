"""Reconcile at scale: N LlamaServers against a real control plane, time to N Deployments and N statuses, the
operator's CPU and peak RSS, its API requests per server, and what it sends while nothing changes.

Run: `make bench` (or `.venv/bin/python benchmarks/reconcile.py [--servers 200,1000,2000] [--quiet 60]` with
LLAMA_OPERATOR_CONTROL_PLANE_DIR from `make control-plane`). Each count of servers gets a fresh control plane:
etcd, kube-apiserver and kube-controller-manager on 127.0.0.1 (the real Deployment and ReplicaSet controllers
make a ReplicaSet and a pending pod per server, which the operator watches too). The operator runs as a real
`llama-operator run` subprocess, so its peak RSS (VmHWM) and CPU are its own. The model is a `volume` source:
resolution needs no network, and the numbers are the operator's reconcile path (kopf watch -> validate -> build
-> server-side apply -> status patch).

API requests come from the API server's own `apiserver_request_total` (/metrics), by verb (as it names them:
POST, PUT, APPLY, LIST ...) and resource, before and after, less the benchmark's own requests (counted as it
sends them) and less what only the controllers send (pod creation, Deployment status, Events, ReplicaSets):
what is left is the operator's. After the last status and the last pod, once the operator is idle (`settle`),
the benchmark waits `--quiet` seconds with nothing changing and counts every LIST the API server served then.
`--operator-path DIR` runs the operator from another checkout's `operator/` (a before/after comparison), with
that checkout's `crds/`.
The control plane shares the machine's cores with the operator: its CPU is reported too.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import needs  # benchmarks/needs.py, beside this file
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from llama_operator.controlplane import ControlPlane  # noqa: E402
from tests.cluster import ApiError, ClusterApi, apply_objects  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CRD = "llamacpp.dev/v1alpha1"
NS = "default"
WAIT_INTERVAL = 1.0
"""Seconds between the benchmark's own LISTs while it waits (they are subtracted, but they load the API server)."""
SETTLE_WINDOW = 5.0
"""The quiet count starts once the operator used under `SETTLE_CPU` of a core over this many seconds (the events
of the last pods, and the backlog of a loaded machine, are handled first)."""
SETTLE_CPU = 0.05
SETTLE_MAX = 180.0
OPERATOR_RESOURCES = {"llamaservers", "llamamodels", "deployments", "services", "pods", "configmaps",
                      "networkpolicies", "persistentvolumeclaims", "poddisruptionbudgets", "secrets", "leases",
                      "inferencepools"}
"""What the operator reads or writes (Events are left out: the controllers post one per scaled ReplicaSet)."""
CONTROLLERS_ONLY = {("POST", "pods", ""), ("PUT", "deployments", "status"), ("DELETE", "pods", "")}
"""Requests only kube-controller-manager sends on those resources (the operator never creates pods)."""
Counts = collections.Counter[tuple[str, str, str]]
_SAMPLE = re.compile(r'^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


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


def request_counts(api: ClusterApi) -> Counts:
    """apiserver_request_total summed by (verb, resource, subresource), as the API server counts them."""
    counts: Counts = collections.Counter()
    text = api.http.get("/metrics").text
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match.group(1)))
            counts[(labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))] += \
                int(float(match.group(2)))
    return counts


def classify(request: httpx.Request) -> tuple[str, str, str] | None:
    """(verb, resource, subresource) as the API server's metrics name a request; None for non-resource paths."""
    parts = request.url.path.strip("/").split("/")
    if parts[0] == "api":
        rest = parts[2:]
    elif parts[0] == "apis":
        rest = parts[3:]
    else:
        return None
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    if not rest:
        return None
    named = len(rest) > 1
    verb = "LIST" if request.method == "GET" and not named else request.method
    if request.method == "PATCH" and "apply-patch" in request.headers.get("content-type", ""):
        verb = "APPLY"
    return verb, rest[0], rest[2] if len(rest) > 2 else ""


def operators(delta: Counts, own: Counts) -> Counts:
    """The operator's share of a delta of the API server's counts (see the module docstring)."""
    out: Counts = collections.Counter()
    for key, count in delta.items():
        if key[1] in OPERATOR_RESOURCES and key not in CONTROLLERS_ONLY:
            left = count - own.get(key, 0)
            if left > 0:
                out[key] = left
    return out


def settle(pid: int) -> None:
    """Until the operator is idle (see `SETTLE_WINDOW`), at most `SETTLE_MAX` seconds."""
    deadline = time.monotonic() + SETTLE_MAX
    while time.monotonic() < deadline:
        before = _cpu_seconds(pid)
        time.sleep(SETTLE_WINDOW)
        if _cpu_seconds(pid) - before < SETTLE_CPU * SETTLE_WINDOW:
            return
    print(f"the operator was still busy after {SETTLE_MAX:g}s: the quiet count includes that", file=sys.stderr)


def _wait(api: ClusterApi, what: str, done: Any, timeout: float, servers: int) -> float:
    api.wait_for(done, timeout=timeout, interval=WAIT_INTERVAL * max(1, servers // 1000), message=what)
    return time.monotonic()


def count(api: ClusterApi, path: str) -> int:
    """How many objects a collection holds, from a LIST of one (the API server says how many remain)."""
    page = api.request("GET", path, params={"limit": "1"})
    return len(page.get("items") or []) + int((page.get("metadata") or {}).get("remainingItemCount") or 0)


def run(servers: int, quiet: float, operator_path: str | None, log_dir: pathlib.Path | None) -> dict[str, Any]:
    # The CRDs of the checkout the operator runs from: another version's may not accept this one's fields.
    checkout = pathlib.Path(operator_path).resolve().parent if operator_path else REPO
    crds = [yaml.safe_load(p.read_text()) for p in sorted((checkout / "crds").glob("*.yaml"))]
    with tempfile.TemporaryDirectory() as tmp, ControlPlane(pathlib.Path(tmp) / "cp", controllers=True) as cluster:
        api = ClusterApi(cluster, NS)
        own: Counts = collections.Counter()
        api.http.event_hooks["request"].append(lambda request: own.update([key] if (key := classify(request)) else []))
        apply_objects(api, crds)
        api.wait_for(lambda: crds_served(api), timeout=30, message="CRDs served")
        env = {**os.environ, "KUBECONFIG": str(cluster.admin_kubeconfig), "LLAMA_OPERATOR_METRICS_PORT": "0"}
        if operator_path:
            env["PYTHONPATH"] = os.pathsep.join([operator_path, env.get("PYTHONPATH", "")])
        log = open((log_dir or pathlib.Path(tmp)) / f"operator-{servers}.log", "w")  # noqa: SIM115
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
            counts_before, own_before = request_counts(api), own.copy()
            started = time.monotonic()
            for i in range(servers):
                api.create(CRD, "llamaservers", NS, {
                    "apiVersion": CRD, "kind": "LlamaServer", "metadata": {"name": f"server-{i:04d}"},
                    "spec": {"modelRef": {"name": "shared"}, "contextSize": 4096, "parallel": 2}})
            created = time.monotonic()
            deployments_done = _wait(api, f"{servers} Deployments", lambda: count(
                api, f"/apis/apps/v1/namespaces/{NS}/deployments") >= servers, 900, servers)
            statuses_done = _wait(api, f"{servers} statuses", lambda: sum(
                1 for s in api.list(CRD, "llamaservers", NS) if (s.get("status") or {}).get("endpoint")) >= servers,
                900, servers)
            cpu = _cpu_seconds(operator.pid) - cpu_before
            plane = {name: _cpu_seconds(pid) - plane_before.get(name, 0.0) for name, pid in cluster.pids().items()}
            # The controllers create the last pods after the last status; each is an event the operator answers.
            _wait(api, f"{servers} pods", lambda: count(api, f"/api/v1/namespaces/{NS}/pods") >= servers, 900,
                  servers)
            settle(operator.pid)
            counts_after, own_after = request_counts(api), own.copy()
            time.sleep(quiet)  # nothing changes: whatever the API server serves now is periodic
            counts_quiet, own_quiet = request_counts(api), own.copy()
            rss = _peak_rss_mib(operator.pid)
            if operator.poll() is not None:
                raise SystemExit(f"the operator exited ({operator.returncode}); its log: {log.name}")
        finally:
            operator.terminate()
            operator.wait(timeout=30)
            log.close()
            api.close()
    reconcile = operators(counts_after - counts_before, own_after - own_before)
    idle_all = (counts_quiet - counts_after) - (own_quiet - own_after)
    return {
        "servers": servers, "create_s": created - started, "deployments_s": deployments_done - started,
        "statuses_s": statuses_done - started, "operator_cpu_s": cpu, "peak_rss_mib": rss,
        "control_plane_cpu_s": sum(plane.values()), "requests": reconcile,
        "requests_per_server": sum(reconcile.values()) / servers,
        "quiet_lists": sum(n for (verb, _, _), n in idle_all.items() if verb == "LIST"),
        "quiet_requests": sum(operators(idle_all, collections.Counter()).values()),
        "quiet_by": {f"{verb} {resource}": n for (verb, resource, _), n in idle_all.items()
                     if verb == "LIST" or resource in OPERATOR_RESOURCES},
    }


def print_tables(results: list[dict[str, Any]], quiet: float) -> None:
    print(f"| servers | created in (s) | all Deployments (s) | all statuses (s) | operator CPU (s) "
          f"| operator peak RSS (MiB) | operator API requests / server | LISTs in a quiet {quiet:g} s "
          f"| operator requests in the quiet {quiet:g} s | control plane CPU (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['servers']} | {r['create_s']:.1f} | {r['deployments_s']:.1f} | {r['statuses_s']:.1f} "
              f"| {r['operator_cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['requests_per_server']:.1f} "
              f"| {r['quiet_lists']} | {r['quiet_requests']} | {r['control_plane_cpu_s']:.1f} |")
    keys = sorted({key for r in results for key in r["requests"]}, key=lambda k: (k[1], k[0], k[2]))
    print()
    print("| operator requests per server (verb resource[/subresource]) | "
          + " | ".join(str(r["servers"]) for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for verb, resource, sub in keys:
        cells = " | ".join(f"{r['requests'].get((verb, resource, sub), 0) / r['servers']:.2f}" for r in results)
        print(f"| {verb} {resource}{'/' + sub if sub else ''} | {cells} |")
    for r in results:
        if r["quiet_by"]:
            print(f"\n{r['servers']} servers, in the quiet {quiet:g} s: "
                  + ", ".join(f"{k} {n}" for k, n in sorted(r["quiet_by"].items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="200,1000,2000",
                        help="comma-separated counts of LlamaServers, one fresh control plane each")
    parser.add_argument("--quiet", type=float, default=60.0, help="seconds counted with nothing changing")
    parser.add_argument("--operator-path", help="run the operator from this directory (another checkout's operator/)")
    parser.add_argument("--logs", type=pathlib.Path, help="keep the operator's log of each run in this directory")
    args = parser.parse_args()
    try:
        counts = [int(n) for n in args.servers.split(",")]
    except ValueError:
        parser.error(f"--servers: not a comma-separated list of counts: {args.servers!r}")
    if not counts or any(n < 1 or n > 10_000 for n in counts):
        parser.error("--servers: each count between 1 and 10000")
    # One line when the binaries are missing; found where `make control-plane` left them, ControlPlane uses them.
    os.environ[needs.tiers.ENV_DIR] = needs.tool(needs.tiers.CONTROL_PLANE)
    results = []
    for servers in counts:
        results.append(run(servers, args.quiet, args.operator_path, args.logs))
        print(f"{servers} servers done", file=sys.stderr, flush=True)
    print_tables(results, args.quiet)


if __name__ == "__main__":
    main()
