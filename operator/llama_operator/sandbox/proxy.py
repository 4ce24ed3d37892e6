"""The Services' host ports: one local TCP listener per Service port, round-robin over the ready endpoints, so a
browser or curl on this machine reaches a Service (kube-proxy serves the ClusterIPs inside the cluster).

`ServiceProxies` watches Services and the EndpointSlices the real EndpointSlice controller writes, and keeps
one `ServiceProxy` (a 127.0.0.1 listener) per TCP Service port, forwarding to the ready endpoints (pod addresses
on the nodes' bridges, which this machine routes to).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

from .client import Api, Informer

log = logging.getLogger("llama_operator.sandbox")

HOST = "127.0.0.1"
PORT_SEARCH = 200
SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Copy until end of stream, passed on as a half-close: True; False when a side failed (reset, unreachable)."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return True
    except (ConnectionError, OSError):
        return False


async def splice(client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy both ways until both sides are done (half-close passed on), then close both. A side that fails ends
    both at once: a pod killed with data unread resets its connections, and the client, whose own side stays open
    while it waits for an answer, must see its connection cut, not wait for nothing until its timeout."""
    pipes = [asyncio.ensure_future(_pipe(client[0], upstream[1])),
             asyncio.ensure_future(_pipe(upstream[0], client[1]))]
    try:
        pending: set[asyncio.Future[bool]] = set(pipes)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not all(task.result() for task in done):
                break
    finally:
        for task in pipes:
            task.cancel()
        for writer in (upstream[1], client[1]):
            writer.close()


class ServiceProxy:
    """Listens on 127.0.0.1:<port> and forwards each connection to one of `targets` (ip, port)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.targets: list[tuple[str, int]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._turn = itertools.count()
        self._connections: set[asyncio.Task[None]] = set()

    async def listen(self, base: int) -> None:
        """The first free port from `base` up (a fixed base keeps URLs stable across runs); 0 = any port."""
        candidates = [0] if base == 0 else [*range(base, base + PORT_SEARCH), 0]
        for port in candidates:
            try:
                self._server = await asyncio.start_server(self._serve, HOST, port)
            except OSError:
                continue
            self.port = int(self._server.sockets[0].getsockname()[1])
            return

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            targets = list(self.targets)
            upstream = None
            # Like kube-proxy: a connection to a Service with no ready pod is refused (closed at once).
            for _ in range(len(targets)):
                host, port = targets[next(self._turn) % len(targets)]
                try:
                    upstream = await asyncio.open_connection(host, port)
                    break
                except OSError:
                    continue
            if upstream is None:
                return
            await splice((client_reader, client_writer), upstream)
        finally:
            client_writer.close()
            self._connections.discard(task)


class ServiceProxies:
    """A local port per Service port, forwarding to the Service's ready endpoints (from EndpointSlices)."""

    def __init__(self, api: Api, *, port_base: int, quiet_namespaces: tuple[str, ...],
                 on_service: Callable[[str, int, int | None], None]) -> None:
        self.api = api
        self.port_base = port_base
        self.quiet_namespaces = (*SYSTEM_NAMESPACES, *quiet_namespaces)
        self.on_service = on_service
        self._wake = asyncio.Event()
        self.services = Informer(api, "v1", "services", self._wake.set)
        self.slices = Informer(api, "discovery.k8s.io/v1", "endpointslices", self._wake.set)
        self.proxies: dict[tuple[str, str, int], ServiceProxy] = {}

    async def run(self) -> None:
        tasks = [asyncio.create_task(i.run()) for i in (self.services, self.slices)]
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._sync()
        finally:
            for task in tasks:
                task.cancel()

    async def close(self) -> None:
        for proxy in self.proxies.values():
            await proxy.close()

    def targets(self, service: dict[str, Any], port: dict[str, Any]) -> list[tuple[str, int]]:
        meta = service["metadata"]
        name = port.get("name") or ""
        found = []
        for slice_ in self.slices.values():
            smeta = slice_["metadata"]
            if smeta.get("namespace") != meta["namespace"] or \
                    (smeta.get("labels") or {}).get("kubernetes.io/service-name") != meta["name"]:
                continue
            numbers = [p.get("port") for p in slice_.get("ports") or [] if (p.get("name") or "") == name]
            if not numbers or numbers[0] is None:
                continue
            for endpoint in slice_.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                found += [(address, int(numbers[0])) for address in endpoint.get("addresses") or []]
        return sorted(found)

    async def _sync(self) -> None:
        seen: set[tuple[str, str, int]] = set()
        for service in self.services.values():
            meta, spec = service["metadata"], service.get("spec") or {}
            # The cluster's own Services (kube-dns ...) are for pods, not for a browser on this machine.
            if (meta["namespace"], meta["name"]) == ("default", "kubernetes") or spec.get("type") == "ExternalName" \
                    or spec.get("clusterIP") == "None" or meta["namespace"] in SYSTEM_NAMESPACES:
                continue
            for port in spec.get("ports") or []:
                if port.get("protocol", "TCP") != "TCP":
                    continue
                key = (meta["namespace"], meta["name"], int(port["port"]))
                seen.add(key)
                proxy = self.proxies.get(key)
                if proxy is None:
                    proxy = ServiceProxy(f"{meta['namespace']}/{meta['name']}:{port['port']}")
                    await proxy.listen(0 if meta["namespace"] in self.quiet_namespaces else self.port_base)
                    self.proxies[key] = proxy
                    self.on_service(f"{meta['namespace']}/{meta['name']}", int(port["port"]), proxy.port)
                proxy.targets = self.targets(service, port)
        for key in [k for k in self.proxies if k not in seen]:
            await self.proxies.pop(key).close()
            self.on_service(f"{key[0]}/{key[1]}", key[2], None)
