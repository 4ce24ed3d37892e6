"""The chart's NetworkPolicies, enforced (`llama-operator sandbox --nodes 1 --network-policies`: kube-router's
firewall on a real node; one node because kube-router guards only its own node's pods, docs/real-nodes.md).

Every policy of the chart is on (`networkPolicy.llamaServers.enabled`, the operator's webhook admitted only from
the nodes' addresses, metrics from the `monitoring` namespace): a pod of another namespace cannot open a connection
to a llama-server pod, the operator's webhook or its metrics port; a pod of the server's namespace reaches the
server but not the RPC worker of a split server, which only its leader reaches; one in `monitoring` the metrics
(the operator's, and the server's on its API port), and the API server
still calls the webhook (a bad object is refused).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import SandboxProcess, custom_object, serve_file, wait_for
from tests.e2e.servers import GROUP, SYSTEM, VERSION, pods, ready

pytestmark = pytest.mark.nodes

PROBE = """
import socket, sys, time
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print(target, "open")
    except OSError as exc:
        print(target, "blocked", type(exc).__name__)
"""


@pytest.fixture(scope="module")
def guarded(module_sandbox_factory: Any) -> SandboxProcess:
    return module_sandbox_factory(nodes="1", args=("--network-policies",))


@pytest.fixture(scope="module")
def model_url(guarded: SandboxProcess, tiny_gguf: Path) -> Iterator[str]:
    host = json.loads((guarded.state_dir / "nodes.json").read_text())["hostAddress"]
    with serve_file(host, tiny_gguf) as url:
        yield url


def _prober(sandbox: SandboxProcess, namespace: str) -> str:
    """A pod that stays in `namespace` (kube-router admits a source pod once it has put its IP in the policy's
    sets, which takes seconds: one pod per namespace, asked again and again, rather than a new pod per try)."""
    image = json.loads((sandbox.state_dir / "nodes.json").read_text())["images"]["client"]
    name = "prober"
    sandbox.kubectl("run", name, "-n", namespace, "--image", image, "--restart=Never", "--command", "--",
                    "python", "-c", "import time; time.sleep(3600)")
    wait_for(lambda: sandbox.core.read_namespaced_pod(name, namespace).status.phase == "Running",
             timeout=120, message=f"prober pod in {namespace}")
    return name


def _probe(sandbox: SandboxProcess, namespace: str, targets: list[str]) -> dict[str, str]:
    """Connect from the prober of `namespace` to each host:port: {target: "open" | "blocked"}."""
    logs = sandbox.kubectl("exec", "-n", namespace, "prober", "--", "python", "-c", PROBE, *targets).stdout
    return {line.split()[0]: line.split()[1] for line in logs.strip().splitlines()}


def test_only_the_allowed_peers_reach_the_server_the_webhook_and_the_metrics(guarded: SandboxProcess,
                                                                          model_url: str) -> None:
    app, outsider = f"app-{uuid.uuid4().hex[:4]}", f"outsider-{uuid.uuid4().hex[:4]}"
    for namespace in (app, outsider, "monitoring"):
        guarded.kubectl("create", "namespace", namespace)
        _prober(guarded, namespace)
    guarded.custom.create_namespaced_custom_object(GROUP, VERSION, app, "llamamodels", custom_object(
        "llamamodels", "guarded", {"source": {"http": {"url": model_url}}}, namespace=app))
    guarded.custom.create_namespaced_custom_object(GROUP, VERSION, app, "llamaservers", custom_object(
        "llamaservers", "guarded", {"modelRef": {"name": "guarded"}, "contextSize": 256}, namespace=app))
    ready(guarded, app, "guarded")  # its startup probe comes from the node: always admitted
    guarded.kubectl("get", "networkpolicy", "-n", app, "guarded")  # the operator made the server's policy

    server = f"{pods(guarded, app, 'guarded')[0].status.pod_ip}:8080"
    selector = guarded.apps.read_namespaced_deployment("llama-operator", SYSTEM).spec.selector.match_labels
    operator = guarded.core.list_namespaced_pod(
        SYSTEM, label_selector=",".join(f"{k}={v}" for k, v in selector.items())).items[0]
    ports = {p.name: p.container_port for p in operator.spec.containers[0].ports}
    webhook, metrics = (f"{operator.status.pod_ip}:{ports[name]}" for name in ("webhook", "metrics"))

    def probes_settle(namespace: str, expected: dict[str, str]) -> None:
        # kube-router applies a new pod's rules within seconds, under load up to tens of seconds
        seen: list[dict[str, str]] = []
        try:
            wait_for(lambda: seen.append(_probe(guarded, namespace, list(expected))) or seen[-1] == expected,
                     timeout=120, interval=2, message=f"from {namespace}: {expected}")
        except TimeoutError:
            raise AssertionError(f"from {namespace}: expected {expected}, last seen {seen[-1:]}") from None

    # A server split over an RPC worker (docs/distributed.md): the worker's policy admits its leader alone, which
    # must reach it to become Ready; the server's namespace and the others are refused on the RPC port.
    guarded.custom.create_namespaced_custom_object(GROUP, VERSION, app, "llamaservers", custom_object(
        "llamaservers", "split", {"modelRef": {"name": "guarded"}, "contextSize": 256,
                                  "distributed": {"workers": 1, "memory": "256Mi"}}, namespace=app))
    ready(guarded, app, "split")
    worker = guarded.core.read_namespaced_pod("split-workers-0", app)
    rpc = f"{worker.status.pod_ip}:{worker.spec.containers[0].ports[0].container_port}"

    probes_settle(outsider, {server: "blocked", webhook: "blocked", metrics: "blocked", rpc: "blocked"})
    probes_settle(app, {server: "open", rpc: "blocked"})
    # metricsFrom may scrape llama-server's /metrics, which is served on its API port (values.yaml says so)
    probes_settle("monitoring", {metrics: "open", server: "open", webhook: "blocked"})

    # the API server, calling from a node's address, still reaches the webhook
    refused = guarded.kubectl("apply", "-n", app, "-f", "-", check=False, input=json.dumps(custom_object(
        "llamaservers", "typo", {"modelRef": {"name": "guarded"}, "args": ["--top-kk", "20"]}, namespace=app)))
    assert 'admission webhook "validate-llamaserver.llamacpp.dev" denied the request' in refused.stderr, refused
    for namespace in (app, outsider, "monitoring"):
        guarded.kubectl("delete", "namespace", namespace, "--wait=false")
