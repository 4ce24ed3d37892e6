"""The test plays the kubelet: real llama-server processes for the pods the real ReplicaSet controller makes,
each in a network namespace of its own with an address the real EndpointSlice controller accepts.

EndpointSlice validation refuses loopback addresses, so every pod gets `10.244.N.k/24` on a veth into a bridge
(`gwkb<N>`, host side `10.244.N.1`, the Node's InternalIP); N is the first /24 of 10.244.0.0/16 unused on this
machine. Nothing is routed off the machine and only these addresses are ever connected to. Needs root.

What it does, like a kubelet for one Node:
- registers the Node (Ready, addresses, capacity), renews its Lease and heartbeat so node-lifecycle keeps it Ready;
- binds unscheduled pods of the namespace to it (`pods/binding`, as the scheduler would), skips their init
  containers (the model is a local file: `--model` is replaced by it, every other argument is the operator's),
  starts `llama-server` in the pod's namespace and writes the pod status (podIP, Running, then Ready once
  `/health` answers 200, probed every `probe_period` seconds, `failure_threshold` misses to unready);
- restarts a container that died (restartCount + 1) after `restart_delay` seconds, as restartPolicy Always;
- on deletion: SIGTERM, then SIGKILL after the grace period, the namespace removed, the pod deleted for good.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_operator.clock import now_rfc3339
from llama_operator.controlplane.cluster import die_with_parent
from llama_operator.sandbox.network import run_ip, used_networks
from tests.cluster import ClusterApi

log = logging.getLogger(__name__)

SUPERNET = ipaddress.ip_network("10.244.0.0/16")


@dataclass
class PodRun:
    name: str
    uid: str
    netns: str
    veth: str
    ip: str
    args: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    misses: int = 0
    restarts: int = 0
    died_at: float | None = None
    started_at: str = ""
    events: list[str] = field(default_factory=list)


class ProcessKubelet:
    def __init__(self, api: ClusterApi, *, llama_server: str, model: Path, workdir: Path,
                 probe_period: float = 0.5, failure_threshold: int = 3, restart_delay: float = 1.0) -> None:
        self.api = api
        self.namespace = api.namespace
        self.node = f"gwnode-{self.namespace}"[:63]
        self.llama_server = llama_server
        self.model = model
        self.workdir = workdir
        self.probe_period = probe_period
        self.failure_threshold = failure_threshold
        self.restart_delay = restart_delay
        self.pods: dict[str, PodRun] = {}
        self.started: list[tuple[float, str]] = []
        """(monotonic time, pod name) of every llama-server start."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._next_host = 2
        self.index = -1

    # -- network ---------------------------------------------------------------------------------------

    @property
    def bridge(self) -> str:
        return f"gwkb{self.index}"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return list(SUPERNET.subnets(new_prefix=24))[self.index]

    @property
    def node_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    def _setup_network(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the process kubelet needs root (network namespaces)")
        used = used_networks()
        for index, subnet in enumerate(SUPERNET.subnets(new_prefix=24)):
            if index < 10 or any(subnet.overlaps(n) for n in used):
                continue
            if run_ip("link", "add", f"gwkb{index}", "type", "bridge", check=False).returncode == 0:
                self.index = index
                break
        else:
            raise RuntimeError("no free /24 in 10.244.0.0/16")
        run_ip("addr", "add", f"{self.node_ip}/24", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")

    def _pod_network(self, uid: str) -> tuple[str, str, str]:
        with self._lock:
            host = self._next_host
            self._next_host += 1
        ip = str(self.subnet.network_address + host)
        netns = f"gwkb{self.index}-{uid[:8]}"
        veth = f"gwk{self.index}x{host}"
        run_ip("netns", "add", netns)
        run_ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        run_ip("link", "set", veth, "master", self.bridge)
        run_ip("link", "set", veth, "up")
        run_ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run_ip("-n", netns, "link", "set", "eth0", "up")
        run_ip("-n", netns, "link", "set", "lo", "up")
        return netns, veth, ip

    # -- node ------------------------------------------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        now = now_rfc3339()
        conditions = [{"type": t, "status": s, "reason": r, "lastHeartbeatTime": now, "lastTransitionTime": now}
                      for t, s, r in (("Ready", "True", "KubeletReady"),
                                      ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                                      ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                                      ("PIDPressure", "False", "KubeletHasSufficientPID"))]
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        return {"status": {"conditions": conditions, "capacity": capacity, "allocatable": capacity,
                           "addresses": [{"type": "InternalIP", "address": self.node_ip},
                                         {"type": "Hostname", "address": self.node}],
                           "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                           "nodeInfo": {"kubeletVersion": "v1.35.4", "architecture": "amd64", "operatingSystem":
                                        "linux", "containerRuntimeVersion": "process://test", "kernelVersion": "",
                                        "osImage": "", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                                        "bootID": ""}}}

    def _register_node(self) -> None:
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        if self.api.read("v1", "nodes", None, self.node) is None:
            self.api.create("v1", "nodes", None, {"apiVersion": "v1", "kind": "Node",
                                                 "metadata": {"name": self.node, "labels": labels}})
        self._heartbeat()

    def _heartbeat(self) -> None:
        self.api.patch("v1", "nodes", None, self.node, self._node_status(), subresource="status")
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40,
                          "renewTime": now_rfc3339(micro=True)}}
        if self.api.read("coordination.k8s.io/v1", "leases", "kube-node-lease", self.node) is None:
            self.api.create("coordination.k8s.io/v1", "leases", "kube-node-lease", lease)
        else:
            self.api.patch("coordination.k8s.io/v1", "leases", "kube-node-lease", self.node,
                           {"spec": {"renewTime": now_rfc3339(micro=True)}})

    def _heartbeats(self) -> None:
        while not self._stop.wait(5):
            with contextlib.suppress(Exception):
                self._heartbeat()

    # -- pods ------------------------------------------------------------------------------------------

    def _server_args(self, pod: dict[str, Any]) -> list[str]:
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "llama-server"]
        args = list(container.get("args") or [])
        args[args.index("--model") + 1] = str(self.model)
        return args

    def _start(self, run: PodRun) -> None:
        out = open(run.log_path, "ab")  # noqa: SIM115  (kept open by the child)
        run.process = subprocess.Popen(["ip", "netns", "exec", run.netns, self.llama_server, *run.args],
                                       stdout=out, stderr=subprocess.STDOUT,
                                       preexec_fn=functools.partial(die_with_parent, signal.SIGKILL))
        out.close()
        run.started_at = now_rfc3339()
        run.ready, run.misses, run.died_at = False, 0, None
        self.started.append((time.monotonic(), run.name))
        self._write_status(run)

    def _write_status(self, run: PodRun) -> None:
        alive = run.process is not None and run.process.poll() is None
        state: dict[str, Any] = {"running": {"startedAt": run.started_at}} if alive else {
            "waiting": {"reason": "CrashLoopBackOff" if run.restarts else "ContainerCreating"}}
        ready = "True" if run.ready else "False"
        now = now_rfc3339()
        status = {
            "phase": "Running", "hostIP": self.node_ip, "hostIPs": [{"ip": self.node_ip}], "podIP": run.ip,
            "podIPs": [{"ip": run.ip}], "startTime": run.started_at,
            "conditions": [{"type": t, "status": s, "lastTransitionTime": now} for t, s in (
                ("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", ready), ("Ready", ready))],
            "initContainerStatuses": [
                {"name": "fetch-model", "ready": True, "restartCount": 0, "image": "test", "imageID": "",
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}],
            "containerStatuses": [{"name": "llama-server", "ready": run.ready, "started": alive,
                                   "restartCount": run.restarts, "image": "test", "imageID": "", "state": state}],
        }
        with contextlib.suppress(Exception):
            self.api.patch("v1", "pods", self.namespace, run.name, {"status": status}, subresource="status")

    def _probe(self, run: PodRun) -> bool:
        try:
            with urllib.request.urlopen(f"http://{run.ip}:8080/health", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def _adopt(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        if not pod["spec"].get("nodeName"):
            self.api.request("POST", f"/api/v1/namespaces/{self.namespace}/pods/{meta['name']}/binding",
                             body={"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                                   "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}})
        elif pod["spec"]["nodeName"] != self.node:
            return
        netns, veth, ip = self._pod_network(meta["uid"])
        run = PodRun(meta["name"], meta["uid"], netns, veth, ip, self._server_args(pod),
                     self.workdir / f"{meta['name']}.log")
        self.pods[meta["name"]] = run
        self._start(run)

    def _remove(self, run: PodRun, *, grace: float = 5.0) -> None:
        if run.process is not None and run.process.poll() is None:
            run.process.terminate()
            try:
                run.process.wait(grace)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait()
        run_ip("netns", "del", run.netns, check=False)
        run_ip("link", "del", run.veth, check=False)
        self.pods.pop(run.name, None)
        with contextlib.suppress(Exception):
            self.api.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{run.name}",
                             body={"gracePeriodSeconds": 0})

    def _sync(self) -> None:
        pods = {p["metadata"]["name"]: p for p in self.api.list("v1", "pods", self.namespace)}
        for name, pod in pods.items():
            if pod["metadata"].get("deletionTimestamp"):
                if name in self.pods:
                    self._remove(self.pods[name])
                else:
                    with contextlib.suppress(Exception):
                        self.api.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{name}",
                                         body={"gracePeriodSeconds": 0})
            elif name not in self.pods:
                self._adopt(pod)
        for name in [n for n in self.pods if n not in pods]:
            self._remove(self.pods[name], grace=0.5)
        for run in list(self.pods.values()):
            assert run.process is not None
            if run.process.poll() is not None:
                if run.died_at is None:
                    run.died_at = time.monotonic()
                if run.ready:
                    run.misses += 1
                    if run.misses >= self.failure_threshold:  # the readiness probe finally notices
                        run.ready = False
                        self._write_status(run)
                if not run.ready and time.monotonic() - run.died_at >= self.restart_delay:
                    run.restarts += 1
                    self._start(run)
                continue
            healthy = self._probe(run)
            if healthy and not run.ready:
                run.ready, run.misses = True, 0
                self._write_status(run)
            elif not healthy and run.ready:
                run.misses += 1
                if run.misses >= self.failure_threshold:
                    run.ready = False
                    self._write_status(run)

    def _loop(self) -> None:
        while not self._stop.wait(self.probe_period):
            try:
                self._sync()
            except Exception:
                log.exception("process kubelet")

    # -- control ---------------------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """SIGKILL the llama-server of a pod (the kubelet notices through its probes and restarts it)."""
        run = self.pods[name]
        assert run.process is not None
        run.process.kill()

    def ready_pods(self) -> list[PodRun]:
        return [run for run in self.pods.values() if run.ready]

    def __enter__(self) -> ProcessKubelet:
        self._setup_network()
        self._register_node()
        for target in (self._loop, self._heartbeats):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        for run in list(self.pods.values()):
            self._remove(run, grace=1.0)
        run_ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(Exception):
            self.api.delete("v1", "nodes", None, self.node)
        with contextlib.suppress(Exception):
            self.api.delete("coordination.k8s.io/v1", "leases", "kube-node-lease", self.node)
