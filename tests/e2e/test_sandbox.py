"""The product end to end through `llama-operator sandbox`: a real control plane, the operator installed by
`helm install` and running as a pod with its ServiceAccount, the exact objects it renders, the real fetcher
and the real llama-server, called with the official OpenAI client, and kubectl as a user runs it.

It runs on one real node (kubelet + containerd, every pod a container of the images built here). No code path
of the operator or of the rendered objects knows about the sandbox; the only test-specific input is
LLAMA_OPERATOR_HF_ENDPOINT (an operator setting), pointing at a fake Hugging Face on the host address (where pods
reach this machine).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes.client.exceptions import ApiException

from llama_operator.nodes.host import HOST_ADDRESS, RECORD
from tests.e2e.conftest import SandboxProcess, custom_object, tree_processes, wait_for
from tests.e2e.containers import container_file, environ, main_pid, pod_pids
from tests.e2e.operators import operator_pods
from tests.e2e.servers import status_of
from tests.fakehub import FakeHub

pytestmark = pytest.mark.nodes

GROUP, VERSION, NS = "llamacpp.dev", "v1beta1", "default"
OPERATOR_NS, OPERATOR = "llama-system", "llama-operator"


def _create(sandbox: SandboxProcess, plural: str, name: str, spec: dict[str, Any]) -> None:
    sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, plural, custom_object(plural, name, spec))


def _status(sandbox: SandboxProcess, plural: str, name: str) -> dict[str, Any]:
    return status_of(sandbox, NS, plural, name)


def _wait_phase(sandbox: SandboxProcess, plural: str, name: str, phase: str, *, timeout: float = 90,
                check: Any = None) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = _status(sandbox, plural, name)
        return status if status.get("phase") == phase and (check is None or check(status)) else None
    try:
        return wait_for(reached, timeout=timeout, message=f"{plural}/{name} phase {phase}")
    except TimeoutError:
        raise AssertionError(f"last status of {name}: {_status(sandbox, plural, name)}\n{sandbox.log()}") from None


def _pods(sandbox: SandboxProcess, server: str) -> list[Any]:
    return sandbox.core.list_namespaced_pod(NS, label_selector=f"llamacpp.dev/server={server}").items


def _server_pid(pod: Any) -> int:
    return main_pid(pod, "llama-server")


def _jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _check_operator_pod(sandbox: SandboxProcess) -> None:
    """The operator runs as the chart's Deployment pods (two replicas: a leader and a standby, both answering the
    webhook), each logged in with its own ServiceAccount token."""
    wait_for(lambda: len([p for p in operator_pods(sandbox) if p.status.phase == "Running"]) == 2, timeout=60,
             message="both operator replicas running")
    for pod in operator_pods(sandbox):
        _check_operator_replica(sandbox, pod)


def _check_operator_replica(sandbox: SandboxProcess, pod: Any) -> None:
    assert pod.status.phase == "Running" and pod.spec.service_account_name == OPERATOR
    assert pod.metadata.owner_references[0].kind == "ReplicaSet"  # the real Deployment controller's
    pid = main_pid(pod, pod.spec.containers[0].name)
    token = container_file(pid, "/var/run/secrets/kubernetes.io/serviceaccount/token").read_text()
    claims = _jwt_claims(token)
    assert claims["sub"] == f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR}"
    assert claims["kubernetes.io"]["pod"]["name"] == pod.metadata.name  # a bound TokenRequest token
    env = environ(pid)
    kubernetes_ip = sandbox.core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
    assert "KUBECONFIG" not in env and env["KUBERNETES_SERVICE_HOST"] == kubernetes_ip  # in-cluster, by Service


def _chat(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, max_tokens=8,
                                           messages=[{"role": "user", "content": "Say hello"}])
    assert reply.choices[0].finish_reason in ("length", "stop")
    return reply.choices[0].message.content or ""


def test_tiny_model_lifecycle(sandbox_factory: Any, tiny_gguf: Path) -> None:
    hub = FakeHub()
    served = hub.add("test/tiny-GGUF", "tiny-q8_0.gguf", tiny_gguf)
    with hub.running(HOST_ADDRESS):
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url})
        _check_operator_pod(sandbox)
        _create(sandbox, "llamamodels", "tiny", {"source": {"huggingFace": {
            "repo": "test/tiny-GGUF", "file": "tiny-q8_0.gguf"}}})
        model = _wait_phase(sandbox, "llamamodels", "tiny", "Ready", timeout=60)
        assert model["sha256"] == served.sha256
        resolved_bytes = hub.bytes_served.get(served.name, 0)  # the operator read the GGUF header

        # apply -> Ready: two replicas, each with its own (EmptyDir) cache
        started = time.monotonic()
        _create(sandbox, "llamaservers", "chat", {"modelRef": {"name": "tiny"}, "replicas": 2, "contextSize": 256})
        status = _wait_phase(sandbox, "llamaservers", "chat", "Ready", check=lambda s: s.get("readyReplicas") == 2)
        print(f"tiny model, cold cache: apply -> Ready in {time.monotonic() - started:.1f}s")
        assert status["modelName"] == "tiny"
        sandbox.wait_line(r"LlamaServer default/chat is Ready: http://127\.0\.0\.1:\d+/v1")

        # downloaded exactly once per cache, and verified
        pods = _pods(sandbox, "chat")
        assert len(pods) == 2
        assert hub.bytes_served[served.name] - resolved_bytes == 2 * served.size
        for pod in pods:
            pid = _server_pid(pod)
            args = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
            model_path = args[args.index("--model") + 1]
            assert container_file(pid, model_path + ".verified").exists()  # in the pod's own cache volume
            assert "Verified tiny-q8_0.gguf" in sandbox.kubectl("logs", pod.metadata.name, "-c", "fetch-model").stdout
            fetch = next(s for s in pod.status.init_container_statuses if s.name == "fetch-model")
            assert fetch.state.terminated.exit_code == 0

        # what users see: printer columns, real pod IPs in the EndpointSlice the real controller wrote
        table = sandbox.kubectl("get", "llama").stdout  # both kinds (the `llama` category), with their columns
        headers = [line.split() for line in table.splitlines() if line.startswith("NAME")]
        assert ["NAME", "MODEL", "PHASE", "READY"] in [h[:4] for h in headers] and len(headers) == 2
        row = next(line for line in table.splitlines() if line.startswith("llamaserver.llamacpp.dev/chat "))
        assert row.split()[1:4] == ["tiny", "Ready", "2/2"], table
        slices = json.loads(sandbox.kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=chat",
                                            "-o", "json").stdout)["items"]
        addresses = sorted(a for sl in slices for e in sl["endpoints"] for a in e["addresses"])
        assert addresses == sorted(p.status.pod_ip for p in pods)
        assert all(not ipaddress.ip_address(a).is_loopback for a in addresses)
        assert slices[0]["ports"][0]["port"] == 8080

        # the OpenAI API through the Service's local port
        client = openai.OpenAI(base_url=sandbox.url("default/chat") + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        # the client keeps one connection, which the Service port sends to one of the pods: follow both
        follow = subprocess.Popen([sandbox.kubectl_bin, "--kubeconfig", str(sandbox.kubeconfig), "logs", "-f",
                                   "-l", "llamacpp.dev/server=chat", "-c", "llama-server", "--tail", "1", "--prefix"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        followed: list[str] = []
        threading.Thread(target=lambda: followed.extend(follow.stdout or []), daemon=True).start()
        try:
            wait_for(lambda: len(followed) >= 2, timeout=30, message="each pod's last line from kubectl logs -f")
            for _ in range(4):
                assert isinstance(_chat(client, "tiny"), str)
            wait_for(lambda: any("launch_slot_" in line for line in followed[2:]), timeout=15,
                     message="kubectl logs -f streaming the requests' log lines")
        finally:
            follow.terminate()
            follow.wait(timeout=10)
        chunks = list(client.chat.completions.create(model="tiny", max_tokens=8, stream=True,
                                                     messages=[{"role": "user", "content": "Count"}],
                                                     extra_body={"ignore_eos": True}))  # random weights: EOS early
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in (None, "length", "stop")

        # a setting change rolls the pods (new ones Ready before old ones go) and reaches Ready again
        old_names = {p.metadata.name for p in pods}
        sandbox.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", "chat",
                                                      {"spec": {"contextSize": 512}})
        _wait_phase(sandbox, "llamaservers", "chat", "Ready", timeout=120, check=lambda s: (
            s.get("observedGeneration") == 2 and s.get("readyReplicas") == 2
            and not old_names & {p.metadata.name for p in _pods(sandbox, "chat")}
            and len(_pods(sandbox, "chat")) == 2))
        sandbox.kubectl("rollout", "status", "deployment/chat", "--timeout=60s")
        for pod in _pods(sandbox, "chat"):
            args = (Path("/proc") / str(_server_pid(pod)) / "cmdline").read_bytes().split(b"\0")
            assert args[args.index(b"--ctx-size") + 1] == b"512"
        assert len(_chat(client, "tiny")) >= 0

        # a bad flag is refused at apply by the operator's webhook (through the chart's Service and TLS)
        with pytest.raises(ApiException) as refused:
            _create(sandbox, "llamaservers", "bad", {"modelRef": {"name": "tiny"}, "args": ["--no-such-flag", "1"]})
        assert "denied the request" in refused.value.body and "--no-such-flag" in refused.value.body
        assert _pods(sandbox, "bad") == []

        # a killed llama-server is restarted and the fleet is Ready again; `kubectl logs --previous` has the old run
        victim = _pods(sandbox, "chat")[0]
        os.kill(_server_pid(victim), signal.SIGKILL)

        def restarted_and_ready() -> bool:
            pod = next(p for p in _pods(sandbox, "chat") if p.metadata.name == victim.metadata.name)
            status = pod.status.container_statuses[0]
            return status.restart_count == 1 and status.ready

        wait_for(restarted_and_ready, timeout=60, message="llama-server restarted and ready")
        _wait_phase(sandbox, "llamaservers", "chat", "Ready", timeout=60, check=lambda s: s.get("readyReplicas") == 2)
        restarted = next(p for p in _pods(sandbox, "chat") if p.metadata.name == victim.metadata.name)
        status = restarted.status.container_statuses[0]
        assert status.ready and status.last_state.terminated.exit_code == 137
        assert restarted.status.init_container_statuses[0].restart_count == 0  # no second download
        previous = sandbox.kubectl("logs", victim.metadata.name, "-c", "llama-server", "--previous").stdout
        current = sandbox.kubectl("logs", victim.metadata.name, "-c", "llama-server").stdout
        assert previous and current and previous != current
        assert len(sandbox.kubectl("logs", victim.metadata.name, "-c", "llama-server", "--tail", "2").stdout
                   .splitlines()) == 2
        _chat(client, "tiny")

        # delete everything: no process is left; helm uninstall keeps the CRDs (crds.keep, docs/install.md)
        uids = [p.metadata.uid for p in _pods(sandbox, "chat")]
        sandbox.kubectl("delete", "llamaserver", "chat", "--wait=true")
        sandbox.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", "tiny")
        wait_for(lambda: not any(pod_pids(uid) for uid in uids), timeout=60, message="every pod process to exit")
        wait_for(lambda: _pods(sandbox, "chat") == [], timeout=30, message="the pods gone from the API")
        uninstall = subprocess.run([sandbox.env["HELM"], "uninstall", OPERATOR, "--namespace", OPERATOR_NS,
                                    "--kubeconfig", str(sandbox.kubeconfig), "--wait"],
                                   capture_output=True, text=True, timeout=120)
        assert uninstall.returncode == 0, uninstall.stdout + uninstall.stderr
        assert sandbox.kubectl("get", "crd", "llamaservers.llamacpp.dev", "llamamodels.llamacpp.dev").returncode == 0
        wait_for(lambda: not sandbox.core.list_namespaced_pod(OPERATOR_NS).items, timeout=60,
                 message="the operator pod gone")
        assert sandbox.stop() == 0
        assert tree_processes(str(sandbox.state_dir)) == []


def test_gemma_with_api_key(sandbox_factory: Any, gemma_gguf: Path) -> None:
    hub = FakeHub()
    hub.add("unsloth/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf", gemma_gguf)
    with hub.running(HOST_ADDRESS):
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url})
        sandbox.core.create_namespaced_secret(NS, {"metadata": {"name": "llama-key"}, "data": {
            "key": base64.b64encode(b"sk-sandbox-test").decode()}})
        _create(sandbox, "llamamodels", "gemma", {"source": {"huggingFace": {
            "repo": "unsloth/gemma-3-270m-it-GGUF", "file": "gemma-3-270m-it-Q4_K_M.gguf"}}})
        started = time.monotonic()
        _create(sandbox, "llamaservers", "gemma", {"modelRef": {"name": "gemma"}, "contextSize": 2048,
                                                   "apiKeySecretRef": {"name": "llama-key", "key": "key"}})
        _wait_phase(sandbox, "llamaservers", "gemma", "Ready", timeout=180)
        print(f"gemma3-270m, cold cache: apply -> Ready in {time.monotonic() - started:.1f}s")
        base = sandbox.url("default/gemma") + "/v1"

        assert httpx.get(base + "/models").status_code == 401  # no key at all
        anonymous = openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as denied:
            anonymous.models.list()
        assert denied.value.status_code == 401

        client = openai.OpenAI(base_url=base, api_key="sk-sandbox-test", max_retries=0)
        reply = client.chat.completions.create(model="gemma", max_tokens=16,
                                               messages=[{"role": "user", "content": "What is 2+2?"}])
        assert reply.choices[0].message.content
        assert sandbox.stop() == 0
        assert tree_processes(str(sandbox.state_dir)) == []


PROMPT = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
"""About 700 tokens of the tiny model (a token per character, about): a conversation's first turn."""


def _completion(sandbox: SandboxProcess, prompt: str) -> dict[str, Any]:
    reply = httpx.post(sandbox.url("default/chat") + "/completion", timeout=60,
                       json={"prompt": prompt, "n_predict": 4, "temperature": 0, "cache_prompt": True})
    assert reply.status_code == 200, reply.text
    return reply.json()["timings"]


def _scale(sandbox: SandboxProcess, replicas: int) -> None:
    sandbox.kubectl("scale", "llamaserver/chat", f"--replicas={replicas}", "-n", NS)


def _kept_prompt_cache_survives_a_scale_to_zero(sandbox: SandboxProcess) -> None:
    """spec.promptCache.persist on the PVC cache: the drain sidecar saves the slot when the pod stops, the next
    pod's sidecar restores it before the pod is Ready, and the conversation's next turn comes from the cache."""
    assert _completion(sandbox, PROMPT)["cache_n"] == 0
    (first,) = _pods(sandbox, "chat")
    _scale(sandbox, 0)
    wait_for(lambda: _pods(sandbox, "chat") == [], timeout=120, message="the pod gone after the scale to zero")
    _scale(sandbox, 1)

    def ready_pod() -> Any:
        found = _pods(sandbox, "chat")
        ready = [p for p in found if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return ready[0] if len(found) == 1 and ready else None

    pod = wait_for(ready_pod, timeout=120, message="one Ready pod after the scale back to 1")
    assert pod.metadata.name != first.metadata.name
    logs = sandbox.kubectl("logs", pod.metadata.name, "-c", "drain").stdout
    assert "restored 1 of 1 saved slot(s)" in logs, logs
    turn = _completion(sandbox, PROMPT + " and then the dog sleeps")
    print(f"after a scale to zero and back: {turn['cache_n']} prompt tokens from the kept cache, "
          f"{turn['prompt_n']} prefilled")
    assert turn["cache_n"] >= 500 and turn["prompt_n"] < 30, turn


def test_second_start_is_warm_and_local_operator(sandbox_factory: Any, tiny_gguf: Path, tmp_path: Path) -> None:
    """A second start with the same state directory is a fresh cluster whose PVC model cache is still there;
    `--operator local` runs the operator as a plain process (no webhook: bad input shows in status). On the
    first, the server keeps its prompt caches on that claim across a scale to zero."""
    hub = FakeHub()
    hub.add("test/tiny-GGUF", "tiny-q8_0.gguf", tiny_gguf)
    state = tmp_path / "warm-state"
    model = {"source": {"huggingFace": {"repo": "test/tiny-GGUF", "file": "tiny-q8_0.gguf"}},
             "cache": {"type": "PersistentVolumeClaim", "size": "1Gi"}}
    with hub.running(HOST_ADDRESS):
        first = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url}, state_dir=state)
        _create(first, "llamamodels", "tiny", model)
        _create(first, "llamaservers", "chat", {"modelRef": {"name": "tiny"}, "contextSize": 2048,
                                                "promptCache": {"persist": True, "maxSize": "256Mi"}})
        _wait_phase(first, "llamaservers", "chat", "Ready")
        (pod,) = _pods(first, "chat")
        assert "Verified tiny-q8_0.gguf" in first.kubectl("logs", pod.metadata.name, "-c", "fetch-model").stdout
        (claim_name,) = [v.persistent_volume_claim.claim_name for v in pod.spec.volumes if v.persistent_volume_claim]
        claim = first.core.read_namespaced_persistent_volume_claim(claim_name, NS)
        assert claim.status.phase == "Bound" and claim.spec.storage_class_name == "sandbox-local"
        volume = first.core.read_persistent_volume(claim.spec.volume_name)
        assert volume.spec.host_path.path == str(state / "pvc" / pod.spec.node_name / NS / claim.metadata.name)
        _kept_prompt_cache_survives_a_scale_to_zero(first)
        assert first.stop() == 0
        assert tree_processes(str(state)) == []

        second = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url}, state_dir=state,
                                 args=("--operator", "local"))
        assert _pods(second, "chat") == [] and second.custom.list_namespaced_custom_object(
            GROUP, VERSION, NS, "llamaservers")["items"] == []  # a fresh cluster
        assert not second.core.list_namespaced_pod(OPERATOR_NS).items  # no operator pod: a local process
        started = time.monotonic()
        _create(second, "llamamodels", "tiny", model)
        _create(second, "llamaservers", "chat", {"modelRef": {"name": "tiny"}, "contextSize": 256})
        _wait_phase(second, "llamaservers", "chat", "Ready")
        print(f"second start, warm PVC cache: apply -> Ready in {time.monotonic() - started:.1f}s")
        (pod,) = _pods(second, "chat")
        assert "Cache hit" in second.kubectl("logs", pod.metadata.name, "-c", "fetch-model").stdout
        # a GPU server asks the scheduler for nvidia.com/gpu; these nodes have none, and the status says so
        _create(second, "llamaservers", "gpu", {"modelRef": {"name": "tiny"}, "contextSize": 256,
                                                "gpu": {"vendor": "nvidia", "count": 1}})
        pending = _wait_phase(second, "llamaservers", "gpu", "Pending", timeout=60,
                              check=lambda s: "nvidia.com/gpu" in s.get("message", ""))
        assert "Insufficient nvidia.com/gpu" in pending["message"], pending
        (gpu_pod,) = _pods(second, "gpu")
        assert gpu_pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
        _create(second, "llamaservers", "bad", {"modelRef": {"name": "tiny"}, "args": ["--no-such-flag", "1"]})
        bad = _wait_phase(second, "llamaservers", "bad", "Failed", timeout=30)
        assert "--no-such-flag" in bad["message"]
        assert (state / "operator.log").exists()
        assert second.stop() == 0
        assert tree_processes(str(state)) == []
        assert not RECORD.exists()  # the nodes, their bridges and namespaces are gone
