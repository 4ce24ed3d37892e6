"""The fit benchmark's cases as real containers (`benchmarks/fit.py --cgroup`): the peak of the llama-server
container's memory cgroup next to the process's VmHWM.

`RealNode(models)` starts `llama-operator sandbox --nodes 1` once (one real kubelet with containerd, the chart and
the images built from this repo), serves the GGUFs over plain HTTP on the address pods reach this machine at and
makes one LlamaModel (`http` source, the default EmptyDir cache) per model. `.measure(...)` runs one case the way a
user would: a LlamaServer with the case's `contextSize`, `cacheTypeK/V` (`flashAttention: on` for a quantized V
cache, which the API requires; llama.cpp's `auto` turns it on for fit.py's local runs), `threads: 2` (what fit.py
passes), requests cpu 500m and a 4Gi memory limit (far above every case: the peak is the server's, not the
limit's), waits for Ready, sends fit.py's context-filling completion through the Service and reads, on the host:
- the container's memory cgroup (cgroup v1, `<memory mount>/<node>/kubepods/[<qos>/]pod<uid>/<container id>`:
  the kubelet's `cgroupRoot` is `/<node name>`, operator/llama_operator/nodes/kubelet.py, and containerd's runc
  names the leaf by the container id): `memory.max_usage_in_bytes` (what the limit is checked against: the kernel
  OOM-kills the container when its usage cannot be brought under the limit), `memory.kmem.max_usage_in_bytes`
  (kernel memory, part of that usage in v1) and `memory.stat` at the end (rss, cache, mapped_file);
- the pod's cgroup peak (hierarchical: it counts the fetch init container's writes, the GGUF's page cache);
- the container's llama-server process (its pid from the cgroup's `cgroup.procs`): VmRSS at Ready (load) and
  VmHWM after the completion (peak), as fit.py reads them from a local process.
Then the LlamaServer is deleted and its pod awaited gone, so cases never overlap. Needs root and what the sandbox
needs (`make control-plane node-kit images llama-server`, helm).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes.client.rest import ApiException

from tests.e2e.harness import SandboxProcess, custom_object, sandbox_requirements, serve_file, wait_for

GROUP, VERSION, NS = "llamacpp.dev", "v1alpha1", "default"
SERVER_CONTAINER = "llama-server"
MEMORY_LIMIT = "4Gi"
QUANTIZED = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")


@dataclass
class CgroupMeasured:
    load: int
    peak: int
    cgroup_peak: int
    kmem_peak: int
    pod_peak: int
    stat: dict[str, int] = field(default_factory=dict)
    buffers: dict[str, float] = field(default_factory=dict)


def memory_mount() -> Path:
    """Mount point of the cgroup v1 memory hierarchy (RuntimeError on a cgroup v2-only machine)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _source, options = (right.split(" ") + ["", ""])[:3]
        if fstype == "cgroup" and "memory" in options.split(","):
            return Path(left.split(" ")[4])
    raise RuntimeError("no cgroup v1 memory hierarchy on this machine (the cgroup column reads v1 files)")


def container_cgroup(mount: Path, node: str, container_id: str) -> Path:
    """The container's memory cgroup directory under the node's kubepods (`containerd://<id>` or `<id>`)."""
    cid = container_id.rpartition("://")[2]
    kubepods = mount / node / "kubepods"
    for pattern in (f"pod*/{cid}", f"*/pod*/{cid}"):  # Guaranteed pods sit directly under kubepods
        found = [p for p in kubepods.glob(pattern) if p.is_dir()]
        if found:
            return found[0]
    raise RuntimeError(f"no memory cgroup for container {cid} under {kubepods}")


def read_int(directory: Path, name: str) -> int:
    return int((directory / name).read_text().split()[0])


def read_stat(directory: Path) -> dict[str, int]:
    pairs = (line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return {key: int(value) for key, value in pairs}


def server_pid(cgroup: Path) -> int:
    """The llama-server process among the container cgroup's processes (host pid namespace)."""
    for pid in (cgroup / "cgroup.procs").read_text().split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "llama-server":
                return int(pid)
        except OSError:
            continue
    raise RuntimeError(f"no llama-server process in {cgroup}")


def status_kib(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def server_name(model: str, ctx: int, cache_type: str) -> str:
    return f"fit-{model}-{ctx}-{cache_type}".replace("_", "-").lower()


class RealNode:
    """One sandbox with one real node for all cases; a context manager (the sandbox stops on exit)."""

    def __init__(self, models: dict[str, Path]) -> None:
        self.models = models
        self.mount = memory_mount()
        self._tmp = tempfile.TemporaryDirectory(prefix="fit-cgroup-")
        self.sandbox: SandboxProcess | None = None
        self._serving = None

    def __enter__(self) -> RealNode:
        env = {**os.environ, **sandbox_requirements()}
        started = time.monotonic()
        self.sandbox = SandboxProcess(Path(self._tmp.name) / "state", env, nodes="1")
        try:
            self._start(started)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self, started: float) -> None:
        sandbox = self.sandbox
        assert sandbox is not None
        sandbox.wait_ready()
        self.start_s = time.monotonic() - started
        host = json.loads((sandbox.state_dir / "nodes.json").read_text())["hostAddress"]
        directories = {path.parent for path in self.models.values()}
        if len(directories) != 1:
            raise RuntimeError("fit_cgroup serves the models from one directory")
        self._serving = serve_file(host, next(iter(self.models.values())))
        base = self._serving.__enter__().rsplit("/", 1)[0]
        for name, path in self.models.items():
            sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", custom_object(
                "llamamodels", name, {"source": {"http": {"url": f"{base}/{path.name}"}}}))
        for name in self.models:
            wait_for(lambda name=name: self._status("llamamodels", name).get("phase") == "Ready", timeout=180,
                     message=f"LlamaModel {name} Ready")

    def __exit__(self, *exc: object) -> None:
        if self._serving is not None:
            self._serving.__exit__(None, None, None)
            self._serving = None
        if self.sandbox is not None:
            self.sandbox.stop()
            self.sandbox = None
        self._tmp.cleanup()

    def _status(self, plural: str, name: str) -> dict:
        assert self.sandbox is not None
        try:
            return self.sandbox.custom.get_namespaced_custom_object(GROUP, VERSION, NS, plural, name).get(
                "status") or {}
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise

    def measure(self, model: str, ctx: int, cache_type: str, prompt: int) -> CgroupMeasured:
        sandbox = self.sandbox
        assert sandbox is not None
        name = server_name(model, ctx, cache_type)
        spec: dict = {"modelRef": {"name": model}, "contextSize": ctx, "cacheTypeK": cache_type,
                      "cacheTypeV": cache_type, "threads": 2,
                      "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": MEMORY_LIMIT}}}
        if cache_type in QUANTIZED:
            spec["flashAttention"] = "on"
        sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers",
                                                       custom_object("llamaservers", name, spec))
        try:
            return self._measure(name, prompt)
        finally:
            sandbox.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", name)
            wait_for(lambda: not sandbox.core.list_namespaced_pod(
                NS, label_selector=f"llamacpp.dev/server={name}").items, timeout=120, message=f"{name}'s pod gone")

    def _measure(self, name: str, prompt: int) -> CgroupMeasured:
        sandbox = self.sandbox
        assert sandbox is not None
        wait_for(lambda: self._status("llamaservers", name).get("phase") == "Ready", timeout=300,
                 message=f"LlamaServer {name} Ready")
        pod = sandbox.core.list_namespaced_pod(NS, label_selector=f"llamacpp.dev/server={name}").items[0]
        container = next(c for c in pod.status.container_statuses if c.name == SERVER_CONTAINER)
        cgroup = container_cgroup(self.mount, pod.spec.node_name, container.container_id)
        pid = server_pid(cgroup)
        time.sleep(0.5)
        load = status_kib(pid, "VmRSS")
        body = json.dumps({"prompt": [100 + i % 50 for i in range(prompt)], "n_predict": 4,
                           "cache_prompt": False}).encode()
        request = urllib.request.Request(f"{sandbox.url(f'{NS}/{name}')}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=900) as response:
            response.read()
        restarts = next(c for c in sandbox.core.read_namespaced_pod(pod.metadata.name, NS).status.container_statuses
                        if c.name == SERVER_CONTAINER).restart_count
        if restarts:
            raise RuntimeError(f"{name}: the container restarted during the case (OOM-killed at {MEMORY_LIMIT}?)")
        return CgroupMeasured(load=load, peak=status_kib(pid, "VmHWM"),
                              cgroup_peak=read_int(cgroup, "memory.max_usage_in_bytes"),
                              kmem_peak=read_int(cgroup, "memory.kmem.max_usage_in_bytes"),
                              pod_peak=read_int(cgroup.parent, "memory.max_usage_in_bytes"),
                              stat=read_stat(cgroup))
