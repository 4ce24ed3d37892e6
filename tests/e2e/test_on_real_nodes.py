"""The product on real nodes (`llama-operator sandbox --nodes 2`, marker `nodes`): every pod a container from the
images built from this repo, pulled from the local registry, on two kubelets with containerd, kube-proxy, CoreDNS.

What only real nodes show, one test each: the operator pod from the Dockerfile's image as 65532 on a read-only
root filesystem, its webhook and metrics reached through their Services; a namespace enforcing the `restricted`
Pod Security Standard admitting every pod the operator makes; an in-cluster client (the official `openai`
package, in an image built here) calling the server's Service and the gateway by DNS name; the kernel OOM-killing
a server under its memory limit and the LlamaServer saying so while one at the estimate runs; replicas spread over
both nodes, a ReadWriteOnce cache pinning them to one, and a HostPath cache downloaded once per node; a model split
over two ggml-rpc-server workers on the two nodes (docs/distributed.md) answering as one node does, and a lost
worker taking its leader down until the group is whole again.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import pytest

from tests.chart.chart import REPO
from tests.e2e.harness import SandboxProcess, serve_file, wait_for
from tests.e2e.servers import SYSTEM, apply_model, apply_server, pods, ready, status_of, wait_server

pytestmark = pytest.mark.nodes



@pytest.fixture(scope="module")
def real(module_sandbox_factory: Any) -> SandboxProcess:
    return module_sandbox_factory(nodes="2", args=("--gateway",))


@pytest.fixture(scope="module")
def nodes_info(real: SandboxProcess) -> dict[str, Any]:
    return json.loads((real.state_dir / "nodes.json").read_text())


@pytest.fixture(scope="module")
def model_url(nodes_info: dict[str, Any], tiny_gguf: Path) -> Iterator[str]:
    """The tiny GGUF over plain HTTP on the host address: where pods reach this machine."""
    with serve_file(nodes_info["hostAddress"], tiny_gguf) as url:
        yield url


@pytest.fixture
def namespace(real: SandboxProcess) -> Iterator[str]:
    name = f"real-{uuid.uuid4().hex[:6]}"
    real.kubectl("create", "namespace", name)
    yield name
    real.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _run_job(real: SandboxProcess, ns: str, name: str, image: str, script: str, timeout: float = 180) -> str:
    """A Job running `python -c script` in `image`; its logs once it succeeded."""
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": ns},
           "spec": {"backoffLimit": 0, "template": {"spec": {
               "restartPolicy": "Never",
               "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {
                   "type": "RuntimeDefault"}},
               "containers": [{"name": "client", "image": image, "command": ["python", "-c", script],
                               "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                   "capabilities": {"drop": ["ALL"]}}}]}}}}
    batch = kubernetes.client.BatchV1Api(real.api)
    batch.create_namespaced_job(ns, job)

    def finished() -> str | None:
        status = batch.read_namespaced_job_status(name, ns).status
        if status.failed:
            logs = real.kubectl("logs", "-n", ns, f"job/{name}", check=False)
            raise AssertionError(f"job {name} failed:\n{logs.stdout}{logs.stderr}")
        return "done" if status.succeeded else None

    wait_for(finished, timeout=timeout, message=f"job {ns}/{name}")
    return real.kubectl("logs", "-n", ns, f"job/{name}").stdout


# ---------------------------------------------------------------------------------------------------- the tests


def test_two_ready_nodes_run_containerd(real: SandboxProcess) -> None:
    nodes = real.core.list_node().items
    assert len(nodes) == 2
    for node in nodes:
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True", node.metadata.name
        assert node.status.node_info.container_runtime_version.startswith("containerd://2.")
    wide = real.kubectl("get", "nodes", "-o", "wide").stdout
    assert wide.count("containerd://2.") == 2, wide


def test_the_operator_runs_from_the_dockerfile_image_as_65532_read_only(real: SandboxProcess,
                                                                       nodes_info: dict[str, Any]) -> None:
    deployment = real.apps.read_namespaced_deployment("llama-operator", SYSTEM)
    selector = ",".join(f"{k}={v}" for k, v in deployment.spec.selector.match_labels.items())

    def all_ready() -> list[Any] | None:
        # The sandbox is up once one replica is available; the second (the standby) may still be starting.
        found = real.core.list_namespaced_pod(SYSTEM, label_selector=selector).items
        statuses = [p.status.container_statuses or [] for p in found]
        return found if len(found) == deployment.spec.replicas and all(
            s and s[0].ready for s in statuses) else None
    try:
        operator_pods = wait_for(all_ready, timeout=90, message="every operator replica ready")
    except TimeoutError:
        raise AssertionError(real.kubectl("get", "pods", "-n", SYSTEM, "-o", "wide").stdout) from None
    for each in operator_pods:
        assert each.spec.containers[0].image == nodes_info["images"]["operator"]
        assert each.status.container_statuses[0].image_id, each.status
    pod = operator_pods[0]
    uid = real.kubectl("exec", "-n", SYSTEM, pod.metadata.name, "--", "python", "-c",
                       "import os; print(os.getuid(), os.getgid())").stdout.split()
    assert uid == ["65532", "65532"]
    write = real.kubectl("exec", "-n", SYSTEM, pod.metadata.name, "--", "python", "-c",
                         "open('/probe', 'w')", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr


def test_a_restricted_namespace_admits_and_runs_every_pod_the_operator_makes(real: SandboxProcess, namespace: str,
                                                                           model_url: str) -> None:
    real.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                 "pod-security.kubernetes.io/enforce-version=latest")
    apply_model(real, namespace, "tiny", model_url)
    apply_server(real, namespace, "tiny")
    ready(real, namespace, "tiny")
    for pod in pods(real, namespace, "tiny"):
        assert pod.spec.security_context.run_as_non_root
        for container in pod.spec.containers + (pod.spec.init_containers or []):
            assert container.security_context.read_only_root_filesystem, container.name
    refused = real.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=FailedCreate",
                           check=False).stdout
    assert "violates PodSecurity" not in refused, refused


def test_an_in_cluster_openai_client_calls_the_server_and_the_gateway_by_dns(
        real: SandboxProcess, namespace: str, model_url: str, nodes_info: dict[str, Any]) -> None:
    apply_model(real, namespace, "chat", model_url)
    apply_server(real, namespace, "chat")
    status = ready(real, namespace, "chat")
    endpoint = status["endpoint"]
    assert endpoint == f"http://chat.{namespace}.svc:8080/v1", endpoint
    gateway = real.core.read_namespaced_service("llama-operator-gateway", SYSTEM)
    port = next(p.port for p in gateway.spec.ports if p.name in ("http", "openai") or p.port == 8080)
    script = f"""
import openai
for base in ({endpoint!r}, "http://llama-operator-gateway.{SYSTEM}.svc:{port}/v1"):
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=2, timeout=60)
    reply = client.chat.completions.create(model="chat", max_tokens=8,
                                           messages=[{{"role": "user", "content": "Say hello"}}])
    chunks = list(client.chat.completions.create(model="chat", max_tokens=8, stream=True,
                                                 messages=[{{"role": "user", "content": "Count"}}]))
    print(base, reply.choices[0].finish_reason, len(chunks))
import urllib.request
with urllib.request.urlopen("http://llama-operator-metrics.{SYSTEM}.svc:8000/metrics", timeout=30) as metrics:
    print("metrics", sum(line.startswith(b"llama_operator_") for line in metrics))
"""
    logs = _run_job(real, namespace, "client", nodes_info["images"]["client"], script)
    lines = [line.split() for line in logs.strip().splitlines()]
    assert [line[0] for line in lines] == [endpoint, f"http://llama-operator-gateway.{SYSTEM}.svc:{port}/v1",
                                           "metrics"], logs
    assert int(lines[2][1]) > 0, logs  # the operator's metrics, through their Service, from a pod
    for _, finish, chunks in lines[:2]:
        assert finish in ("length", "stop") and int(chunks) > 1, logs


SPLIT_CLIENT = """
import sys, openai
for base, model in zip(sys.argv[1::2], sys.argv[2::2]):
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=3, timeout=60)
    reply = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                      temperature=0, seed=7)
    print(repr(reply.choices[0].text))
"""


def _answers(real: SandboxProcess, ns: str, image: str, job: str, targets: list[tuple[str, str]]) -> list[str]:
    """The temperature-0 completion of each (base URL, model), asked from a pod."""
    args = " ".join(f"{base!r}, {model!r}," for base, model in targets)
    script = f"import sys; sys.argv = ['client', {args}]\n" + SPLIT_CLIENT
    return _run_job(real, ns, job, image, script).strip().splitlines()


def _streams(url: str, seen: dict[str, Any], stop: threading.Event) -> None:
    """Long streamed completions one after the other (the tiny model never stops on its own) until one is cut or
    `stop` is set: `seen` counts the finished ones and the chunks of the one in flight, and says how the last
    ended (its error's name, or "closed" without its last chunk)."""
    body = {"prompt": "Once upon a time", "n_predict": 1800, "ignore_eos": True, "stream": True, "temperature": 0}
    while not stop.is_set():
        seen["chunks"] = 0
        try:
            with httpx.stream("POST", f"{url}/completion", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        seen["chunks"] += 1
                        if json.loads(line[6:]).get("stop"):
                            seen["finished"] += 1
                            break
                else:
                    seen["end"] = "closed"
                    return
        except httpx.HTTPError as exc:
            seen["end"] = type(exc).__name__
            return


def test_a_model_split_over_workers_on_two_nodes_answers_as_one_node_does(
        real: SandboxProcess, namespace: str, model_url: str, nodes_info: dict[str, Any]) -> None:
    apply_model(real, namespace, "chat", model_url)
    apply_server(real, namespace, "one", modelRef={"name": "chat"}, alias="one", contextSize=2048)
    apply_server(real, namespace, "split", modelRef={"name": "chat"}, alias="split", contextSize=2048,
                 distributed={"workers": 2, "memory": "256Mi"})
    ready(real, namespace, "one")
    split = ready(real, namespace, "split")["distributed"]
    workers = split["workers"]
    assert split["readyWorkers"] == "2/2" and len({w["node"] for w in workers}) == 2, split  # one per node
    assert sum(w["layers"] for w in workers) == split["gpuLayers"] == 3, split  # the tiny model: 2 blocks + output
    leader_args = status_of(real, namespace, "llamaservers", "split")["args"]
    assert leader_args[leader_args.index("--tensor-split") + 1] == split["tensorSplit"]

    port = next(p.port for p in real.core.read_namespaced_service("llama-operator-gateway", SYSTEM).spec.ports
                if p.name in ("http", "openai") or p.port == 8080)
    gateway = f"http://llama-operator-gateway.{SYSTEM}.svc:{port}/v1"
    targets = [(f"http://one.{namespace}.svc:8080/v1", "one"), (f"http://split.{namespace}.svc:8080/v1", "split"),
               (gateway, "split")]
    image = nodes_info["images"]["client"]
    single, through_service, through_gateway = _answers(real, namespace, image, "before", targets)
    assert through_service == through_gateway == single, (single, through_service, through_gateway)

    # A worker lost mid-serve: the stream it was computing ends (llama.cpp aborts the leader), the StatefulSet
    # replaces the worker, and the leader, which had sent it layers it no longer holds, is rolled (unready
    # meanwhile) and loads onto the new one.
    leader_before = {p.metadata.name for p in pods(real, namespace, "split")
                     if p.metadata.labels.get("app.kubernetes.io/name") == "llama-server"}
    stream: dict[str, Any] = {"chunks": 0, "finished": 0}
    stop = threading.Event()
    reader = threading.Thread(target=_streams, args=(real.url(f"{namespace}/split"), stream, stop), daemon=True)
    reader.start()
    wait_for(lambda: stream["chunks"] >= 5 or "end" in stream, timeout=60, message="the stream's first tokens")
    real.kubectl("delete", "pod", "-n", namespace, "split-workers-1", "--wait=false")
    reader.join(timeout=60)
    stop.set()
    # cut in the middle: some tokens of it had arrived, and it ended without its last chunk (not hanging)
    assert stream.get("end") is not None and stream["chunks"] > 0, stream
    wait_server(real, namespace, "split", lambda s: s.get("readyReplicas", 0) == 0, "unready after a lost worker",
                timeout=60)
    again = ready(real, namespace, "split")
    assert again["distributed"]["readyWorkers"] == "2/2", again
    leader_after = {p.metadata.name for p in pods(real, namespace, "split")
                    if p.metadata.labels.get("app.kubernetes.io/name") == "llama-server"
                    and not p.metadata.deletion_timestamp}
    assert leader_after and not leader_after & leader_before, (leader_before, leader_after)
    (after,) = _answers(real, namespace, image, "after", targets[1:2])
    assert after == single, (single, after)


def test_a_server_under_its_memory_limit_is_oom_killed_and_says_so(real: SandboxProcess, namespace: str,
                                                                 model_url: str) -> None:
    apply_model(real, namespace, "small", model_url)
    # 128 Ki cells of KV cache, which llama-server clears at start: about 89 MiB resident (measured on the host)
    big = {"contextSize": 131072}
    apply_server(real, namespace, "small", **big, resources={"limits": {"memory": "32Mi"}})
    status = wait_server(real, namespace, "small", lambda s: any(
        c["type"] == "Fits" and c["reason"] == "OOMKilled" for c in s.get("conditions") or []), "OOMKilled")
    fits = next(c for c in status["conditions"] if c["type"] == "Fits")
    assert "OOM-killed at its memory limit 32Mi" in fits["message"], fits
    estimate = status["memory"]["host"]
    assert f"set resources.limits.memory to at least {estimate}" in fits["message"], fits
    pod = pods(real, namespace, "small")[0]
    server = pod.status.container_statuses[0]
    terminated = server.last_state.terminated or server.state.terminated
    assert terminated.reason == "OOMKilled" and terminated.exit_code == 137
    events = real.kubectl("get", "events", "-n", namespace, "--field-selector", "reason=OOMKilled").stdout
    assert "OOM-killed" in events, events

    # the same model at the estimate the status named runs, and is never killed
    apply_server(real, namespace, "fits", **big, modelRef={"name": "small"},
                  resources={"limits": {"memory": estimate}})
    ready(real, namespace, "fits")
    pod = pods(real, namespace, "fits")[0]
    assert pod.status.container_statuses[0].restart_count == 0


def test_replicas_spread_over_both_nodes(real: SandboxProcess, namespace: str, model_url: str) -> None:
    apply_model(real, namespace, "spread", model_url)
    apply_server(real, namespace, "spread", replicas=2)
    ready(real, namespace, "spread")
    nodes = {pod.spec.node_name for pod in pods(real, namespace, "spread")}
    assert nodes == {node.metadata.name for node in real.core.list_node().items}, nodes


def test_a_read_write_once_cache_pins_every_replica_to_its_node(real: SandboxProcess, namespace: str,
                                                               model_url: str) -> None:
    apply_model(real, namespace, "pinned", model_url, cache={"type": "PersistentVolumeClaim", "size": "1Gi"})
    apply_server(real, namespace, "pinned", replicas=2)
    ready(real, namespace, "pinned")
    assert len({pod.spec.node_name for pod in pods(real, namespace, "pinned")}) == 1
    model = status_of(real, namespace, "llamamodels", "pinned")
    assert "is ReadWriteOnce: every replica runs on the node that mounts it" in model["message"], model
    claim = real.core.list_namespaced_persistent_volume_claim(namespace).items[0]
    volume = real.core.read_persistent_volume(claim.spec.volume_name)
    terms = volume.spec.node_affinity.required.node_selector_terms
    assert terms[0].match_expressions[0].values == [pods(real, namespace, "pinned")[0].spec.node_name]


def _prepare_host_path(real: SandboxProcess, ns: str, path: str, client_image: str) -> None:
    """What docs/architecture.md tells an admin to do: a DaemonSet makes the HostPath cache directory on every
    node, writable by the pods' user (the kubelet would create it root-owned)."""
    root = "/var/lib/llama-operator/models"  # the chart's hostPathRoot
    script = (f"import os, time\nfor d in ('{path.split('/')[0]}', '{path}'):\n"
              f"    os.makedirs('/root-dir/' + d, exist_ok=True)\n    os.chown('/root-dir/' + d, 65532, 65532)\n"
              "open('/tmp/done', 'w').close()\ntime.sleep(1e9)")
    daemonset = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "cache-dirs", "namespace": ns},
                 "spec": {"selector": {"matchLabels": {"app": "cache-dirs"}}, "template": {
                     "metadata": {"labels": {"app": "cache-dirs"}},
                     "spec": {"containers": [{
                         "name": "mkdir", "image": client_image, "command": ["python", "-c", script],
                         "securityContext": {"runAsUser": 0},
                         "readinessProbe": {"exec": {"command": ["python", "-c", "open('/tmp/done')"]},
                                            "periodSeconds": 1},
                         "volumeMounts": [{"name": "root", "mountPath": "/root-dir"}]}],
                         "volumes": [{"name": "root", "hostPath": {"path": root, "type": "DirectoryOrCreate"}}]}}}}
    kubernetes.client.AppsV1Api(real.api).create_namespaced_daemon_set(ns, daemonset)
    wait_for(lambda: (s := kubernetes.client.AppsV1Api(real.api).read_namespaced_daemon_set_status(
        "cache-dirs", ns).status).desired_number_scheduled == 2 and s.number_ready == 2, timeout=120,
        message="the cache directories made on both nodes")


def test_a_host_path_cache_is_one_download_per_node(real: SandboxProcess, namespace: str, model_url: str,
                                                    nodes_info: dict[str, Any]) -> None:
    """HostPath caches on, as an admin would (helm upgrade): four replicas over two nodes download the model once
    per node into that node's own directory; the other pod on each node finds it there."""
    upgrade = subprocess.run(
        [real.env["HELM"], "upgrade", "llama-operator", str(REPO / "charts" / "llama-operator"), "--namespace", SYSTEM,
         "--kubeconfig", str(real.kubeconfig), "--reuse-values", "--set", "policy.hostPathCache=true", "--wait",
         "--timeout", "120s"], capture_output=True, text=True, timeout=180)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    real.kubectl("rollout", "status", "deployment/llama-operator", "-n", SYSTEM, "--timeout=120s", timeout=150)
    _prepare_host_path(real, namespace, "team/tiny", nodes_info["images"]["client"])

    apply_model(real, namespace, "shared", model_url, cache={"type": "HostPath", "path": "team/tiny"})
    apply_server(real, namespace, "shared", replicas=4)
    wait_server(real, namespace, "shared", lambda s: s.get("phase") == "Ready" and s.get("readyReplicas") == 4,
                "Ready with 4 replicas")
    shared = pods(real, namespace, "shared")
    per_node: dict[str, list[str]] = {}
    for pod in shared:
        log = real.kubectl("logs", "-n", namespace, pod.metadata.name, "-c", "fetch-model").stdout
        per_node.setdefault(pod.spec.node_name, []).append("hit" if "Cache hit" in log else "fetched")
    assert {node: sorted(kinds) for node, kinds in per_node.items()} == {
        node: ["fetched", "hit"] for node in nodes_info["nodes"]}, per_node
    for node in nodes_info["nodes"]:  # each node's own directory (its private bind over /var/lib/llama-operator)
        own = real.state_dir / "nodes" / node / "mounts" / "var-lib-llama-operator" / "models" / "team" / "tiny"
        assert list(own.rglob("*.verified")), f"{own} holds no verified model"
    assert not list(Path("/var/lib/llama-operator").rglob("*.verified"))  # nothing on the host's own filesystem
