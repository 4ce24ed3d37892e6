"""`llama-operator sandbox`: the API emulator, the CRDs, the operator (unchanged) and a local node, in one tree.

Process tree: this process serves the Kubernetes API emulator (a thread) and runs the node (kubelet,
Deployment/PV/Endpoints controllers, Service proxies; node.py). The operator is a child process,
`llama-operator run`, pointed at the emulator by a kubeconfig file exactly as it would be at a cluster, and
restarted if it exits (as its Deployment would). Pods' containers are further child processes (kubelet.py).

State directory (default `$XDG_STATE_HOME/llama-operator/sandbox`, i.e. `~/.local/state/...`):
`kubeconfig`, `operator.log`, `services.json` (Service → local URL), `pods/<ns>_<pod>_<uid>/` (emptyDirs,
container logs, termination messages; cleared at start), `pvc/<ns>/<claim>/` and `hostpath/<path>/`
(persistent model caches: kept across runs, so a second run starts warm).

Shutdown (Ctrl-C / SIGTERM): every pod gets SIGTERM, its grace period, then SIGKILL; the operator the same;
a second Ctrl-C SIGKILLs at once. No process is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from .client import Api, Informer
from .images import ImageTable, operator_executable
from .kubelet import spawn, terminate
from .node import Node

log = logging.getLogger("llama_operator.sandbox")

OPERATOR_GRACE = 10.0
REQUEST_LOG_LIMIT = 256
"""The sandbox runs for hours: its API emulator keeps only the newest requests (see Emulator)."""



def default_state_dir() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(root) / "llama-operator" / "sandbox"


def say(message: str) -> None:
    print(message, flush=True)


class Sandbox:
    def __init__(self, *, state_dir: Path, api_port: int, service_port_base: int, images: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.api_port = api_port
        self.service_port_base = service_port_base
        self.images = ImageTable(images)
        self.urls: dict[str, str] = {}
        self._ready: dict[tuple[str, str], bool] = {}
        self._operator: asyncio.subprocess.Process | None = None
        self._stopping = False

    def _on_service(self, service: str, port: int, local_port: int) -> None:
        self.urls[f"{service}:{port}"] = f"http://127.0.0.1:{local_port}"
        (self.state_dir / "services.json").write_text(json.dumps(self.urls, indent=2, sort_keys=True) + "\n")
        say(f"Service {service} port {port} -> http://127.0.0.1:{local_port}")

    def _on_servers(self, servers: Informer) -> None:
        for (namespace, name), server in servers.objects.items():
            status = server.get("status") or {}
            ready = status.get("phase") == "Ready"
            if ready and not self._ready.get((namespace, name)):
                endpoint = str(status.get("endpoint") or "")
                # http://<service>.<namespace>.svc:<port>/v1 -> the local proxy of that Service port
                host, _, rest = endpoint.removeprefix("http://").partition(":")
                local = self.urls.get(f"{namespace}/{host.split('.')[0]}:{rest.split('/')[0]}")
                where = f"{local}/v1" if local else "(no local Service port yet)"
                say(f"LlamaServer {namespace}/{name} is Ready: {where} (model {status.get('modelName')})")
            self._ready[(namespace, name)] = ready

    async def _run_operator(self, kubeconfig: Path) -> None:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.setdefault("LLAMA_OPERATOR_METRICS_PORT", "0")  # the default :8000 would clash on a workstation
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config of a surrounding cluster
        log_path = self.state_dir / "operator.log"
        while not self._stopping:
            self._operator = await spawn([operator_executable(), "run"], env=env, cwd=self.state_dir,
                                         log_path=log_path)
            say(f"Operator: llama-operator run (pid {self._operator.pid}), log {log_path}")
            code = await self._operator.wait()
            if self._stopping:
                return
            say(f"Operator exited with code {code}; restarting in 5s (see {log_path})")
            await asyncio.sleep(5)

    async def run(self, stop: asyncio.Event) -> int:
        from ..api.crd import all_crds
        from ..emulator import EmulatorThread, write_kubeconfig

        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.state_dir / "pods", ignore_errors=True)  # pods of a previous run's (gone) API
        emulator = await asyncio.to_thread(EmulatorThread(port=self.api_port or None, crds=all_crds(),
                                                              request_log_limit=REQUEST_LOG_LIMIT).start)
        kubeconfig = write_kubeconfig(self.state_dir / "kubeconfig", emulator.url)
        say(f"API server: {emulator.url}")
        say(f"kubeconfig: {kubeconfig}")
        say(f"  export KUBECONFIG={kubeconfig}")
        tasks: list[asyncio.Task[Any]] = []
        try:
            async with Api(emulator.url) as api:
                node = Node(api, state_dir=self.state_dir, images=self.images,
                            service_port_base=self.service_port_base, on_service=self._on_service)
                servers = Informer(api, "llamacpp.dev/v1alpha1", "llamaservers", lambda: None)
                servers._on_change = lambda: self._on_servers(servers)
                tasks = [asyncio.create_task(node.run(), name="node"),
                         asyncio.create_task(servers.run(), name="llamaservers"),
                         asyncio.create_task(self._run_operator(kubeconfig), name="operator")]
                say(f"Sandbox ready (state {self.state_dir}). Ctrl-C stops it and everything it started.")
                stopped = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopped and task.exception() is not None:
                        log.error("sandbox %s failed", task.get_name(), exc_info=task.exception())
                stopped.cancel()
                say("Stopping: pods get SIGTERM and their grace period, then SIGKILL")
                self._stopping = True
                operator = self._operator
                await asyncio.gather(node.shutdown(),
                                     terminate(operator, OPERATOR_GRACE) if operator else asyncio.sleep(0))
        finally:
            self._stopping = True
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await asyncio.to_thread(emulator.stop)
            kubeconfig.unlink(missing_ok=True)
        say("Sandbox stopped")
        return 0


async def _main(args: argparse.Namespace) -> int:
    images = {}
    for item in args.image or []:
        image, sep, exe = item.partition("=")
        if not sep or not image or not exe:
            print(f"llama-operator sandbox: --image {item!r}: expected IMAGE=EXECUTABLE", file=sys.stderr)
            return 2
        images[image] = exe
    sandbox = Sandbox(state_dir=args.state_path, api_port=args.api_port,
                      service_port_base=args.service_port_base, images=images)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # a second Ctrl-C: no more grace
            say("Killing everything now")
            _kill_children()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    return await sandbox.run(stop)


def _kill_children() -> None:
    """SIGKILL every process group this process started (children run in sessions of their own)."""
    with contextlib.suppress(OSError):
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid():  # ppid
                    os.killpg(int(pid_dir.name), signal.SIGKILL)
    os._exit(130)


def command(args: argparse.Namespace) -> int:
    """The `llama-operator sandbox` entry point (its options are defined in __init__.py)."""
    args.state_path = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per API request: noise
    return asyncio.run(_main(args))
