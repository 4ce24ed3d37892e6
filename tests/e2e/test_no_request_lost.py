"""No request lost while llama-server pods stop, on two real nodes (`llama-operator sandbox --nodes 2 --gateway`).

A bounded client loop streams chat completions (openai, max_retries=0) through the gateway and straight to the
LlamaServer's Service (the sandbox's local port for it, which like kube-proxy picks a ready endpoint per
connection), while the pods move:
- a rollout of a 2-replica server (a pod template change): 0 failed, 0 cut;
- `kubectl drain` of the node holding one replica: the PodDisruptionBudget holds, the replica moves, 0 failed;
- a scale-down 2 -> 1: 0 cut;
- the control: llama-server SIGTERMed in a replica (a stop without the drain) cuts streams: the counts can fail;
- a node stopped (every process of it killed, its containers too: a power cut): the streams in flight there fail
  once (at most 2 requests per client), the rest go on, the node turns NotReady, its pod is evicted after the
  LlamaServer's own 5 s `tolerations` and the replica comes back on the other node (the times are printed); the
  sandbox still stops cleanly, leaving no process.
A request *failed* when it raised before its first chunk; a stream was *cut* when it began and did not end with
a chunk carrying a finish_reason (the random tiny model may stop at EOS: a finish_reason is what counts). The
direct client opens a connection per request: a kept-alive connection stays on its pod when that pod leaves the
endpoints (docs/operations.md). The numbers are printed (`pytest -s`) and recorded in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llama_operator.contract import DRAIN_CONTAINER
from tests.e2e.containers import container_pids
from tests.e2e.harness import SandboxProcess, serve_file, tree_processes, wait_for
from tests.e2e.servers import apply_model, apply_server, pods, wait_server
from tests.e2e.test_gateway_load import GATEWAY, _llama_server_pid, _wait_gateway

pytestmark = pytest.mark.nodes

NS = "default"
SPEC = {"replicas": 2, "contextSize": 4096, "parallel": 1}
MAX_TOKENS = 1000
"""With ignore_eos, a stream long enough to be in progress when a pod stops: 1-3 s from the tiny model in a pod on
2 shared cores (one slot per replica, so a request may also wait for another)."""
THREADS = 2
"""Clients per path (the gateway, the Service)."""
TIMEOUT = 45.0
"""Per request: a stream to a stopped node gets no reset, only this timeout."""


@pytest.fixture(scope="module")
def pair(module_sandbox_factory: Any) -> SandboxProcess:
    return module_sandbox_factory(nodes="2", args=("--gateway",))


@pytest.fixture(scope="module")
def model_url(pair: SandboxProcess, tiny_gguf: Path) -> Iterator[str]:
    host = json.loads((pair.state_dir / "nodes.json").read_text())["hostAddress"]
    with serve_file(host, tiny_gguf) as url:
        yield url


@dataclass
class Tally:
    sent: int = 0
    complete: int = 0
    failed: int = 0
    cut: int = 0
    seconds: float = 0.0
    """Summed over the complete streams."""
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mean = f", {self.seconds / self.complete:.1f} s per complete stream" if self.complete else ""
        return f"sent {self.sent}, complete {self.complete}, failed {self.failed}, cut {self.cut}{mean}"


class Load:
    """`threads` clients per base URL, each streaming one chat completion after another until stopped."""

    def __init__(self, urls: dict[str, str], model: str, threads: int = THREADS) -> None:
        self.model = model
        self.tallies = {name: Tally() for name in urls}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(name, url), daemon=True)
                         for name, url in urls.items() for _ in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def _loop(self, name: str, url: str) -> None:
        # One connection per request: see the module docstring.
        http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=TIMEOUT,
                            trust_env=False)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
        while not self._stop.is_set():
            began = time.monotonic()
            outcome, error = self._one(client)
            with self._lock:
                tally = self.tallies[name]
                tally.sent += 1
                setattr(tally, outcome, getattr(tally, outcome) + 1)
                tally.seconds += time.monotonic() - began if outcome == "complete" else 0.0
                if error and len(tally.errors) < 5:
                    tally.errors.append(error)
        http.close()

    def _one(self, client: openai.OpenAI) -> tuple[str, str]:
        began = finished = False
        try:
            stream = client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Tell me a long story."}],
                max_tokens=MAX_TOKENS, stream=True, extra_body={"ignore_eos": True})
            for chunk in stream:
                began = True
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished = True
        except Exception as exc:  # noqa: BLE001 - every error of a request is counted, the kind is reported
            return ("cut" if began else "failed"), f"{type(exc).__name__}: {str(exc)[:200]}"
        if finished:
            return "complete", ""
        return ("cut", "stream ended without a finish_reason") if began else ("failed", "no chunk at all")

    def wait_complete(self, count: int, timeout: float = 60) -> None:
        """Until every client has finished `count` more streams (the load runs before and after a change)."""
        target = {name: tally.complete + count for name, tally in self.tallies.items()}
        wait_for(lambda: all(t.complete >= target[n] for n, t in self.tallies.items()), timeout=timeout,
                 message=f"{count} more complete streams per client")

    def report(self, what: str) -> None:
        print(f"\n{what}: " + "; ".join(f"{name}: {tally}" for name, tally in self.tallies.items()))
        for name, tally in self.tallies.items():
            for error in tally.errors:
                print(f"  {name} error: {error}")


def _server(pair: SandboxProcess, model_url: str, name: str) -> dict[str, str]:
    """A 2-replica server `name`, Ready on both nodes and routed by the gateway: the load's URLs."""
    apply_model(pair, NS, name, model_url)
    apply_server(pair, NS, name, **SPEC)
    wait_server(pair, NS, name, lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2,
                "Ready with 2 replicas")
    _wait_gateway(pair, name, 2)
    return {"gateway": pair.url(GATEWAY), "service": pair.url(f"{NS}/{name}")}


def _sidecar_rss_kib(pod: Any) -> int:
    """VmRSS of the drain sidecar's process in `pod` (on this machine: the nodes' containers are its processes)."""
    status = next(s for s in pod.status.init_container_statuses if s.name == DRAIN_CONTAINER)
    (pid, *_) = container_pids(status.container_id)
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1])


def _drain_log(pair: SandboxProcess, pod: str) -> list[str]:
    """What the drain sidecar of `pod` said once its /drain was called (empty before, or once the pod is gone)."""
    log = pair.kubectl("logs", pod, "-n", NS, "-c", DRAIN_CONTAINER, check=False).stdout
    lines = [line.split(" INFO ", 1)[-1] for line in log.splitlines()]
    return lines[next((i for i, line in enumerate(lines) if line.startswith("drain called")), len(lines)):]


def _live(pair: SandboxProcess, name: str) -> list[Any]:
    return [p for p in pods(pair, NS, name) if p.metadata.deletion_timestamp is None]


def _settled(pair: SandboxProcess, name: str, replicas: int, timeout: float = 120) -> None:
    """Until exactly `replicas` pods exist (none terminating) and all are Ready."""
    def done() -> bool:
        every = pods(pair, NS, name)
        return len(every) == replicas and all(
            any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or []) for p in every)
    wait_for(done, timeout=timeout, message=f"{name}: {replicas} ready pods and none terminating")


def _delete(pair: SandboxProcess, name: str) -> None:
    for plural in ("llamaservers", "llamamodels"):
        pair.kubectl("delete", plural, name, "-n", NS, "--wait=false", check=False)


def _assert(load: Load, *, failed: bool = True, cut: bool = True) -> None:
    for name, tally in load.tallies.items():
        assert tally.complete > 0, (name, tally)
        if failed:
            assert tally.failed == 0, (name, tally)
        if cut:
            assert tally.cut == 0, (name, tally)


def test_a_rollout_loses_no_request(pair: SandboxProcess, model_url: str) -> None:
    urls = _server(pair, model_url, "roll")
    before = {p.metadata.name for p in _live(pair, "roll")}
    rss = [_sidecar_rss_kib(p) for p in _live(pair, "roll")]
    with Load(urls, "roll") as load:
        load.wait_complete(1)
        started = time.monotonic()
        pair.custom.patch_namespaced_custom_object("llamacpp.dev", "v1beta1", NS, "llamaservers", "roll",
                                                   {"spec": {"podAnnotations": {"example.com/rollout": "2"}}})
        wait_for(lambda: not ({p.metadata.name for p in pods(pair, NS, "roll")} & before), timeout=180,
                 message="every old pod gone")
        _settled(pair, "roll", 2)
        rolled = time.monotonic() - started
        load.wait_complete(1)
    load.report(f"rollout of 2 replicas (both replaced in {rolled:.1f} s; drain sidecars' RSS before: "
                f"{', '.join(f'{kib / 1024:.1f} MiB' for kib in rss)})")
    _assert(load)
    _delete(pair, "roll")


def test_a_node_drain_loses_no_request(pair: SandboxProcess, model_url: str) -> None:
    urls = _server(pair, model_url, "drained")
    budgets = json.loads(pair.kubectl("get", "pdb", "-n", NS, "-o", "json").stdout)["items"]
    assert "drained" in [b["metadata"]["name"] for b in budgets], budgets
    node = sorted(p.spec.node_name for p in _live(pair, "drained"))[1]
    with Load(urls, "drained") as load:
        load.wait_complete(1)
        started = time.monotonic()
        drain = pair.kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--pod-selector",
                             "llamacpp.dev/server=drained", "--timeout=150s", timeout=180)
        try:
            assert "evicting pod" in drain.stderr + drain.stdout, drain
            _settled(pair, "drained", 2)
            moved = time.monotonic() - started
            assert node not in {p.spec.node_name for p in _live(pair, "drained")}
            load.wait_complete(1)
        finally:
            pair.kubectl("uncordon", node)
    load.report(f"kubectl drain of {node} (the replica moved, both ready in {moved:.1f} s)")
    _assert(load)
    _delete(pair, "drained")


def test_a_scale_down_cuts_no_stream(pair: SandboxProcess, model_url: str) -> None:
    urls = _server(pair, model_url, "shrink")
    with Load(urls, "shrink") as load:
        load.wait_complete(1)
        started = time.monotonic()
        pair.custom.patch_namespaced_custom_object("llamacpp.dev", "v1beta1", NS, "llamaservers", "shrink",
                                                   {"spec": {"replicas": 1}})
        stopping = wait_for(lambda: next((p.metadata.name for p in pods(pair, NS, "shrink")
                                          if p.metadata.deletion_timestamp is not None), None), timeout=30,
                            message="a pod stopping")
        said = wait_for(lambda: _drain_log(pair, stopping), timeout=30, message=f"the preStop of {stopping} calling")
        with contextlib.suppress(TimeoutError):  # the answer's line may be gone with the pod before it is read
            said = wait_for(lambda: len(log := _drain_log(pair, stopping)) > 1 and log, timeout=60, interval=0.1,
                            message="the drain's answer")
        _settled(pair, "shrink", 1)
        shrunk = time.monotonic() - started
        load.wait_complete(1)
    load.report(f"scale-down 2 -> 1 (the pod gone after {shrunk:.1f} s; its drain sidecar said: {said})")
    _assert(load)
    assert not any("spent" in line for line in said), said
    hooks = pair.kubectl("get", "events", "-n", NS, "--field-selector", "reason=FailedPreStopHook", check=False)
    assert "shrink" not in hooks.stdout, hooks.stdout
    _delete(pair, "shrink")


def test_sigterm_without_the_drain_cuts_streams(pair: SandboxProcess, model_url: str) -> None:
    """The control: what a stop without the drain does (llama-server SIGTERMed at once) is seen by the same load."""
    urls = _server(pair, model_url, "abrupt")
    with Load(urls, "abrupt") as load:
        load.wait_complete(1)
        os.kill(_llama_server_pid(_live(pair, "abrupt")[0]), signal.SIGTERM)
        time.sleep(1)
        _settled(pair, "abrupt", 2)  # the container restarts
        load.wait_complete(1)
    load.report("llama-server SIGTERMed in one replica, no drain (the control)")
    assert sum(t.cut + t.failed for t in load.tallies.values()) > 0, load.tallies
    _delete(pair, "abrupt")


FAST_FAILOVER = [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}
                 for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")]


def test_a_stopped_node_fails_only_what_it_held(pair: SandboxProcess, model_url: str) -> None:
    """Last: it leaves a dead node behind. The node without the gateway is the one stopped."""
    from tests.e2e.containers import power_off

    apply_model(pair, NS, "lost", model_url)
    apply_server(pair, NS, "lost", **SPEC, tolerations=FAST_FAILOVER)
    wait_server(pair, NS, "lost", lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2,
                "Ready with 2 replicas")
    _wait_gateway(pair, "lost", 2)
    gateway_nodes = {p.spec.node_name for p in pair.core.list_namespaced_pod("llama-system").items
                     if p.metadata.name.startswith("llama-operator-gateway")}
    nodes = {p.spec.node_name for p in _live(pair, "lost")}
    assert len(nodes) == 2, nodes
    (lost,) = sorted(nodes - gateway_nodes)[:1] or sorted(nodes)[:1]
    (kept,) = nodes - {lost}
    with Load({"gateway": pair.url(GATEWAY), "service": pair.url(f"{NS}/lost")}, "lost") as load:
        load.wait_complete(1)
        started = time.monotonic()
        killed = power_off(pair.state_dir, lost)
        assert killed > 0
        noticed = healed = float("nan")
        try:
            wait_for(lambda: any(c.type == "Ready" and c.status != "True"
                                 for c in pair.core.read_node(lost).status.conditions), timeout=120,
                     message=f"{lost} NotReady")
            noticed = time.monotonic() - started

            def back() -> bool:
                ready = [p for p in _live(pair, "lost") if p.spec.node_name == kept and any(
                    c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
                return len(ready) == 2
            wait_for(back, timeout=120, message=f"both replicas ready on {kept}")
            healed = time.monotonic() - started
            load.wait_complete(1, timeout=TIMEOUT + 30)  # a client may first wait out a stream to the dead node
        finally:
            load.report(f"{lost} stopped ({killed} processes killed): "
                        f"NotReady after {noticed:.1f} s, both replicas ready on {kept} after "
                        f"{healed:.1f} s")
    # Each client loses the stream it had there, and may lose one more request: a connection opened to the node
    # (a replica, or a gateway replica when the stopped node held one) before it left the endpoints. Every client
    # completed streams after (wait_complete above).
    for name, tally in load.tallies.items():
        assert tally.failed + tally.cut <= 2 * THREADS, (name, tally)
    # A power cut leaves a dead node's state behind: the sandbox still stops cleanly, leaving no process.
    state = pair.state_dir
    assert pair.stop() == 0, pair.log()
    assert tree_processes(str(state)) == []
