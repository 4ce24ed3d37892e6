"""The objects of a server split over RPC workers (spec.distributed, docs/distributed.md): the workers' StatefulSet
of ggml-rpc-server pods, their headless Service, the NetworkPolicy that lets only the leader reach them, and the
leader's arguments that name them.

ggml-rpc-server has no authentication and serves one client at a time (upstream: "never run the RPC server on an
open network"). So the workers get no Service a client could use (headless, for stable names only), a
NetworkPolicy admitting the leader's pods alone on the RPC port whatever the installation's settings, and no
probe: its listen backlog is 1 and it accepts the next connection only when the leader's ends, so a kubelet TCP
probe would fill the backlog while the leader is connected and mark a working worker unready. A worker is
therefore ready when its process runs; the leader notices a lost worker on its next call (llama.cpp aborts).
"""

from __future__ import annotations

import math
from typing import Any

from ..api.v1beta1 import LlamaServer
from ..config import Settings
from ..contract import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    RPC_PORT,
    RPC_WORKER_CONTAINER,
    RPC_WORKER_NAME,
    SERVER_LABEL,
)
from ..fit.split import Placement
from .objects import object_meta, selector_labels
from .quantity import parse_quantity
from .resources import GPU_RESOURCES, pod_tolerations
from .security import container_security_context, pod_security_context

WORKER_GRACE_SECONDS = 10
"""A worker has nothing to drain: the leader it serves stops first or has already lost it."""
DNS_LABEL_MAX = 63


def workers_name(server: LlamaServer) -> str:
    """The workers' StatefulSet and headless Service."""
    return f"{server.metadata.name}-workers"


def worker_selector(server_name: str) -> dict[str, str]:
    return {NAME_LABEL: RPC_WORKER_NAME, SERVER_LABEL: server_name}


def worker_labels(server: LlamaServer) -> dict[str, str]:
    return {**worker_selector(server.metadata.name), "app.kubernetes.io/instance": server.metadata.name,
            "app.kubernetes.io/component": "rpc-worker", MANAGED_BY_LABEL: MANAGED_BY}


def worker_pod_names(server: LlamaServer) -> list[str]:
    assert server.spec.distributed is not None
    return [f"{workers_name(server)}-{index}" for index in range(server.spec.distributed.workers)]


def worker_addresses(server: LlamaServer) -> list[str]:
    """host:port of each worker, in --rpc order: the StatefulSet pod's stable name under the headless Service."""
    service, namespace = workers_name(server), server.metadata.namespace
    return [f"{pod}.{service}.{namespace}.svc:{RPC_PORT}" for pod in worker_pod_names(server)]


def name_problem(server: LlamaServer) -> str | None:
    """Why the server's name cannot name its workers (a pod's hostname is one DNS label), else None."""
    longest = worker_pod_names(server)[-1]
    if len(longest) > DNS_LABEL_MAX:
        return (f"the workers' pod names ({longest}) would be longer than {DNS_LABEL_MAX} characters: give the "
                f"LlamaServer a name of at most {DNS_LABEL_MAX - len(longest) + len(server.metadata.name)}")
    return None


def leader_args(server: LlamaServer, placement: Placement) -> list[str]:
    """What the leader's llama-server adds to its arguments: the workers, and the layers each gets. `--fit off`:
    a worker reports its node's whole memory as free, not its limit, so llama.cpp's own fitting would size the
    context to the node (it keeps explicit -ngl and --tensor-split, measured; tests/runtime/test_rpc.py)."""
    return ["--rpc", ",".join(worker_addresses(server)), "--n-gpu-layers", str(placement.gpu_layers),
            "--tensor-split", placement.tensor_split(), "--fit", "off"]


def _threads(cpu: str | None) -> list[str]:
    # ggml-rpc-server starts a thread per hardware thread of the node: far too many inside a small CPU limit.
    return ["--threads", str(max(1, math.ceil(parse_quantity(cpu))))] if cpu else []


def _resources(server: LlamaServer) -> dict[str, Any]:
    spec = server.spec.distributed
    assert spec is not None
    amounts: dict[str, Any] = {"memory": spec.memory, **({"cpu": spec.cpu} if spec.cpu else {})}
    limits = dict(amounts)
    if spec.gpu is not None:
        limits[GPU_RESOURCES[spec.gpu.vendor]] = 1
    return {"requests": amounts, "limits": limits}


def _affinity(server: LlamaServer) -> dict[str, Any] | None:
    spec = server.spec.distributed
    assert spec is not None
    if not spec.one_per_node:
        return server.spec.affinity.to_wire() if server.spec.affinity else None
    affinity = server.spec.affinity.to_wire() if server.spec.affinity else {}
    anti = dict(affinity.get("podAntiAffinity") or {})
    anti["requiredDuringSchedulingIgnoredDuringExecution"] = [
        *(anti.get("requiredDuringSchedulingIgnoredDuringExecution") or []),
        {"labelSelector": {"matchLabels": worker_selector(server.metadata.name)},
         "topologyKey": "kubernetes.io/hostname"}]
    return {**affinity, "podAntiAffinity": anti}


def build_workers_statefulset(server: LlamaServer, image: str, settings: Settings) -> dict[str, Any]:
    """The workers: ggml-rpc-server from `image` (one built with GGML_RPC=ON), listening on RPC_PORT."""
    spec = server.spec.distributed
    assert spec is not None
    container = {
        "name": RPC_WORKER_CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["/app/ggml-rpc-server"],
        "args": ["--host", "0.0.0.0", "--port", str(RPC_PORT), *_threads(spec.cpu)],
        "ports": [{"name": "rpc", "containerPort": RPC_PORT, "protocol": "TCP"}],
        "resources": _resources(server),
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "terminationGracePeriodSeconds": WORKER_GRACE_SECONDS,
    }
    optional = {
        "nodeSelector": server.spec.node_selector,
        "affinity": _affinity(server),
        # the workers' GPUs, not the leader's (spec.gpu is refused with distributed)
        "tolerations": pod_tolerations(server, spec.gpu.vendor if spec.gpu is not None else None) or None,
        "priorityClassName": server.spec.priority_class_name,
        "runtimeClassName": server.spec.runtime_class_name,
    }
    pod_spec.update({key: value for key, value in optional.items() if value})
    labels = worker_labels(server)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_meta(server, name=workers_name(server), labels=labels),
        "spec": {
            # A server scaled to zero stops its workers too: the group lives and dies together.
            "replicas": spec.workers if server.spec.replicas > 0 else 0,
            "serviceName": workers_name(server),
            # The leader needs every worker at once: start and replace them together, not one by one.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": worker_selector(server.metadata.name)},
            "template": {"metadata": {"labels": {**(server.spec.pod_labels or {}), **labels}}, "spec": pod_spec},
        },
    }


def build_workers_service(server: LlamaServer) -> dict[str, Any]:
    """Headless: stable DNS names for the leader's --rpc, no virtual IP for anyone else to use."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(server, name=workers_name(server), labels=worker_labels(server)),
        "spec": {
            "clusterIP": "None",
            # The names resolve while a worker starts: the operator, not DNS, decides when the leader may start.
            "publishNotReadyAddresses": True,
            "selector": worker_selector(server.metadata.name),
            "ports": [{"name": "rpc", "port": RPC_PORT, "targetPort": "rpc", "protocol": "TCP"}],
        },
    }


def build_workers_network_policy(server: LlamaServer) -> dict[str, Any]:
    """Only the leader's pods may connect to the workers, and only on the RPC port; made whatever the
    installation's NetworkPolicy settings, since the protocol has no authentication."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(server, name=workers_name(server), labels=worker_labels(server)),
        "spec": {
            "podSelector": {"matchLabels": worker_selector(server.metadata.name)},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": selector_labels(server.metadata.name)}}],
                "ports": [{"protocol": "TCP", "port": RPC_PORT}],
            }],
        },
    }
