"""The gateway on the real control plane, without a node: the real operator, `llama-operator gateway` as its own
process logged in with exactly the chart's gateway RBAC, and the real Deployment controller. What needs no
running pod: the RBAC is enough and no more, and `kubectl scale` and the gateway's own scale decisions do not
fight. Everything that routes requests to llama-server runs on real nodes: tests/e2e/test_gateway.py and
tests/e2e/test_gateway_load.py.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cluster import ClusterApi, apply_objects
from tests.conftest import model_body, server_body
from tests.fakehub import FakeHub
from tests.helm import helm_template
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1beta1"
REPO_ID = "org/tiny-GGUF"
FILE = "tiny.gguf"
OPERATOR_NAMESPACE = "llama-system"


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


# ------------------------------------------------------------------------------------------------ tests


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
        # The scale and the status view are two writes: the view (still the last LoadBelowTarget) catches up.
        apiserver.wait_for(lambda: _server_object(apiserver, "pinned")["status"]["autoscaling"]["reason"] in (
            "AboveMaximum", "ScaleDownDelay"), timeout=10, message="the autoscaler's view of the put-back")
        deployment = apiserver.wait_for(lambda: (d := apiserver.read("apps/v1", "deployments", apiserver.namespace,
                                                                      "pinned")) and d["spec"]["replicas"] == 3 and d,
                                        timeout=10, message="the operator follows spec.replicas")
        assert deployment["spec"]["replicas"] == 3
        managers = {f["manager"] for f in _server_object(apiserver, "pinned")["metadata"]["managedFields"]
                    if f.get("subresource") == "scale"}
        assert "llama-gateway" in managers, managers


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

