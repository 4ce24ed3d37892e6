"""The sandbox on real nodes (`--nodes N`, the default): N kubelets with containerd each, kube-proxy, CoreDNS and a
local registry holding the images built from this repo (llama_operator.nodes, `make node-kit`, `make images`).

Pods are containers: the operator runs from the Dockerfile's image as 65532 on a read-only root filesystem,
llama-server from a llama.cpp-layout image of the pinned build; limits are cgroups, Services are ClusterIPs, names
resolve through CoreDNS. The sandbox adds only what a cluster's storage would: the local-path provisioner
(storage.py), and the host ports of Services (proxy.py) so a browser or curl on this machine reaches them.
Pods reach this machine at `host_address` (not its loopback): a model mirror for pods listens there.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from ..controlplane import ControlPlane
from ..nodes.cluster import RealNodes
from ..nodes.kit import cache_root, find_kit
from ..nodes.processes import NodesError
from .client import Api
from .storage import LocalPathProvisioner

OPERATOR_IMAGE, LLAMA_SERVER_IMAGE = "operator", "llama-server"
IMAGES_ENV = "LLAMA_OPERATOR_IMAGES_DIR"


def find_images(directory: str | None = None) -> Path:
    """The images built from this checkout: `directory`, else $LLAMA_OPERATOR_IMAGES_DIR, else the newest
    `make images` build in the cache."""
    chosen = directory or os.environ.get(IMAGES_ENV)
    if not chosen:
        builds = [p for p in cache_root().glob("images-*") if (p / "images.json").is_file()]
        newest = max(builds, key=lambda p: p.stat().st_mtime, default=None)
        if newest is None:
            raise NodesError(f"no images: ${IMAGES_ENV} is not set and {cache_root()} holds no `make images` "
                             "build; `make images` builds them")
        return newest
    if not (Path(chosen) / "images.json").is_file():
        raise NodesError(f"{chosen} has no images.json: `make images` builds the images")
    return Path(chosen)


def chart_values(refs: dict[str, str], *, network_policies: bool = False,
                 node_addresses: list[str] | None = None) -> dict[str, Any]:
    """The chart values that make the operator and llama-server run from the registry's images; with
    `network_policies`, every policy of the chart on, the webhook admitted only from the nodes' addresses (where
    the API server's calls come from here, as docs/security.md tells a cluster to list it)."""
    repository, _, tag = refs[OPERATOR_IMAGE].rpartition(":")
    values: dict[str, Any] = {"image": {"repository": repository, "tag": tag},
                              "llamaServerImages": {"cpu": refs[LLAMA_SERVER_IMAGE]},
                              # the image scripts/build-images.sh makes carries ggml-rpc-server (docs/distributed.md)
                              "rpcImages": {"cpu": refs[LLAMA_SERVER_IMAGE]}}
    if network_policies:
        values["networkPolicy"] = {
            "operator": {"webhookFrom": [{"ipBlock": {"cidr": f"{ip}/32"}} for ip in node_addresses or []]},
            "llamaServers": {"enabled": True}}
    return values


def operator_env(refs: dict[str, str]) -> dict[str, str]:
    """What the chart values of chart_values() set, as the operator's environment (`--operator local`): the
    llama-server image (with RPC too) and the fetcher image (the operator's own) from the registry."""
    server = refs[LLAMA_SERVER_IMAGE]
    return {"LLAMA_OPERATOR_IMAGE_CPU": server, "LLAMA_OPERATOR_RPC_IMAGE_CPU": server,
            "LLAMA_OPERATOR_FETCHER_IMAGE": refs[OPERATOR_IMAGE]}


class RealNodeSet:
    """prepare() (host side, before the control plane) -> start(cluster, admin) -> runners() ... shutdown() ->
    close() (safe after a partial start)."""

    def __init__(self, state_dir: Path, count: int, *, kit_dir: str | None = None,
                 images_dir: str | None = None, network_policies: bool = False) -> None:
        self.state_dir = state_dir
        self.network_policies = network_policies
        self.nodes = RealNodes(state_dir / "nodes", find_kit(kit_dir), count=count,
                               images_dir=find_images(images_dir), network_policies=network_policies)
        self.provisioner: LocalPathProvisioner | None = None

    @property
    def address(self) -> str:
        """The API server listens on the host address: pods reach it through the `kubernetes` Service."""
        return self.nodes.host_address

    @property
    def host_address(self) -> str:
        return self.nodes.host_address

    def describe(self) -> str:
        names = ", ".join(self.nodes.node_names)
        timings = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.nodes.timings.items())
        return (f"Nodes {names}: kubelet + containerd each, kube-proxy, CoreDNS; images from the registry "
                f"{self.registry}; pods reach this machine at {self.host_address} ({timings})")

    @property
    def registry(self) -> str:
        return self.nodes.registry.host if self.nodes.registry is not None else ""

    async def prepare(self) -> None:
        await asyncio.to_thread(self.nodes.prepare)

    async def start(self, cluster: ControlPlane, admin: Api) -> dict[str, Any]:
        await asyncio.to_thread(self.nodes.start, cluster)
        (self.state_dir / "nodes.json").write_text(json.dumps({
            "hostAddress": self.host_address, "registry": self.registry, "nodes": self.nodes.node_names,
            "images": self.nodes.image_refs}, indent=2) + "\n")
        self.provisioner = LocalPathProvisioner(admin, self.state_dir)
        await self.provisioner.install()
        return chart_values(self.nodes.image_refs, network_policies=self.network_policies,
                            node_addresses=[self.host_address, *(node.address for node in self.nodes.nodes)])

    def operator_env(self) -> dict[str, str]:
        """`--operator local`: the registry's images for the operator process (after start())."""
        return operator_env(self.nodes.image_refs)

    def runners(self) -> dict[str, Coroutine[Any, Any, None]]:
        assert self.provisioner is not None
        return {"provisioner": self.provisioner.run()}

    async def close(self) -> None:
        await asyncio.to_thread(self.nodes.stop)

    def emergency_stop(self) -> None:
        self.nodes.stop()
