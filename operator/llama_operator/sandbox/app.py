"""`llama-operator sandbox`: a real Kubernetes cluster on this machine, with the operator installed.

What runs (all children of this process, each in a process group of its own):
- the real control plane (llama_operator.controlplane): etcd, kube-apiserver (Node,RBAC authorization,
  webhooks resolved through the Service's endpoints: `--enable-aggregator-routing`), kube-controller-manager
  and kube-scheduler, from `make control-plane`;
- `--nodes` real nodes (real_nodes.py over llama_operator.nodes: a kubelet and a containerd each, kube-proxy,
  CoreDNS, a local registry with the images of `make images`), a local-path provisioner (storage.py) and a host
  port per Service (proxy.py);
- the operator: by default `helm install` of charts/llama-operator, so it is a pod of its Deployment on a
  node, with its ServiceAccount, the chart's RBAC and its webhook behind the chart's Service and TLS;
  `--operator local` runs `llama-operator run` as a plain process with the admin kubeconfig instead (no webhook).

Every start is a fresh cluster: the etcd data of the previous run is deleted at start. What makes a second
start warm is kept: PVC and hostPath volume directories (model caches) and the built binaries. State directory
(default `$XDG_STATE_HOME/llama-operator/sandbox`): `kubeconfig` (written once the sandbox is ready, removed at
stop), `services.json`, `nodes.json` (the host address, the registry, the images), `cluster/` (control plane:
PKI, etcd, logs), `nodes/` (each node's state and logs), `pvc/<node>/<ns>/<claim>/`, `hostpath/<path>/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import glob
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import IO, Any

import aiohttp

from ..api.v1beta1 import API_VERSION
from ..controlplane import BinariesMissing, ControlPlane, ControlPlaneBinaries, find_binaries
from ..nodes.kit import KitMissing
from ..nodes.processes import NodesError
from .client import Api, ApiError, Informer, client_ssl_context, resource_path
from .helm import (
    EGRESS_GUARD_ENV,
    NAMESPACE,
    RELEASE,
    HelmError,
    find_chart,
    find_helm,
    install,
    known_values,
    values_from_env,
)
from .processes import ExecutableMissing, operator_executable, spawn, terminate
from .proxy import ServiceProxies
from .real_nodes import RealNodeSet

log = logging.getLogger("llama_operator.sandbox")

OPERATOR_GRACE = 10.0
READY_TIMEOUT = 300.0
PROBE_SERVER = "sandbox-webhook-probe"


def default_state_dir() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(root) / "llama-operator" / "sandbox"


def say(message: str) -> None:
    print(message, flush=True)


def find_control_plane(directory: str | None) -> ControlPlaneBinaries:
    """--control-plane-dir, $LLAMA_OPERATOR_CONTROL_PLANE_DIR, PATH, else the newest `make control-plane` build."""
    try:
        return find_binaries(directory)
    except BinariesMissing:
        if directory or os.environ.get("LLAMA_OPERATOR_CONTROL_PLANE_DIR"):
            raise
        root = os.environ.get("LLAMA_OPERATOR_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llama-operator")
        for candidate in sorted(glob.glob(os.path.join(root, "control-plane-*")), key=os.path.getmtime,
                                reverse=True):
            with contextlib.suppress(BinariesMissing):
                return find_binaries(candidate)
        raise



def restarted_containers(pods: list[dict[str, Any]], seen: dict[str, int]) -> list[str]:
    """One line per container that restarted since `seen` (updated): pod, container, exit code and the last line
    of its termination message."""
    lines = []
    for pod in pods:
        name = pod["metadata"]["name"]
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            key, count = f"{name}/{container['name']}", int(container.get("restartCount") or 0)
            if count <= seen.get(key, 0):
                continue
            seen[key] = count
            last = (container.get("lastState") or {}).get("terminated") or {}
            message = (last.get("message") or "").strip().splitlines()
            detail = f": {message[-1]}" if message else ""
            lines.append(f"Pod {NAMESPACE}/{name}: {container['name']} restarted ({count}x, exit code "
                         f"{last.get('exitCode', '?')}){detail} (kubectl -n {NAMESPACE} logs --previous {name})")
    return lines


async def _preferred_version(admin: Api) -> str:
    """The llamacpp.dev version the API server prefers (discovery); this build's until the group is served."""
    group = await admin.get(f"/apis/{API_VERSION.split('/')[0]}")
    preferred = ((group or {}).get("preferredVersion") or {}).get("groupVersion")
    return str(preferred) if preferred else API_VERSION


class SandboxError(RuntimeError):
    """The sandbox could not start; the message says why and what to do."""


LOCK_FILE = "sandbox.lock"


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold the state directory for this process (an flock, released when the process ends, however it ends):
    a second sandbox on the same directory would wipe the first one's cluster and collide on its nodes."""
    handle = (state_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise SandboxError(f"another sandbox{f' (pid {holder})' if holder else ''} is running with state "
                           f"directory {state_dir}: stop it first (Ctrl-C in its terminal), or give this one "
                           "another --state-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class Sandbox:
    def __init__(self, *, state_dir: Path, api_port: int, service_port_base: int, operator: str = "helm",
                 chart: str | None = None, helm: str | None = None, control_plane_dir: str | None = None) -> None:
        self.state_dir = state_dir
        self.api_port = api_port
        self.service_port_base = service_port_base
        self.operator_mode = operator
        self.chart = chart
        self.helm = helm
        self.control_plane_dir = control_plane_dir
        self.urls: dict[str, str] = {}
        self._ready: dict[tuple[str, str], bool] = {}
        self._operator: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.nodes = 2  # --nodes: how many real nodes (real_nodes.py)
        self.node: RealNodeSet | None = None
        self.network_policies = False  # --network-policies: enforced (real nodes; the first node's pods only)
        self.gateway = False  # the gateway hook (docs/gateway.md): `--gateway` installs it with the chart

    # ------------------------------------------------------------------------------------------ reporting

    def _on_service(self, service: str, port: int, local_port: int | None) -> None:
        key = f"{service}:{port}"
        if local_port is None:
            self.urls.pop(key, None)
        else:
            self.urls[key] = f"http://127.0.0.1:{local_port}"
            say(f"Service {service} port {port} -> http://127.0.0.1:{local_port}")
        (self.state_dir / "services.json").write_text(json.dumps(self.urls, indent=2, sort_keys=True) + "\n")

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

    # ------------------------------------------------------------------------------------------ the operator

    async def _run_local_operator(self, executable: str, kubeconfig: Path, images: dict[str, str]) -> None:
        # The registry's images, as the chart values of helm mode: the nodes can pull no other.
        env = {**os.environ, **images, "KUBECONFIG": str(kubeconfig)}
        env.setdefault("LLAMA_OPERATOR_METRICS_PORT", "0")  # the default :8000 would clash on a workstation
        env.setdefault(EGRESS_GUARD_ENV, "false")  # see helm.EGRESS_GUARD_ENV
        env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config of a surrounding cluster
        log_path = self.state_dir / "operator.log"
        while not self._stopping:
            self._operator = await spawn([executable, "run"], env=env, cwd=self.state_dir,
                                         log_path=log_path)
            say(f"Operator: llama-operator run (local process, pid {self._operator.pid}), log {log_path}")
            code = await self._operator.wait()
            if self._stopping:
                return
            say(f"Operator exited with code {code}; restarting in 5s (see {log_path})")
            await asyncio.sleep(5)

    async def _install_operator(self, admin_kubeconfig: Path, node_values: dict[str, Any]) -> None:
        helm = find_helm(self.helm)
        chart = find_chart(self.chart)
        values = values_from_env({EGRESS_GUARD_ENV: "false", **os.environ})  # see helm.EGRESS_GUARD_ENV
        values.update(node_values)  # the images the nodes pull
        if self.gateway:  # the gateway hook (docs/gateway.md)
            values["gateway"] = {"enabled": True}
        values, unknown = known_values(chart, values)
        if unknown:
            say(f"The chart {chart} does not know the values {', '.join(unknown)}: left out")
        output = await install(helm, chart, admin_kubeconfig, values, self.state_dir / "values.yaml")
        first = next((line for line in output.splitlines() if line.startswith("NAME:")), "")
        say(f"Operator: helm install {RELEASE} {chart} --namespace {NAMESPACE} ({first.strip() or 'installed'})")

    async def _wait_operator(self, admin: Api, stop: asyncio.Event) -> str:
        """Until the operator answers: Deployment available and (helm mode) its webhook refusing a bad object.
        Ctrl-C meanwhile ends the wait (and the start). The API version the installed CRDs prefer: this chart's
        v1beta1, or v1alpha1 from an earlier release's chart (`--chart`, as tests/e2e/test_upgrade.py installs)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        restarts: dict[str, int] = {}
        next_look = loop.time()
        while loop.time() < deadline:
            if stop.is_set():
                raise SandboxError("stopped before the operator answered")
            try:
                version = await _preferred_version(admin)
                bad = {"apiVersion": version, "kind": "LlamaServer", "metadata": {"name": PROBE_SERVER},
                       "spec": {"modelRef": {"name": PROBE_SERVER}, "args": ["--sandbox-webhook-probe"]}}
                await admin.create(resource_path(version, "llamaservers", "default"), bad, params={"dryRun": "All"})
            except ApiError as exc:
                if "denied the request" in exc.message:
                    return version
            except aiohttp.ClientError:
                pass
            if loop.time() >= next_look:  # a crash-looping operator says so, rather than a silent wait
                next_look = loop.time() + 2
                with contextlib.suppress(ApiError, aiohttp.ClientError):
                    pods, _ = await admin.list(resource_path("v1", "pods", NAMESPACE))
                    for line in restarted_containers(pods, restarts):
                        say(f"{line}; still waiting (Ctrl-C stops)")
            await asyncio.sleep(0.5)
        raise SandboxError(f"the operator's webhook did not answer within {READY_TIMEOUT:.0f} s: see "
                           f"`kubectl -n {NAMESPACE} describe pods` and the pod logs under "
                           f"{self.state_dir}/nodes/*/pod-logs")

    # ------------------------------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> int:
        from ..api.crd import all_crds

        binaries = find_control_plane(self.control_plane_dir)
        local = self.operator_mode == "local"
        executable = operator_executable() if local else ""  # missing: said before anything starts
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_state_dir(self.state_dir)  # before anything of a running sandbox's is wiped
        for stale in ("cluster", "kubeconfig", "services.json", "nodes.json"):
            target = self.state_dir / stale
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        node = self.node = RealNodeSet(self.state_dir, self.nodes, network_policies=self.network_policies)
        cluster: ControlPlane | None = None
        kubeconfig = self.state_dir / "kubeconfig"
        try:
            await node.prepare()
            cluster = ControlPlane(
                self.state_dir / "cluster", binaries, controllers=True, scheduler=True,
                crds=all_crds() if local else [], apiserver_port=self.api_port,
                address=node.address, extra_apiserver_args=["--enable-aggregator-routing=true"])
            await asyncio.to_thread(cluster.start)
            say(f"API server: {cluster.server} (etcd, kube-apiserver, kube-controller-manager, kube-scheduler; "
                f"logs in {cluster.logs})")
            admin_pair = cluster.pki / "admin.crt", cluster.pki / "admin.key"
            admin = Api(cluster.server, client_ssl_context(cluster.ca_cert, *admin_pair))
            async with admin:
                values = await node.start(cluster, admin)
                say(node.describe())
                proxies = ServiceProxies(admin, port_base=self.service_port_base, quiet_namespaces=(NAMESPACE,),
                                         on_service=self._on_service)
                self._tasks = [asyncio.create_task(runner, name=name) for name, runner in node.runners().items()]
                self._tasks.append(asyncio.create_task(proxies.run(), name="service proxies"))
                version = API_VERSION
                if local:
                    operator = self._run_local_operator(executable, cluster.admin_kubeconfig, node.operator_env())
                    self._tasks.append(asyncio.create_task(operator, name="operator"))
                else:
                    await self._install_operator(cluster.admin_kubeconfig, values)
                    version = await self._wait_operator(admin, stop)
                servers = Informer(admin, version, "llamaservers", lambda: self._on_servers(servers))
                self._tasks.append(asyncio.create_task(servers.run(), name="llamaservers"))
                shutil.copyfile(cluster.admin_kubeconfig, kubeconfig)
                kubeconfig.chmod(0o600)
                say(f"kubeconfig: {kubeconfig}")
                say(f"  export KUBECONFIG={kubeconfig}")
                say(f"kubectl: {binaries.kubectl}")
                say(f"Sandbox ready (state {self.state_dir}). Ctrl-C stops it and everything it started.")
                stopped = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait([stopped, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopped and task.exception() is not None:
                        log.error("sandbox %s failed", task.get_name(), exc_info=task.exception())
                stopped.cancel()
                say("Stopping: the nodes stop their pods (SIGTERM, their grace period, SIGKILL)")
                self._stopping = True
                if self._operator is not None:
                    await terminate(self._operator, OPERATOR_GRACE)
                await proxies.close()
        finally:
            self._stopping = True
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await node.close()
            if cluster is not None:
                await asyncio.to_thread(cluster.stop)
            kubeconfig.unlink(missing_ok=True)
            lock.close()
        say("Sandbox stopped")
        return 0


async def _main(args: argparse.Namespace) -> int:
    sandbox = Sandbox(state_dir=args.state_path, api_port=args.api_port, service_port_base=args.service_port_base,
                      operator=args.operator, chart=args.chart, helm=args.helm,
                      control_plane_dir=args.control_plane_dir)
    sandbox.gateway = args.gateway  # the gateway hook (docs/gateway.md)
    sandbox.nodes = args.nodes
    sandbox.network_policies = args.network_policies
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # a second Ctrl-C: no more grace
            say("Killing everything now")
            _kill_children(sandbox.node)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    runner = asyncio.create_task(sandbox.run(stop))
    try:
        return await runner
    except (SandboxError, BinariesMissing, ExecutableMissing, HelmError, KitMissing, NodesError) as exc:
        print(f"llama-operator sandbox: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a port taken, a full disk: the reason, not a traceback
        print(f"llama-operator sandbox: {exc}", file=sys.stderr)
        return 1


def _kill_children(node: RealNodeSet | None) -> None:
    """SIGKILL every process group this process started (children run in sessions of their own), then stop the
    nodes (their containers run under containerd's shims, outside this process tree)."""
    with contextlib.suppress(OSError):
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid():  # ppid
                    os.killpg(int(pid_dir.name), signal.SIGKILL)
    if node is not None:
        with contextlib.suppress(Exception):
            node.emergency_stop()
    os._exit(130)


def command(args: argparse.Namespace) -> int:
    """The `llama-operator sandbox` entry point (its options are defined in __init__.py)."""
    args.state_path = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per API request: noise
    return asyncio.run(_main(args))
