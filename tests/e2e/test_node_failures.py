"""Two real nodes, one of them taken away (`llama-operator sandbox --nodes 2`): drained by an admin, then lost.

- drained: `kubectl drain` evicts the server's pod from one node, as the PodDisruptionBudget the operator made
  allows; the ReplicaSet puts it on the other node, and the LlamaServer is Ready with both replicas there.
- lost: every process of one node is killed at once (kubelet, containerd, the containers: a power cut). The node
  turns NotReady when its heartbeats stop (node-monitor-grace-period), the pod there is evicted after the
  LlamaServer's own `tolerations` (5 s for unreachable / not-ready, instead of the cluster's default 300 s), and the
  replacement on the surviving node brings the server back to all its replicas. The sandbox still stops cleanly.
Both tests run in file order on one sandbox: the second leaves a dead node behind.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.containers import power_off
from tests.e2e.harness import SandboxProcess, custom_object, serve_file, tree_processes, wait_for
from tests.e2e.operators import leader_pod
from tests.e2e.servers import GROUP, VERSION, pods, wait_server

pytestmark = pytest.mark.nodes

FAST_FAILOVER = [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}
                 for key in ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")]


@pytest.fixture(scope="module")
def pair(module_sandbox_factory: Any) -> SandboxProcess:
    return module_sandbox_factory(nodes="2")


@pytest.fixture(scope="module")
def model_url(pair: SandboxProcess, tiny_gguf: Path) -> Iterator[str]:
    host = json.loads((pair.state_dir / "nodes.json").read_text())["hostAddress"]
    with serve_file(host, tiny_gguf) as url:
        yield url


def _fleet(sandbox: SandboxProcess, model_url: str, **spec: Any) -> str:
    """A namespace with a LlamaModel and a two-replica LlamaServer `chat`, Ready with one replica per node."""
    ns = f"nodes-{uuid.uuid4().hex[:6]}"
    sandbox.kubectl("create", "namespace", ns)
    sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "llamamodels", custom_object(
        "llamamodels", "chat", {"source": {"http": {"url": model_url}}}, namespace=ns))
    sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "llamaservers", custom_object(
        "llamaservers", "chat", {"modelRef": {"name": "chat"}, "contextSize": 256, "replicas": 2, **spec},
        namespace=ns))
    wait_server(sandbox, ns, "chat", lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2,
                "Ready with 2 replicas")
    assert len({pod.spec.node_name for pod in pods(sandbox, ns, "chat")}) == 2
    return ns


def _live_pods(sandbox: SandboxProcess, ns: str) -> list[Any]:
    return [pod for pod in pods(sandbox, ns, "chat") if pod.metadata.deletion_timestamp is None]


def _back_on(sandbox: SandboxProcess, ns: str, node: str, timeout: float) -> None:
    """Until both replicas are ready on `node` and the LlamaServer says Ready 2/2."""
    def healed() -> bool:
        live = _live_pods(sandbox, ns)
        ready_pods = [p for p in live
                      if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return len(ready_pods) == 2 and {p.spec.node_name for p in ready_pods} == {node}
    wait_for(healed, timeout=timeout, message=f"both replicas ready on {node}")
    wait_server(sandbox, ns, "chat", lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 2,
                "Ready with 2 replicas again", timeout=60)


def _operator_node(sandbox: SandboxProcess) -> str:
    """The node of the leading operator replica (the other replica may be on the node this test loses)."""
    return str(leader_pod(sandbox).spec.node_name)


def test_a_drained_node_moves_its_replica_to_the_other(pair: SandboxProcess, model_url: str) -> None:
    ns = _fleet(pair, model_url)
    budgets = json.loads(pair.kubectl("get", "pdb", "-n", ns, "-o", "json").stdout)["items"]
    assert [b["metadata"]["name"] for b in budgets] == ["chat"], budgets
    nodes = sorted(pod.spec.node_name for pod in pods(pair, ns, "chat"))
    drained, kept = nodes[1], nodes[0]
    started = time.monotonic()
    drain = pair.kubectl("drain", drained, "--ignore-daemonsets", "--delete-emptydir-data", "--pod-selector",
                         "llamacpp.dev/server=chat", "--timeout=120s", timeout=150)
    assert "evicting pod" in drain.stderr + drain.stdout, drain
    try:
        _back_on(pair, ns, kept, timeout=120)
        print(f"\ndrain of {drained}: both replicas ready on {kept} after {time.monotonic() - started:.1f}s")
    finally:
        pair.kubectl("uncordon", drained)


def test_a_lost_node_is_replaced_within_the_servers_tolerations(pair: SandboxProcess, model_url: str) -> None:
    ns = _fleet(pair, model_url, tolerations=FAST_FAILOVER)
    # The leader keeps running (the standby there may be lost): this test is about the server, not the operator.
    survivor = _operator_node(pair)
    (lost,) = {pod.spec.node_name for pod in pods(pair, ns, "chat")} - {survivor}
    started = time.monotonic()
    assert power_off(pair.state_dir, lost) > 0

    def not_ready() -> bool:
        node = pair.core.read_node(lost)
        return any(c.type == "Ready" and c.status != "True" for c in node.status.conditions)
    wait_for(not_ready, timeout=120, message=f"{lost} NotReady")
    noticed = time.monotonic() - started
    _back_on(pair, ns, survivor, timeout=120)
    print(f"\n{lost} lost: NotReady after {noticed:.1f}s, both replicas ready on {survivor} after "
          f"{time.monotonic() - started:.1f}s")
    state = pair.state_dir
    assert pair.stop() == 0, pair.log()
    assert tree_processes(str(state)) == []
