"""The sandbox node's pod network: a Linux bridge, one network namespace per pod, and the node's two
host-side services for pods (the API server forwarder and the egress HTTP proxy). Needs root.

Layout (N is the first free /24 of 10.250.0.0/16 on this machine, so two sandboxes never collide):

- bridge `lsbx<N>` with the node address `10.250.N.1/24` (the Node's InternalIP and every pod's hostIP);
- per pod a network namespace `lsbx<N>-<pod uid prefix>` with `eth0` = `10.250.N.<k>/24` (a veth whose host
  end is on the bridge) and a default route via the node address. Pods talk to each other and the host talks
  to pods directly over the bridge, so the real EndpointSlice controller's addresses, the kubelet's probes
  and the API server's webhook calls (endpoint routing) all use real, reachable pod IPs;
- `10.250.N.1:443`: a TCP forwarder to the API server's loopback port (pods get it as
  KUBERNETES_SERVICE_HOST/PORT, the address is in the API server's certificate);
- `10.250.N.1:3128`: an HTTP proxy (CONNECT and plain HTTP) for everything else a pod reaches: there is no NAT,
  so this is the node's only egress, given to containers as HTTP(S)_PROXY. It connects from the host, so a
  URL naming 127.0.0.1 reaches the host's loopback.

No iptables/nftables rules are written and nothing is routed off the machine. Every container process
enters its pod's namespace in `enter_pod()` (setns), and gets a private mount namespace with a fresh
tmpfs on /run, where volumes mounted under /run (/var/run), such as the service-account token, are bind
mounts at their real paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("llama_operator.sandbox")

SUPERNET = ipaddress.ip_network("10.250.0.0/16")
API_PORT = 443
PROXY_PORT = 3128
PREFIX = "lsbx"

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_NOSUID = 2
_MS_NODEV = 4


class NetworkError(RuntimeError):
    """The pod network could not be set up (not root, no `ip`, no free subnet ...)."""


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for args in (("-j", "-4", "route", "show", "table", "all"), ("-j", "-4", "addr")):
        with contextlib.suppress(ValueError, NetworkError):
            for entry in json.loads(run_ip(*args).stdout or "[]"):
                for text in [entry.get("dst")] + [f"{a['local']}/{a['prefixlen']}" for a in
                                                  entry.get("addr_info") or [] if "local" in a]:
                    if text and text != "default":
                        with contextlib.suppress(ValueError):
                            used.append(ipaddress.ip_network(text, strict=False))
    return [n for n in used if isinstance(n, ipaddress.IPv4Network)]


@dataclass
class PodAddress:
    netns: str
    ip: str
    host_veth: str


class PodNetwork:
    """The bridge and the pods' namespaces; `setup()` once, `add_pod()` per pod, `teardown()` at the end."""

    def __init__(self, state_dir: Path) -> None:
        self.record = state_dir / "network.json"
        self.index = -1
        self.subnet: ipaddress.IPv4Network | None = None
        self._free: list[str] = []
        self._pods: dict[str, PodAddress] = {}
        self._lock = asyncio.Lock()

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def node_ip(self) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + 1)

    @property
    def cidr(self) -> str:
        return str(self.subnet)

    def setup(self) -> None:
        if os.geteuid() != 0:
            raise NetworkError("the sandbox needs root: each pod gets a network namespace of its own "
                               "(run it with sudo -E, or as root in a VM/container with CAP_NET_ADMIN)")
        if not Path("/proc/self/ns/net").exists():
            raise NetworkError("this kernel has no network namespaces")
        if shutil.which("ip") is None:
            raise NetworkError("the sandbox needs the `ip` command (iproute2: apt-get install iproute2)")
        self._cleanup_recorded()
        used = used_networks()
        for index, subnet in enumerate(SUPERNET.subnets(new_prefix=24)):
            if index == 0 or any(subnet.overlaps(n) for n in used):
                continue
            self.index, self.subnet = index, subnet
            if run_ip("link", "add", self.bridge, "type", "bridge", check=False).returncode != 0:
                continue  # another sandbox took it a moment ago
            break
        else:
            raise NetworkError(f"no free /24 in {SUPERNET} for the pod network")
        self.record.write_text(json.dumps({"bridge": self.bridge, "netns_prefix": f"{self.bridge}-"}))
        run_ip("addr", "add", f"{self.node_ip}/24", "dev", self.bridge)
        run_ip("link", "set", self.bridge, "up")
        hosts = [str(h) for h in self.subnet.hosts()]
        self._free = hosts[1:]  # .1 is the node
        log.info("Pod network %s on bridge %s (node %s)", self.subnet, self.bridge, self.node_ip)

    def _cleanup_recorded(self) -> None:
        """What a previous run of this state directory left after being SIGKILLed."""
        try:
            record = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return
        prefix = record.get("netns_prefix") or ""
        if prefix:
            for name in run_ip("netns", "list", check=False).stdout.split():
                if name.startswith(prefix):
                    run_ip("netns", "delete", name, check=False)
        if record.get("bridge"):
            run_ip("link", "delete", record["bridge"], check=False)
        self.record.unlink(missing_ok=True)

    def teardown(self) -> None:
        self._pods.clear()
        if self.index >= 0:
            # Every namespace of this bridge, also one whose pod was stopped while it was being set up.
            for name in run_ip("netns", "list", check=False).stdout.split():
                if name.startswith(f"{self.bridge}-"):
                    run_ip("netns", "delete", name, check=False)
            run_ip("link", "delete", self.bridge, check=False)
        self.record.unlink(missing_ok=True)

    async def add_pod(self, uid: str) -> PodAddress:
        async with self._lock:
            if uid in self._pods:
                return self._pods[uid]
            if not self._free:
                raise NetworkError(f"no free pod address in {self.subnet}")
            ip = self._free.pop(0)
            suffix = ip.rsplit(".", 1)[1]
            pod = PodAddress(netns=f"{self.bridge}-{uid[:8]}", ip=ip, host_veth=f"{self.bridge}v{suffix}")
            await asyncio.to_thread(self._create, pod)
            self._pods[uid] = pod
            return pod

    def _create(self, pod: PodAddress) -> None:
        run_ip("netns", "delete", pod.netns, check=False)
        run_ip("link", "delete", pod.host_veth, check=False)
        run_ip("netns", "add", pod.netns)
        run_ip("link", "add", pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        run_ip("link", "set", pod.host_veth, "master", self.bridge, "up")
        run_ip("-n", pod.netns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
        run_ip("-n", pod.netns, "link", "set", "eth0", "up")
        run_ip("-n", pod.netns, "link", "set", "lo", "up")
        run_ip("-n", pod.netns, "route", "add", "default", "via", self.node_ip)

    async def remove_pod(self, uid: str) -> None:
        async with self._lock:
            pod = self._pods.pop(uid, None)
            if pod is None:
                return
            await asyncio.to_thread(run_ip, "netns", "delete", pod.netns, check=False)
            self._free.append(pod.ip)


# Loaded once in the parent: a forked child (with other threads in the parent) must not dlopen anything.
LIBC = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter_pod(netns: str, run_mounts: Mapping[str, str]) -> None:
    """In a freshly forked child, before exec: join the pod's network namespace, then a private mount
    namespace with a tmpfs on /run and `run_mounts` (container path under /run → host path) bind-mounted."""
    libc = LIBC
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    _check(libc.setns(fd, _CLONE_NEWNET), "setns")
    os.close(fd)
    _check(libc.unshare(_CLONE_NEWNS), "unshare")
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    # Sources may live under /run themselves: hold them open across the tmpfs that hides /run.
    sources = {target: os.open(source, os.O_PATH) for target, source in run_mounts.items()}
    _check(libc.mount(b"tmpfs", b"/run", b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=755"), "mount tmpfs /run")
    for target, source_fd in sorted(sources.items()):
        os.makedirs(target, exist_ok=True)
        _check(libc.mount(f"/proc/self/fd/{source_fd}".encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
               f"bind mount {target}")
        os.close(source_fd)


def under_run(path: str) -> str | None:
    """`path` as a path below /run if it is one (/var/run is /run), else None."""
    normal = os.path.normpath(path)
    for prefix in ("/var/run", "/run"):
        if normal == prefix or normal.startswith(prefix + "/"):
            return "/run" + normal[len(prefix):]
    return None


# ------------------------------------------------------------------------------------------ host-side services


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def splice(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    try:
        await asyncio.gather(_pipe(client[0], upstream[1]), _pipe(upstream[0], client[1]))
    finally:
        for writer in (upstream[1], client[1]):
            writer.close()


class _Listener:
    """A TCP server on host:port whose connections `_serve` handles."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class Forwarder(_Listener):
    """Listens on host:port and splices every connection to target_host:target_port."""

    def __init__(self, host: str, port: int, target_host: str, target_port: int) -> None:
        super().__init__(host, port)
        self.target = (target_host, target_port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await splice((reader, writer), upstream)


class EgressProxy(_Listener):
    """A minimal HTTP proxy: `CONNECT host:port` tunnels, and absolute-URI requests (plain http) forwarded
    with `Connection: close`. The pods' only way off the pod network."""

    def __init__(self, host: str, port: int = PROXY_PORT) -> None:
        super().__init__(host, port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ", 2)
        except ValueError:
            writer.close()
            return
        if method.upper() == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = await self._connect(host.strip("[]"), int(port or 443), writer)
            if upstream is None:
                return
            writer.write(f"{version} 200 Connection established\r\n\r\n".encode())
            await writer.drain()
            await splice((reader, writer), upstream)
            return
        from urllib.parse import urlsplit

        url = urlsplit(target)
        if url.scheme != "http" or not url.hostname:
            writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            writer.close()
            return
        upstream = await self._connect(url.hostname, url.port or 80, writer)
        if upstream is None:
            return
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        headers = [h for h in lines[1:] if h and not h.lower().startswith(("proxy-", "connection:"))]
        request = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close", "", ""])
        upstream[1].write(request.encode("latin-1"))
        await splice((reader, writer), upstream)

    @staticmethod
    async def _connect(host: str, port: int, writer: asyncio.StreamWriter
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        except (OSError, TimeoutError) as exc:
            log.info("egress proxy: %s:%s: %s", host, port, exc)
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
            writer.close()
            return None
