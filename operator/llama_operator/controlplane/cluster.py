"""Starts and stops one local control plane: etcd, kube-apiserver and (optionally) the controller manager and
scheduler, each a child process on free 127.0.0.1 ports, logging to files in the state directory.

The API server authorizes with Node,RBAC and authenticates client certificates signed by the local CA and
service-account tokens signed by the local key, so RBAC, admission, CEL, webhooks, immutable fields and
conflicts behave as on any cluster. Service ClusterIPs are allocated from `service_cidr` but nothing here
routes them: never connect to those addresses.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import yaml

from .binaries import ControlPlaneBinaries, find_binaries
from .certs import CertificateAuthority, KeyPair, write_service_account_key

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVICE_CIDR = "10.96.0.0/16"
# The first address of the service range: the `kubernetes` Service, so it must be in the serving cert.
KUBERNETES_SERVICE_IP = "10.96.0.1"
ADMIN_USER = "llama-operator-admin"


class ControlPlaneError(RuntimeError):
    """A control-plane process did not start or did not become healthy; the message quotes its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child before exec: `sig` when the process that started it dies, even by SIGKILL (Linux; elsewhere
    nothing). The control plane's children get SIGTERM; the sandbox's containers and the test kubelet's SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


_PR_SET_PDEATHSIG = 1


@dataclass
class ChildProcess:
    """One long-running child in a session of its own (stopping signals its whole process group, never the
    caller's), its output appended to `log_path`, SIGTERM when the Python process that started it dies. The real
    nodes' processes (llama_operator.nodes.processes) are these too."""

    name: str
    argv: list[str]
    log_path: pathlib.Path
    env: dict[str, str] | None = None
    """None: this process's environment."""
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, start_new_session=True, preexec_fn=die_with_parent)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL after `grace` seconds; safe to call twice."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.popen = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class ControlPlane:
    """One control plane in `state_dir`. `start()` returns once the API server's /readyz answers ok.

    `controllers` runs kube-controller-manager (garbage collector, Deployment/ReplicaSet, namespace,
    service-account token controllers ...); `scheduler` runs kube-scheduler (only useful with a node).
    `crds` are created (and Established) before the controller manager starts, so its garbage collector
    watches them from the start instead of discovering them at its next 30 s resync.
    `issue_cert` signs more identities (a kubelet's) with the same CA.
    `address` is where the API server listens and what it advertises (the `kubernetes` Service's endpoint):
    loopback unless pods in containers must reach it through that Service (real nodes: an address on an
    interface the run made, llama_operator.nodes).
    """

    state_dir: pathlib.Path
    binaries: ControlPlaneBinaries | None = None
    controllers: bool = True
    scheduler: bool = False
    crds: list[dict[str, Any]] = field(default_factory=list)
    extra_apiserver_args: list[str] = field(default_factory=list)
    apiserver_port: int = 0
    etcd_port: int = 0
    address: str = LOOPBACK
    _processes: dict[str, ChildProcess] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.state_dir = pathlib.Path(self.state_dir)
        self.pki = self.state_dir / "pki"
        self.logs = self.state_dir / "logs"
        self.admin_kubeconfig = self.state_dir / "admin.kubeconfig"

    # -- lifecycle ----------------------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> ControlPlane:
        self.binaries = self.binaries or find_binaries()
        self.logs.mkdir(parents=True, exist_ok=True)
        self._make_pki()
        self.etcd_port = self.etcd_port or free_port()
        self.apiserver_port = self.apiserver_port or free_port()
        self._write_admin_kubeconfig()
        try:
            self._start_etcd(timeout)
            self._start_apiserver(timeout)
            self._install_crds(timeout)
            if self.controllers:
                self._start_controller_manager()
            if self.scheduler:
                self._start_scheduler()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process, newest first (the API server before etcd); safe to call twice."""
        for process in reversed(list(self._processes.values())):
            process.stop()

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- facts --------------------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def ca_cert(self) -> pathlib.Path:
        return self.pki / "ca.crt"

    def pids(self) -> dict[str, int]:
        return {name: p.popen.pid for name, p in self._processes.items() if p.popen is not None and p.running()}

    def kubeconfig_for_token(self, path: pathlib.Path, token: str, *, user: str, namespace: str = "default"
                             ) -> pathlib.Path:
        """A kubeconfig that authenticates with a bearer token (a ServiceAccount's)."""
        return _write_kubeconfig(path, server=self.server, ca_pem=self.ca_cert.read_bytes(), user=user,
                                 credentials={"token": token}, namespace=namespace)

    def issue_cert(self, name: str, *, common_name: str, organizations: list[str] | tuple[str, ...] = (),
                   ip_addresses: list[str] | tuple[str, ...] = (), dns_names: list[str] | tuple[str, ...] = (),
                   client: bool = False, server: bool = False) -> KeyPair:
        """A certificate signed by this control plane's CA (`pki/<name>.crt|key`); available after start()."""
        return self._ca.issue(name, common_name=common_name, organizations=organizations,
                              ip_addresses=ip_addresses, dns_names=dns_names, client=client, server=server)

    def kubeconfig_for_cert(self, path: pathlib.Path, pair: KeyPair, *, user: str, namespace: str = "default"
                            ) -> pathlib.Path:
        """A kubeconfig that authenticates with a client certificate (e.g. one from issue_cert)."""
        return _write_kubeconfig(path, server=self.server, ca_pem=self.ca_cert.read_bytes(), user=user,
                                 credentials={"client-certificate-data": _b64(pair.cert.read_bytes()),
                                              "client-key-data": _b64(pair.key.read_bytes())},
                                 namespace=namespace)

    # -- internals ------------------------------------------------------------------------------------------

    def _make_pki(self) -> None:
        ca = self._ca = CertificateAuthority(self.pki)
        self._serving = ca.issue(
            "apiserver", common_name="kube-apiserver", server=True,
            dns_names=["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       "kubernetes.default.svc.cluster.local"],
            ip_addresses=list(dict.fromkeys([LOOPBACK, self.address, KUBERNETES_SERVICE_IP])))
        self._admin = ca.issue("admin", common_name=ADMIN_USER, organizations=["system:masters"], client=True)
        self._kubelet_client = ca.issue("apiserver-kubelet-client", common_name="kube-apiserver-kubelet-client",
                                        organizations=["system:masters"], client=True)
        self._sa: KeyPair = write_service_account_key(self.pki)
        # The admin's TLS context, made once per PKI: readiness polls use it several times a second.
        self._admin_tls = ssl.create_default_context(cafile=str(self.ca_cert))
        self._admin_tls.load_cert_chain(str(self._admin.cert), str(self._admin.key))

    def _write_admin_kubeconfig(self) -> None:
        _write_kubeconfig(self.admin_kubeconfig, server=self.server, ca_pem=self.ca_cert.read_bytes(),
                          user=ADMIN_USER, credentials={
                              "client-certificate-data": _b64(self._admin.cert.read_bytes()),
                              "client-key-data": _b64(self._admin.key.read_bytes())})

    def _spawn(self, name: str, argv: list[str]) -> ChildProcess:
        process = self._processes.get(name) or ChildProcess(name, argv, self.logs / f"{name}.log")
        self._processes[name] = process
        process.start()
        log.info("Started %s (pid %s), log %s", name, process.popen.pid if process.popen else "?", process.log_path)
        return process

    def _start_etcd(self, timeout: float) -> None:
        assert self.binaries is not None
        peer = free_port()
        client_url = f"http://{LOOPBACK}:{self.etcd_port}"
        process = self._spawn("etcd", [
            str(self.binaries.etcd), "--name", "local", "--data-dir", str(self.state_dir / "etcd"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", f"http://{LOOPBACK}:{peer}",
            "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{peer}",
            "--initial-cluster", f"local=http://{LOOPBACK}:{peer}",
            # Tests and the sandbox trade durability for speed; the data directory is disposable.
            "--unsafe-no-fsync", "--log-level", "warn", "--quota-backend-bytes", str(2 * 1024**3),
        ])
        self._wait_etcd(process, timeout)

    def _wait_etcd(self, process: ChildProcess, timeout: float) -> None:
        url = f"http://{LOOPBACK}:{self.etcd_port}/health"

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
                    return json.loads(response.read()).get("health") == "true"
            except (OSError, ValueError):
                return False
        self._wait(process, healthy, timeout)

    def _start_apiserver(self, timeout: float) -> None:
        assert self.binaries is not None
        process = self._spawn("kube-apiserver", [
            str(self.binaries.kube_apiserver),
            "--etcd-servers", f"http://{LOOPBACK}:{self.etcd_port}",
            "--bind-address", self.address, "--advertise-address", self.address,
            "--secure-port", str(self.apiserver_port),
            "--cert-dir", str(self.pki),
            "--tls-cert-file", str(self._serving.cert), "--tls-private-key-file", str(self._serving.key),
            "--client-ca-file", str(self.ca_cert),
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", str(self._sa.cert),
            "--service-account-signing-key-file", str(self._sa.key),
            "--service-cluster-ip-range", SERVICE_CIDR,
            "--authorization-mode", "Node,RBAC",
            "--kubelet-client-certificate", str(self._kubelet_client.cert),
            "--kubelet-client-key", str(self._kubelet_client.key),
            "--kubelet-preferred-address-types", "InternalIP",
            "--profiling=false", "--v=1",
            *self.extra_apiserver_args,
        ])
        self._wait_ready(process, timeout)

    def _admin_request(self, method: str, path: str, body: Any = None) -> bytes:
        request = urllib.request.Request(f"{self.server}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10, context=self._admin_tls) as response:  # noqa: S310
            return bytes(response.read())

    def _wait_ready(self, process: ChildProcess, timeout: float) -> None:
        def ready() -> bool:
            try:
                return self._admin_request("GET", "/readyz").strip() == b"ok"
            except (OSError, urllib.error.URLError):
                return False
        self._wait(process, ready, timeout)

    def _install_crds(self, timeout: float) -> None:
        collection = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        for crd in self.crds:
            try:
                self._admin_request("POST", collection, crd)
            except urllib.error.HTTPError as exc:
                if exc.code != 409:  # already there from an earlier start with the same etcd data
                    raise ControlPlaneError(f"CRD {crd['metadata']['name']} refused: {exc.read().decode()}") from exc

        def established() -> bool:
            for crd in self.crds:
                stored = json.loads(self._admin_request("GET", f"{collection}/{crd['metadata']['name']}"))
                conditions = (stored.get("status") or {}).get("conditions") or []
                if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                    return False
            return True
        self._wait(self._processes["kube-apiserver"], established, timeout)

    def _start_controller_manager(self) -> None:
        assert self.binaries is not None
        self._spawn("kube-controller-manager", [
            str(self.binaries.kube_controller_manager),
            "--kubeconfig", str(self.admin_kubeconfig),
            "--service-account-private-key-file", str(self._sa.key),
            "--root-ca-file", str(self.ca_cert),
            "--use-service-account-credentials=false",
            "--leader-elect=false", "--controllers=*",
            "--bind-address", LOOPBACK, "--secure-port=0",
            # Resyncs and GC at test speed: a deleted owner's children go within a second or two.
            "--concurrent-gc-syncs=5", "--v=1",
        ])

    def _start_scheduler(self) -> None:
        assert self.binaries is not None
        self._spawn("kube-scheduler", [
            str(self.binaries.kube_scheduler), "--kubeconfig", str(self.admin_kubeconfig),
            "--authentication-kubeconfig", str(self.admin_kubeconfig),
            "--authorization-kubeconfig", str(self.admin_kubeconfig),
            "--leader-elect=false", "--bind-address", LOOPBACK, "--secure-port", str(free_port()), "--v=1",
        ])

    @staticmethod
    def _wait(process: ChildProcess, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.running():
                raise ControlPlaneError(f"{process.name} exited during start-up:\n{process.log_tail()}")
            if check():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{process.name} not healthy after {timeout:.0f} s:\n{process.log_tail()}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write_kubeconfig(path: pathlib.Path, *, server: str, ca_pem: bytes, user: str, credentials: dict[str, str],
                      namespace: str = "default") -> pathlib.Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": user, "namespace": namespace}}],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
