"""Two gateway replicas on two real nodes (`llama-operator sandbox --nodes 2 --gateway`, the chart's default of two),
a streaming client loop through the gateway Service (the sandbox's host port, round-robin over the ready gateway
pods), and gateway replicas SIGKILLed in turn: the one that does not decide with its pod force-deleted (a lost node:
it never comes back under its name, its report must age out), then the decider (the kubelet restarts it under its
pod name), then the decider again with its pod force-deleted (the other replica must take the Lease over).

Asserted: only streams that were in flight on the killed replica fail (at most its own in-flight count read
just before the kill), every request started once the kill is a second old is served, and a replica decides
again (the other, or the killed one restarted under its pod name) within the Lease's bound. Reported
(`pytest -s`): requests sent, failed, the killed replica's in-flight count, the time until its load is gone from
the decider's view (what it counts from its peer, `llama_gateway_peer_active_requests`, no larger than what that
replica, restarted or not, counts itself), and the time until a replica decides again after the decider is killed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import openai
import pytest

from llama_operator.nodes.host import HOST_ADDRESS
from tests.e2e.conftest import SandboxProcess, wait_for
from tests.e2e.containers import main_pid
from tests.e2e.test_gateway_load import DIRECT, FILE, GATEWAY, NS, REPO, _ready_pods
from tests.e2e.test_sandbox import _create, _wait_phase
from tests.fakehub import FakeHub

pytestmark = pytest.mark.nodes

SYSTEM = "llama-system"
GATEWAY_PODS = "app.kubernetes.io/name=llama-gateway"
GATEWAY_DEPLOYMENT = "llama-operator-gateway"
MODEL = f"{NS}/steady"


@pytest.fixture(scope="module")
def sandbox(module_sandbox_factory: Callable[..., SandboxProcess], tiny_gguf: Path) -> Iterator[SandboxProcess]:
    hub = FakeHub()
    hub.add(REPO, FILE, tiny_gguf)
    with hub.running(HOST_ADDRESS):
        yield module_sandbox_factory(nodes="2", env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url}, args=("--gateway",))


def gateway_pods(sandbox: SandboxProcess) -> list[Any]:
    """The running, ready gateway pods."""
    return [pod for pod in sandbox.core.list_namespaced_pod(SYSTEM, label_selector=GATEWAY_PODS).items
            if pod.metadata.deletion_timestamp is None and pod.status.pod_ip and any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])]


def metric(ip: str, name: str, model: str | None = None) -> float | None:
    """A metric of the gateway at `ip` (summed over series, of one model when given); None when unreachable."""
    try:
        with DIRECT.open(f"http://{ip}:9090/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if (line.startswith(name + "{") and (model is None or f'model="{model}"' in line))
               or (model is None and line.startswith(name + " ")))


def _leader(sandbox: SandboxProcess) -> tuple[Any, Any]:
    """(the deciding gateway pod, the other) once exactly one of two ready replicas holds the Lease."""
    def found() -> tuple[Any, Any] | None:
        pods = gateway_pods(sandbox)
        leading = [p for p in pods if metric(p.status.pod_ip, "llama_gateway_leader") == 1]
        others = [p for p in pods if p not in leading]
        return (leading[0], others[0]) if len(pods) == 2 and len(leading) == 1 else None
    return wait_for(found, timeout=60, message="two ready gateway replicas, one of them deciding")


class Load:
    """Streaming clients through the gateway Service, each outcome with its start time."""

    def __init__(self, sandbox: SandboxProcess, workers: int = 6) -> None:
        # max_retries=0: a request the gateways lost shows as lost, not retried by the client.
        self.client = openai.OpenAI(base_url=sandbox.url(GATEWAY) + "/v1", api_key="unused", max_retries=0,
                                    timeout=60)
        self.outcomes: list[tuple[float, float, bool, bool, str]] = []  # (started, ended, ok, had a byte, error)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.futures = [self.pool.submit(self._worker) for _ in range(workers)]

    def _worker(self) -> None:
        while not self.stop.is_set():
            started, chunks, error = time.monotonic(), 0, ""
            try:
                for _ in self.client.completions.create(model="steady", prompt="go", max_tokens=300, stream=True,
                                                        extra_body={"ignore_eos": True}):
                    chunks += 1
            except (openai.APIError, OSError) as exc:
                error = f"{type(exc).__name__}: {str(exc)[:120]}"
            with self.lock:
                self.outcomes.append((started, time.monotonic(), not error, chunks > 0, error))

    def close(self) -> None:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()


def _reported(sandbox: SandboxProcess, pod: Any) -> int:
    """In flight + held for MODEL in the pod's own load report (its Lease), as the decider last read it."""
    lease = kubernetes.client.CoordinationV1Api(sandbox.api).read_namespaced_lease(
        f"llama-operator-gateway-{pod.metadata.name}", SYSTEM)
    servers = json.loads(lease.metadata.annotations["llamacpp.dev/gateway-load"])["servers"]
    in_flight, held, _, _ = servers.get(MODEL, [0, 0, 0, 0])
    return int(in_flight + held)


def _kill(sandbox: SandboxProcess, load: Load, victim: Any, survivor: Any, *, delete: bool = False,
          decides: bool = False) -> dict[str, Any]:
    """SIGKILL the victim's gateway process under load; what it cost, when its load left the decider's view,
    and when a replica decides again."""
    victim_ip, survivor_ip = victim.status.pod_ip, survivor.status.pod_ip
    # Killed while its report counts requests and the decider counts them, so that there is something to age out.
    reported = wait_for(lambda: _reported(sandbox, victim), timeout=20, interval=0.2,
                        message=f"a report of {victim.metadata.name} counting a request")
    counted = wait_for(lambda: metric(survivor_ip, "llama_gateway_peer_active_requests", MODEL), timeout=20,
                       interval=0.1, message="the decider counting its peer's requests") if decides else 0
    pid = main_pid(victim, "gateway")  # before the counts: the fewer milliseconds between them and the kill
    # Its own: proxied and held (waiting for a ready replica) alike, both die with its process.
    held = int(metric(victim_ip, "llama_gateway_queue_length", MODEL) or 0)
    in_flight = int(metric(victim_ip, "llama_gateway_in_flight_requests", MODEL) or 0) + held
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    if delete:  # as when its node is lost: it never comes back under its name, its replacement has another
        sandbox.core.delete_namespaced_pod(victim.metadata.name, SYSTEM, grace_period_seconds=0)
    if decides:
        # No replacement while the dead replica's report ages out (the ReplicaSet removes the one it may have
        # started, not Ready yet): what the decider counts from peers is then the dead one's report alone.
        sandbox.apps.patch_namespaced_deployment_scale(GATEWAY_DEPLOYMENT, SYSTEM, {"spec": {"replicas": 1}})
    gone, takeover, decider = None, None, ""
    trace: list[tuple[float, float | None, float, float | None]] = []  # (s after, from peers, there, live peers)
    while time.monotonic() - killed < 20:
        # What the decider counts from its peer (the victim is its only one) against what the victim, restarted
        # or not, counts itself now: the dead process's report is gone once the former is no larger.
        from_peer = metric(survivor_ip, "llama_gateway_peer_active_requests", MODEL)
        peers = set() if delete else {victim_ip}  # a deleted pod's address answers nothing (and slowly)
        peers |= {p.status.pod_ip for p in gateway_pods(sandbox)} - {survivor_ip, victim_ip}
        now_there = sum(metric(ip, name, MODEL) or 0 for ip in peers
                        for name in ("llama_gateway_in_flight_requests", "llama_gateway_queue_length"))
        trace.append((round(time.monotonic() - killed, 1), from_peer, now_there,
                      metric(survivor_ip, "llama_gateway_peers")))
        if gone is None and from_peer is not None and from_peer <= now_there:
            gone = time.monotonic() - killed
        # Deciding again: the survivor, or the killed replica restarted by the kubelet under the same pod name
        # (the Lease's holder is that name: it renews it, as client-go does).
        if takeover is None:
            for who, ip in (("the other replica", survivor_ip), *(() if delete else (("the restarted replica",
                                                                                      victim_ip),))):
                if metric(ip, "llama_gateway_leader") == 1:
                    takeover, decider = time.monotonic() - killed, who
                    break
        if gone is not None and takeover is not None and (not decides or time.monotonic() - killed > 10):
            break
        time.sleep(0.1)
    if decides:
        sandbox.apps.patch_namespaced_deployment_scale(GATEWAY_DEPLOYMENT, SYSTEM, {"spec": {"replicas": 2}})
    return {"pid": pid, "killed": killed, "in_flight": in_flight, "held": held, "reported": reported,
            "counted": counted,
            "gone": gone, "trace": trace,
            "takeover": takeover, "decider": decider}


def _back(sandbox: SandboxProcess, killed: Any) -> None:
    """Until the kubelet restarted the killed gateway container and the pod is Ready again."""
    restarts = next(c.restart_count for c in killed.status.container_statuses if c.name == "gateway")

    def back() -> bool:
        pod = sandbox.core.read_namespaced_pod(killed.metadata.name, SYSTEM)
        status = next(c for c in pod.status.container_statuses if c.name == "gateway")
        return status.restart_count > restarts and bool(status.ready)
    wait_for(back, timeout=60, message=f"{killed.metadata.name} restarted and ready")


def _failed_by(load: Load, killed: float, until: float) -> list[tuple[float, float, bool, bool, str]]:
    """Requests that failed between a kill and `until` (the next kill): what that kill cost."""
    with load.lock:
        return [o for o in load.outcomes if not o[2] and killed <= o[1] < until]


def _started(load: Load, since: float, until: float) -> list[tuple[float, float, bool, bool, str]]:
    with load.lock:
        return [o for o in load.outcomes if since <= o[0] < until]


def test_a_killed_gateway_replica_loses_only_its_own_streams(sandbox: SandboxProcess) -> None:
    _create(sandbox, "llamamodels", "steady", {"source": {"huggingFace": {"repo": REPO, "file": FILE}}})
    _create(sandbox, "llamaservers", "steady", {
        "modelRef": {"name": "steady"}, "contextSize": 2048, "parallel": 8, "replicas": 1,
        "scaling": {"minReplicas": 1, "maxReplicas": 2, "targetInFlight": 8, "windowSeconds": 5,
                    "scaleDownDelaySeconds": 300}})
    _wait_phase(sandbox, "llamaservers", "steady", "Ready", check=lambda s: s.get("readyReplicas", 0) >= 1)
    leader, other = _leader(sandbox)
    nodes = {leader.spec.node_name, other.spec.node_name}
    wait_for(lambda: len(_ready_pods(sandbox, "steady")) >= 1, timeout=60, message="a ready replica of steady")

    load = Load(sandbox)
    try:
        wait_for(lambda: len(load.outcomes) >= 12, timeout=60, message="the load running")
        # 1. The replica that does not decide, lost for good (SIGKILL and its pod force-deleted, as with a lost
        # node): its report is never renewed again and leaves the decider's sum after its TTL; the decider stays.
        first = _kill(sandbox, load, other, leader, delete=True, decides=True)
        assert first["decider"] == "the other replica" and first["takeover"] < 1, "the decider kept deciding"
        wait_for(lambda: len(gateway_pods(sandbox)) == 2 and other.metadata.name not in {
            p.metadata.name for p in gateway_pods(sandbox)}, timeout=90, message="a replacement gateway pod ready")
        time.sleep(5)  # the load spread over both again
        leader, other = _leader(sandbox)
        # 2. The decider: the other replica takes the Lease over within its bound (10 s duration + 2 s period).
        second = _kill(sandbox, load, leader, other)
        _back(sandbox, leader)
        time.sleep(5)
        # 3. The decider lost for good (SIGKILL and its pod force-deleted): the other replica takes the Lease over
        # once it went unrenewed for its duration.
        leader, other = _leader(sandbox)
        third = _kill(sandbox, load, leader, other, delete=True)
        wait_for(lambda: len(gateway_pods(sandbox)) == 2, timeout=90, message="a replacement gateway pod ready")
        time.sleep(2)
    finally:
        load.close()

    report = []
    end = time.monotonic()
    assert not [o for o in load.outcomes if not o[2] and o[1] < first["killed"]], "failures before any kill"
    for name, kill, until in (("non-deciding replica, pod deleted", first, second["killed"]),
                              ("deciding replica", second, third["killed"]),
                              ("deciding replica, pod deleted", third, end)):
        failed = _failed_by(load, kill["killed"], until)
        late = [o for o in _started(load, kill["killed"] + 1, until) if o[1] < until]  # not cut by the next kill
        late_failed = [o for o in late if not o[2]]
        assert not late_failed, (
            f"{name} killed at {kill['killed']:.1f}: requests started a second after failed: {late_failed}")
        # +1: a request may reach it between the read of its count and the kill (milliseconds).
        assert len(failed) <= kill["in_flight"] + 1, (
            f"{name}: {len(failed)} failed, more than the {kill['in_flight']} in flight on it "
            f"({kill['held']} of them held): {failed}")
        report.append(f"{name} killed (pid {kill['pid']}, {kill['in_flight']} streams in flight on it): "
                      f"{len(failed)} failed ({sum(o[3] for o in failed)} after a byte), {len(late)} started from "
                      f"1 s after it to {until - kill['killed']:.0f} s after: all served")
    report.append(f"the lost non-deciding replica's report counted {first['reported']} request(s), the decider "
                  f"{first['counted']:g} from it before the kill; gone from the decider's view {first['gone']:.1f}s "
                  "after the kill (TTL 6 s after its last renewal)")
    assert second["takeover"] is not None and second["takeover"] <= 10 + 2 + 2, second
    # At most the TTL after the last renewal it saw (<= the kill), a decision step (1 s) and the polling; and not
    # before the TTL less a renewal period (the report counted until it aged out).
    assert first["gone"] is not None and 6 - 2 <= first["gone"] <= 6 + 1 + 1, first["trace"]
    print("the decider after the first kill (s, counted from peers, counted by the other replicas, live peers):",
          first["trace"])
    total_failed = sum(1 for o in load.outcomes if not o[2])
    print(f"\ngateway HA on nodes {sorted(nodes)}: {len(load.outcomes)} streamed requests, {total_failed} failed")
    print("\n".join(report))
    print(f"{second['decider']} decides {second['takeover']:.1f}s after the decider was SIGKILLed; "
          f"{third['decider']} {third['takeover']:.1f}s after the decider was SIGKILLed and its pod deleted")
    # The other replica counts the Lease's 10 s from the last renewal it saw, up to one period (2 s) before the kill.
    assert third["decider"] == "the other replica" and 10 - 2 < third["takeover"] <= 10 + 2 + 2, third
