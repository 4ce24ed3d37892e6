"""Faults on the real control plane: the operator killed mid-reconcile, etcd briefly gone, status writes
refused with 409 Conflict, many objects changed while the operator was down. Each ends converged, with no
duplicate objects and no crash.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from llama_operator.controlplane.certs import CertificateAuthority
from tests.cluster import ClusterApi
from tests.conftest import model_body, server_body

CRD = "llamacpp.dev/v1beta1"
# A volume source resolves without any network: these tests are about the API server, not the model source.
VOLUME_MODEL = {"source": {"volume": {"persistentVolumeClaim": "models", "path": "m/model.gguf"}}}


def _servers(api: ClusterApi, count: int, **spec: Any) -> list[str]:
    names = [f"s{i:02d}" for i in range(count)]
    for name in names:
        api.create_llama("llamaservers", server_body(name, **spec))
    return names


def _deployments(api: ClusterApi) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in api.list("apps/v1", "deployments", api.namespace)}


def _ctx_size(deployment: dict[str, Any]) -> str | None:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--ctx-size") + 1] if "--ctx-size" in args else None


def _converged(api: ClusterApi, names: list[str], ctx_size: str) -> bool:
    """Each server has its Deployment (with this context size), its Service, and a status of its generation."""
    deployments = _deployments(api)
    services = {s["metadata"]["name"] for s in api.list("v1", "services", api.namespace)}
    servers = {s["metadata"]["name"]: s for s in api.list(CRD, "llamaservers", api.namespace)}

    def current(name: str) -> bool:
        status = servers[name].get("status") or {}
        return status.get("observedGeneration") == servers[name]["metadata"]["generation"] and bool(
            status.get("endpoint"))
    return all(name in deployments and _ctx_size(deployments[name]) == ctx_size and name in services
               and name in servers and current(name) for name in names)


def _assert_no_duplicates(api: ClusterApi, names: list[str]) -> None:
    assert sorted(_deployments(api)) == sorted(names)
    assert sorted(s["metadata"]["name"] for s in api.list("v1", "services", api.namespace)) == sorted(names)


@contextlib.contextmanager
def _operator_process(kubeconfig: pathlib.Path, log: pathlib.Path) -> Iterator[subprocess.Popen[bytes]]:
    """`llama-operator run` as its own process (so it can be SIGKILLed), with the chart's RBAC."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llama_operator.cli", "run"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_operator_killed_mid_reconcile_converges_without_duplicates(apiserver: ClusterApi, kubeconfig: pathlib.Path,
                                                                   tmp_path: pathlib.Path) -> None:
    apiserver.create_llama("llamamodels", model_body(spec=VOLUME_MODEL))
    names = _servers(apiserver, 20, contextSize=4096)
    log = tmp_path / "operator.log"
    with _operator_process(kubeconfig, log) as proc:
        apiserver.wait_for(lambda: _deployments(apiserver), timeout=60, interval=0.02, message="a first Deployment")
        proc.send_signal(signal.SIGKILL)  # no cleanup, no graceful shutdown: mid-reconcile for the others
        proc.wait()
    done_at_kill = len(_deployments(apiserver))
    restarted = time.monotonic()
    with _operator_process(kubeconfig, log):
        apiserver.wait_for(lambda: _converged(apiserver, names, "4096"), timeout=90, message="converged")
    print(f"killed with {done_at_kill}/{len(names)} Deployments: converged {time.monotonic() - restarted:.1f}s "
          "after the restart")
    assert done_at_kill < len(names), "the kill did not happen mid-way: make the batch larger"
    _assert_no_duplicates(apiserver, names)
    # One ReplicaSet per Deployment: the restarted operator re-applied the same template, it rolled nothing.
    # (The deployment controller may still be creating the last ones: wait for one each, then count.)
    replica_sets = apiserver.wait_for(
        lambda: (found := apiserver.list("apps/v1", "replicasets", apiserver.namespace)) and len(found) >= len(names)
        and found, timeout=30, message="a ReplicaSet for every Deployment")
    assert len(replica_sets) == len(names)
    assert "Traceback" not in log.read_text()


def test_many_objects_changed_while_the_operator_was_down(apiserver: ClusterApi, run_operator: Any) -> None:
    apiserver.create_llama("llamamodels", model_body(spec=VOLUME_MODEL))
    names = _servers(apiserver, 50, contextSize=4096)
    with run_operator("llama_operator.handlers"):
        apiserver.wait_for(lambda: _converged(apiserver, names, "4096"), timeout=120, message="50 servers")
    for name in names:
        apiserver.patch(CRD, "llamaservers", apiserver.namespace, name, {"spec": {"contextSize": 8192}})
    for name in names[:5]:
        apiserver.delete("v1", "services", apiserver.namespace, name)
    apiserver.delete(CRD, "llamaservers", apiserver.namespace, names[-1])
    restarted = time.monotonic()
    with run_operator("llama_operator.handlers") as runner:
        apiserver.wait_for(lambda: _converged(apiserver, names[:-1], "8192"), timeout=120,
                           message="49 servers changed while down")
        took = time.monotonic() - restarted
    print(f"50 changed while down: converged {took:.1f}s after the start")  # (KopfRunner captures stdout inside)
    apiserver.wait_for(lambda: names[-1] not in _deployments(apiserver), timeout=30,
                       message="the deleted server's Deployment garbage-collected")
    _assert_no_duplicates(apiserver, names[:-1])
    assert "Traceback" not in runner.output


def test_etcd_briefly_unavailable(apiserver: ClusterApi, run_operator: Any, control_plane: Any) -> None:
    apiserver.create_llama("llamamodels", model_body(spec=VOLUME_MODEL))
    with run_operator("llama_operator.handlers", timeout=90) as runner:
        first = _servers(apiserver, 1, contextSize=4096)
        apiserver.wait_for(lambda: _converged(apiserver, first, "4096"), timeout=30, message="before the outage")
        control_plane.restart("etcd", down_for=5)
        back = time.monotonic()
        apiserver.create_llama("llamaservers", server_body("after", contextSize=4096))
        apiserver.wait_for(lambda: _converged(apiserver, [*first, "after"], "4096"), timeout=90,
                           message="a server created after etcd came back")
        took = time.monotonic() - back
    print(f"etcd down 5 s: a server created after it came back converged in {took:.1f}s")
    assert "Traceback" not in runner.output


class _ConflictWebhook:
    """A validating webhook that refuses the first `refusals` status writes of LlamaServers with 409 Conflict,
    the way a concurrent writer's resourceVersion race surfaces, then admits everything."""

    def __init__(self, directory: pathlib.Path, refusals: int) -> None:
        ca = CertificateAuthority(directory / "webhook-pki")
        pair = ca.issue("webhook", common_name="conflict-webhook", ip_addresses=["127.0.0.1"], server=True)
        self.ca_bundle = base64.b64encode(ca.pem).decode()
        self.refusals = refusals
        self.refused = 0
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                allowed = webhook.refused >= webhook.refusals
                if not allowed:
                    webhook.refused += 1
                response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": allowed}
                if not allowed:
                    response["status"] = {"code": 409, "reason": "Conflict",
                                          "message": "injected conflict on the status write"}
                body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                   "response": response}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(str(pair.cert), str(pair.key))
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_status_writes_refused_with_409_are_retried(apiserver: ClusterApi, run_operator: Any,
                                                    tmp_path: pathlib.Path) -> None:
    webhook = _ConflictWebhook(tmp_path, refusals=3)
    name = f"conflict-{apiserver.namespace}"
    apiserver.create("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", None, {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "conflict.tests.llamacpp.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"url": webhook.url, "caBundle": webhook.ca_bundle},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": apiserver.namespace}},
            "rules": [{"apiGroups": ["llamacpp.dev"], "apiVersions": ["v1beta1"], "operations": ["UPDATE"],
                       "resources": ["llamaservers/status"]}]}]})
    try:
        apiserver.create_llama("llamamodels", model_body(spec=VOLUME_MODEL))
        with run_operator("llama_operator.handlers", timeout=90) as runner:
            created = time.monotonic()
            names = _servers(apiserver, 1, contextSize=4096)
            apiserver.wait_for(lambda: _converged(apiserver, names, "4096"), timeout=60,
                               message="status written after the conflicts")
            took = time.monotonic() - created
        print(f"3 status writes refused with 409: status written {took:.1f}s after create")
        assert webhook.refused == 3
        assert "injected conflict" in runner.output, "the refused writes were seen, and retried"
        assert "Traceback" not in runner.output
    finally:
        apiserver.delete("admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", None, name)
        webhook.close()
