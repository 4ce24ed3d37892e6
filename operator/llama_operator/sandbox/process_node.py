"""The sandbox's process node (`--nodes process`): one Node `sandbox` whose pods' containers are local processes
in network namespaces (kubelet.py over pod.py ... processes.py), with the pod network's host side (network.py:
bridge, API server forwarder, egress proxy), the kubelet's HTTPS port (logs.py) and the local-path provisioner.

It runs no image, enforces no security context, no memory limit and no NetworkPolicy: real nodes
(real_nodes.py, llama_operator.nodes) do. It stays for the e2e tests that have not moved to real nodes yet
(docs/sandbox.md says which, and why).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from ..controlplane import ControlPlane
from .client import Api, client_ssl_context
from .images import ImageTable
from .logs import KubeletServer
from .network import API_PORT, EgressProxy, Forwarder, PodNetwork
from .node import KUBELET_PORT, Kubelet
from .pod import NODE_NAME, NodeContext
from .storage import LocalPathProvisioner


class ProcessNode:
    """prepare() (host network, before the control plane) -> start(cluster, admin) -> run() ... shutdown() ->
    close() (safe after a partial start)."""

    def __init__(self, state_dir: Path, images: ImageTable) -> None:
        self.state_dir = state_dir
        self.images = images
        self.network = PodNetwork(state_dir)
        self.kubelet: Kubelet | None = None
        self.provisioner: LocalPathProvisioner | None = None
        self._services: list[Any] = []
        self._sessions = contextlib.AsyncExitStack()

    @property
    def address(self) -> str:
        """Where the API server listens: loopback (pods reach it through the node's forwarder)."""
        return "127.0.0.1"

    @property
    def serving_ips(self) -> list[str]:
        return [self.network.node_ip]

    @property
    def host_address(self) -> str:
        """Where pods reach this machine: loopback services are reached through the node's egress proxy."""
        return "127.0.0.1"

    def describe(self) -> str:
        return f"Node {NODE_NAME}: {self.network.node_ip} (pods on {self.network.cidr}, bridge {self.network.bridge})"

    async def prepare(self) -> None:
        await asyncio.to_thread(self.network.setup)

    async def start(self, cluster: ControlPlane, admin: Api) -> dict[str, Any]:
        """The node registered and serving; returns the chart values this node needs (none)."""
        network = self.network
        node_client = cluster.issue_cert("kubelet-client", common_name=f"system:node:{NODE_NAME}",
                                         organizations=["system:nodes"], client=True)
        node_serving = cluster.issue_cert("kubelet-serving", common_name=NODE_NAME, server=True,
                                          ip_addresses=[network.node_ip], dns_names=[NODE_NAME])
        forwarder = Forwarder(network.node_ip, API_PORT, "127.0.0.1", cluster.apiserver_port)
        egress = EgressProxy(network.node_ip)
        for service in (forwarder, egress):
            await service.start()
            self._services.append(service)
        node_api = await self._sessions.enter_async_context(
            Api(cluster.server, client_ssl_context(cluster.ca_cert, node_client.cert, node_client.key)))
        probes = await self._sessions.enter_async_context(aiohttp.ClientSession())
        version = (await admin.request("GET", "/version")).get("gitVersion", "")
        kubelet: Kubelet | None = None
        context = NodeContext(api=node_api, images=self.images, state_dir=self.state_dir, network=network,
                              node_ip=network.node_ip, api_port=API_PORT, proxy_url=egress.url,
                              record_event=lambda *a: kubelet.record_event(*a) if kubelet else None,
                              probe_session=probes)
        kubelet = self.kubelet = Kubelet(context, kubernetes_version=version)
        await kubelet.register()
        server = KubeletServer(network.node_ip, KUBELET_PORT, cert=node_serving.cert, key=node_serving.key,
                               client_ca=cluster.ca_cert, lookup=kubelet.runtime)
        await server.start()
        self._services.append(server)
        self.provisioner = LocalPathProvisioner(admin, self.state_dir)
        await self.provisioner.install()
        return {}

    def runners(self) -> dict[str, Coroutine[Any, Any, None]]:
        assert self.kubelet is not None and self.provisioner is not None
        return {"kubelet": self.kubelet.run(), "provisioner": self.provisioner.run()}

    async def shutdown(self) -> None:
        """Pods get SIGTERM and their grace period, then SIGKILL."""
        if self.kubelet is not None:
            await self.kubelet.shutdown()

    async def close(self) -> None:
        await self.shutdown()
        for service in self._services:
            with contextlib.suppress(Exception):
                await service.close()
        with contextlib.suppress(Exception):
            await self._sessions.aclose()
        await asyncio.to_thread(self.network.teardown)

    def emergency_stop(self) -> None:
        """A second Ctrl-C: the processes are being killed; remove the pod network now (synchronous)."""
        self.network.teardown()
