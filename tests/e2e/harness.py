"""`llama-operator sandbox` as a real child process (`SandboxProcess`), for the e2e tests and the sandbox benchmark.

`SandboxProcess(state_dir, env)`: `.wait_ready()`, then `.kubeconfig`, `.api` (kubernetes ApiClient), `.url(service)`
(the local Service URL), `.kubectl(*args)`, `.wait_line(regex)`, `.stop()` (SIGINT, like Ctrl-C; returns the exit
code). `sandbox_requirements()`: the environment it needs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes

from llama_operator.controlplane.binaries import ENV_DIR
from tests import waiting
from tests.tiers import CONTROL_PLANE, HELM, IMAGES, LLAMA_SERVER, NODE_KIT, ROOT, missing, require

# The sandbox's API serves a whole node and an operator: poll it gently.
wait_for = functools.partial(waiting.wait_for, interval=0.25)
LLAMA_OPERATOR = str(Path(sys.executable).with_name("llama-operator"))
START_TIMEOUT = 240


def tree_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (the sandbox's unique state directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (marker in cmdline or marker in environ):
            found.append(f"{proc.name}: {cmdline}")
    return found


class SandboxProcess:
    def __init__(self, state_dir: Path, env: dict[str, str], args: tuple[str, ...] = (),
                 nodes: str = "1") -> None:
        self.state_dir = state_dir
        self.env = env
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [LLAMA_OPERATOR, "sandbox", "--state-dir", str(state_dir), "--service-port-base", "0", "--verbose",
             "--nodes", nodes, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.kubeconfig = state_dir / "kubeconfig"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> SandboxProcess:
        """Until the sandbox says it is ready; then the API clients are usable."""
        try:
            self.wait_line(r"^Sandbox ready", timeout=timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; the sandbox said:\n{self.log()}") from None
        self.kubectl_bin = self.wait_line(r"^kubectl: (.+)$").group(1)
        self.api = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, *, timeout: float = 60) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError("the sandbox exited:\n" + "\n".join(self.lines[-50:]))
            return next((m for line in list(self.lines) if (m := regex.search(line))), None)

        return wait_for(found, timeout=timeout, message=f"sandbox output {pattern!r}")

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess[str]:  # noqa: A002 - subprocess's name
        """The sandbox's kubectl (same version as its API server) with the sandbox's kubeconfig."""
        proc = subprocess.run([self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args], capture_output=True,
                              text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def url(self, service: str, port: int = 8080) -> str:
        def read() -> str | None:
            path = self.state_dir / "services.json"
            return json.loads(path.read_text()).get(f"{service}:{port}") if path.exists() else None
        return wait_for(read, timeout=30, message=f"a local port for Service {service}")

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if hasattr(self, "api"):
                self.api.close()
            self._reader.join(timeout=5)

    def log(self) -> str:
        return "\n".join(self.lines[-80:])


@contextlib.contextmanager
def serve_file(host: str, path: Path) -> Iterator[str]:
    """`path` over plain HTTP on `host` (real nodes: the host address of nodes.json, where pods reach this
    machine): its URL."""
    handler = functools.partial(_QuietHandler, directory=str(path.parent))
    server = _QuietServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}/{path.name}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that closes early (the operator reads only a GGUF's header) is no error worth a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


def sandbox_requirements() -> dict[str, str]:
    """The environment a sandbox needs (LLAMA_SERVER_BIN, HELM, the control plane); RuntimeError naming a missing
    tool (in a test, the root check has skipped or failed it before: tests/tiers.py)."""
    for tool in (ROOT, CONTROL_PLANE, HELM, LLAMA_SERVER):
        problem = missing(tool)
        if problem is not None:
            raise RuntimeError(f"the sandbox needs {problem.tool}: {problem.reason}")
    env = {"LLAMA_SERVER_BIN": require(LLAMA_SERVER), "HELM": require(HELM), ENV_DIR: require(CONTROL_PLANE)}
    # Real nodes (`--nodes N`): the kit and the images of this checkout, never an older build the sandbox would
    # otherwise pick from the cache (a test that needs them is marked `nodes`, which checks they exist).
    for tool, variable in ((NODE_KIT, "LLAMA_OPERATOR_NODE_KIT_DIR"), (IMAGES, "LLAMA_OPERATOR_IMAGES_DIR")):
        if missing(tool) is None:
            env[variable] = require(tool)
    return env


def custom_object(group_plural: str, name: str, spec: dict[str, Any], namespace: str = "default",
                  version: str = "v1beta1") -> dict[str, Any]:
    kind = {"llamamodels": "LlamaModel", "llamaservers": "LlamaServer"}[group_plural]
    return {"apiVersion": f"llamacpp.dev/{version}", "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
