"""The gateway process: the tables, their watches, the proxy, the autoscaler and the admin endpoints, wired.

Two listeners: the OpenAI API (`listen`, default :8080) and the admin port (`admin`, default :9090) with
`/metrics` (Prometheus), `/healthz` (the event loop answers), `/readyz` (the first lists of LlamaServers and
EndpointSlices arrived, so a request is never refused as unknown by a gateway that has not looked yet) and
`/drain` (the pod's preStop hook: waits `drain_delay` while the endpoint leaves the Service).

`static` routes (`--upstream NAME=URL`) need no cluster at all: the same proxy in front of fixed llama-server
URLs (the benchmark uses them, so does anyone trying the gateway without Kubernetes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from ..api.v1beta1 import API_VERSION, GROUP
from ..contract import PORT_NAME, SERVER_PODS_SELECTOR
from ..kube import ENDPOINT_SLICES, LLAMA_SERVERS, Kube, Permission
from ..kube.lease import LEASE_PERMISSION, LEASES, LeaseApi
from . import cors, metrics
from .autoscaler import Autoscaler
from .endpoints import EndpointTable
from .fastlane import Lane
from .hold import HoldQueue
from .lease import Coordination
from .listener import CappedSite, runner_settings
from .models_admin import ModelsAdmin
from .peers import FleetLoad, encode, report
from .proxy import Proxy
from .routing import RoutingTable
from .traffic import Traffic
from .watch import list_and_watch

log = logging.getLogger(__name__)

PERMISSIONS: tuple[Permission, ...] = (
    # The routing table: every LlamaServer's model name, alias, replicas, scaling and routing settings.
    Permission(GROUP, "llamaservers", frozenset({"list", "watch"})),
    # The autoscaler: spec.replicas through the scale subresource (never the whole object) ...
    Permission(GROUP, "llamaservers/scale", frozenset({"patch"})),
    # ... and its view in status.autoscaling (a merge patch of that one key).
    Permission(GROUP, "llamaservers/status", frozenset({"patch"})),
    # Ready replicas, from the slices the EndpointSlice controller writes for the operator's Services.
    Permission("discovery.k8s.io", "endpointslices", frozenset({"list", "watch"})),
)
"""Everything the gateway asks of the API server in the namespaces it serves; the chart's RBAC is checked against it."""

LEASE_PERMISSIONS: tuple[Permission, ...] = (
    # Several replicas (lease.py), in the release namespace only: the election's verbs for the decider's Lease and
    # this replica's own; delete: its own on a graceful stop, and the leader deletes those of replicas long gone;
    # list and watch: every replica's report.
    Permission(LEASE_PERMISSION.api_group, LEASE_PERMISSION.resource,
               LEASE_PERMISSION.verbs | {"delete", "list", "watch"}),
)

FIELD_MANAGER = "llama-gateway"
"""The EndpointSlice controller copies the Service's labels onto its slices: only LlamaServer Services' slices."""


WRITES = frozenset({"llamaservers/scale", "llamaservers/status"})


def required_permissions(*, autoscale: bool = True) -> tuple[Permission, ...]:
    """What the gateway calls; without the autoscaler it only reads."""
    return tuple(p for p in PERMISSIONS if autoscale or p.resource not in WRITES)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text or "0.0.0.0", default_port
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class GatewayConfig:
    listen: str = "0.0.0.0:8080"
    admin: str = "0.0.0.0:9090"
    namespaces: tuple[str, ...] = ()
    """Watched namespaces; empty: all (cluster mode)."""
    hold_timeout: float = 120.0
    hold_queue: int = 100
    max_request_bytes: int = 32 << 20
    max_buffered_bytes: int = 256 << 20
    """Request bodies held at once, all requests together (body.py)."""
    header_timeout: float = 30.0
    """Seconds for a request's headers to arrive, from connecting or from the previous answer (listener.py)."""
    body_timeout: float = 60.0
    """Seconds for a request's body to arrive (body.py)."""
    max_connections: int = 1024
    """Open client connections of the OpenAI API; more are answered 503 and closed."""
    fast_lane: bool = True
    """Plain requests proxied at the socket (fastlane.py); False: every request through aiohttp."""
    cors_origins: tuple[str, ...] = ()
    """Origins browsers may call from (cors.py); empty: no CORS header at all."""
    connect_timeout: float = 5.0
    autoscale: bool = True
    autoscale_interval: float = 1.0
    retry_after: int = 5
    static: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """model name -> replica base URLs (no Kubernetes)."""
    drain_delay: float = 5.0
    """Seconds `/drain` (the pod's preStop) waits, serving as usual, while its endpoint leaves the Service."""
    drain_timeout: float = 60.0
    """On SIGTERM: seconds streams in flight may take to finish after the listener closed; then they are cut."""
    lease_namespace: str = ""
    """Where the replicas' Leases live (the release namespace); empty: a lone gateway, its own decider."""
    lease_name: str = "llama-gateway"
    identity: str = ""
    """This replica's name among its peers (the pod's name); empty: the host name."""
    admin_token: bytes | None = field(default=None, repr=False)
    """The admin API's bearer token (models_admin.py, from --admin-token-file); None: no admin API."""

    def __post_init__(self) -> None:
        if self.max_request_bytes > self.max_buffered_bytes:
            raise ValueError(f"--max-request-bytes ({self.max_request_bytes}) is larger than --max-buffered-bytes "
                             f"({self.max_buffered_bytes}): no such request could ever be read")


def static_bodies(static: Mapping[str, Sequence[str]]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """LlamaServer-like and EndpointSlice-like objects for fixed upstreams (namespace `static`)."""
    servers, slices = [], []
    for name, urls in static.items():
        servers.append({"apiVersion": API_VERSION, "kind": "LlamaServer",
                        "metadata": {"namespace": "static", "name": name},
                        "spec": {"modelRef": {"name": name}, "replicas": len(urls)}})
        for index, url in enumerate(urls):
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname or not parts.port:
                raise ValueError(f"--upstream {name}={url}: give http://host:port")
            slices.append({"metadata": {"namespace": "static", "name": f"{name}-{index}",
                                        "labels": {"kubernetes.io/service-name": name}},
                           "ports": [{"name": PORT_NAME, "port": parts.port}],
                           "endpoints": [{"addresses": [parts.hostname], "conditions": {"ready": True}}]})
    return servers, slices


class Gateway:
    def __init__(self, config: GatewayConfig, kube: Kube | None) -> None:
        self.config = config
        self.kube = kube
        self.routes = RoutingTable()
        self.traffic = Traffic()
        self.hold = HoldQueue(timeout=config.hold_timeout, limit=config.hold_queue)
        self.endpoints = EndpointTable(on_change=self._endpoints_changed)
        self.coordination: Coordination | None = None
        load: Traffic | FleetLoad = self.traffic
        if config.autoscale and kube is not None and config.lease_namespace:
            self.coordination = Coordination(
                LeaseApi(kube.api_client, config.lease_namespace), config.lease_name,
                config.identity or socket.gethostname(), lambda: encode(report(self.traffic, self.routes)),
                on_held=lambda: self.autoscaler.kick())
            load = FleetLoad(self.traffic, self.coordination.peers)
        election = self.coordination.election if self.coordination else None
        self.autoscaler = Autoscaler(kube if config.autoscale else None, self.routes, load,
                                     interval=config.autoscale_interval,
                                     leading=(lambda: election.leading) if election else (lambda: True))
        self.proxy = Proxy(self.routes, self.endpoints, self.traffic, self.hold, kick=self._held,
                           max_request_bytes=config.max_request_bytes,
                           max_buffered_bytes=config.max_buffered_bytes, body_timeout=config.body_timeout,
                           connect_timeout=config.connect_timeout, retry_after=config.retry_after)
        self._synced: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._runners: list[web.AppRunner] = []
        self.lane: Lane | None = None
        self.api_port: int | None = None
        self.admin_port: int | None = None

    def _held(self) -> None:
        """A request starts to wait: the decider looks at once, and a replica that is not it tells it at once."""
        self.autoscaler.kick()
        if self.coordination is not None:
            self.coordination.publisher.kick()

    def _endpoints_changed(self, namespace: str, service: str) -> None:
        key = f"{namespace}/{service}"
        metrics.READY_ENDPOINTS.labels(key).set(len(self.endpoints.ready(namespace, service)))
        self.hold.notify(key)

    @property
    def ready(self) -> bool:
        return all(event.is_set() for event in self._synced)

    def _admin_app(self) -> web.Application:
        async def metrics_handler(_: web.Request) -> web.Response:
            return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def readyz(_: web.Request) -> web.Response:
            return web.Response(text="ok") if self.ready else web.Response(status=503, text="not synced yet")

        async def drain(_: web.Request) -> web.Response:
            # The preStop hook: the pod is terminating, so its endpoint is leaving the Service; keep serving
            # whatever still arrives until the proxies in front (kube-proxy) have caught up, then SIGTERM comes.
            await asyncio.sleep(self.config.drain_delay)
            return web.Response(text="drained")

        app = web.Application()
        if self.config.admin_token is not None:
            ModelsAdmin(self.routes, self.endpoints, self.proxy.upstreams, self.config.admin_token).register(app)
        app.router.add_get("/metrics", metrics_handler)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/drain", drain)
        return app

    def _start_watches(self) -> None:
        assert self.kube is not None
        for namespace in self.config.namespaces or (None,):
            servers, slices = asyncio.Event(), asyncio.Event()
            self._synced += [servers, slices]
            self._tasks.append(asyncio.create_task(list_and_watch(
                self.kube, LLAMA_SERVERS, namespace, replace=self.routes.replace, upsert=self.routes.upsert,
                remove=lambda body: self.routes.remove(body["metadata"]["namespace"], body["metadata"]["name"]),
                synced=servers)))
            self._tasks.append(asyncio.create_task(list_and_watch(
                self.kube, ENDPOINT_SLICES, namespace, replace=self.endpoints.replace, upsert=self.endpoints.upsert,
                remove=self.endpoints.remove, synced=slices, label_selector=SERVER_PODS_SELECTOR)))

    def _start_coordination(self, coordination: Coordination) -> None:
        assert self.kube is not None
        peers = coordination.peers
        self._tasks += [asyncio.create_task(coordination.election.run()),
                        asyncio.create_task(coordination.publisher.run()),
                        asyncio.create_task(coordination.forget_dead()),
                        asyncio.create_task(list_and_watch(
                            self.kube, LEASES, coordination.api.namespace, replace=peers.replace,
                            upsert=peers.upsert, remove=peers.remove, synced=asyncio.Event(),
                            label_selector=coordination.selector))]

    async def start(self) -> None:
        if self.config.static:
            servers, slices = static_bodies(self.config.static)
            self.routes.replace(servers, None)
            self.endpoints.replace(slices, None)
        if self.kube is not None:
            self._start_watches()
        if self.config.autoscale and self.kube is not None:
            self._tasks.append(asyncio.create_task(self.autoscaler.run()))
        if self.coordination is not None:
            self._start_coordination(self.coordination)
        api = self.proxy.app()
        if self.config.cors_origins:
            cors.enable(api, self.config.cors_origins)
        runner = web.AppRunner(api, **runner_settings(self.config.header_timeout),
                               shutdown_timeout=self.config.drain_timeout)
        await runner.setup()
        self._runners.append(runner)
        host, port = _host_port(self.config.listen, 0)
        if self.config.fast_lane:
            self.lane = Lane(self.proxy, header_timeout=self.config.header_timeout)
        site: web.TCPSite = CappedSite(runner, host, port, limit=self.config.max_connections, lane=self.lane)
        await site.start()
        self.api_port = site.port
        # The admin port gets the header deadline too (its clients are Prometheus and the kubelet's probes).
        runner = web.AppRunner(self._admin_app(), access_log=None, keepalive_timeout=self.config.header_timeout)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, *_host_port(self.config.admin, 0))
        await site.start()
        self.admin_port = site.port
        # What was made until now (modules, the tables, the clients) lives as long as the process: out of the
        # collector's generations, a full collection walks only what requests make (its pauses were the p99).
        gc.freeze()
        log.info("Gateway listening: OpenAI API on %s (port %s), metrics on %s (port %s); watching %s",
                 self.config.listen, self.api_port, self.config.admin, self.admin_port,
                 ", ".join(self.config.namespaces) or ("all namespaces" if self.kube else "static upstreams"))

    async def wait_synced(self) -> None:
        await asyncio.gather(*(event.wait() for event in self._synced))

    async def stop(self) -> None:
        """Close the API listener and let the streams in flight finish (at most drain_timeout) while this replica
        still counts, reports and decides; then give up the Lease and the report, and stop the rest."""
        api, others = self._runners[:1], self._runners[1:]
        lane = [self.lane.drain(self.config.drain_timeout)] if self.lane is not None else []
        await asyncio.gather(*(runner.cleanup() for runner in api), *lane)
        if self.coordination is not None:
            await self.coordination.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for runner in reversed(others):
            await runner.cleanup()


async def serve(config: GatewayConfig, kube: Kube | None) -> None:
    gateway = Gateway(config, kube)
    await gateway.start()
    stopping = asyncio.Event()
    # SIGTERM (a rollout, a drain, a scale-down) stops gracefully (`Gateway.stop`): streams in flight finish, then
    # the autoscaler's Lease and this replica's report are given up, so another replica decides within a period.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    try:
        await stopping.wait()
    finally:
        await gateway.stop()
