"""A distributed server's RPC workers as its reconcile reads and reports them (docs/distributed.md): which of them
run, the identity of their processes (what the leader's pod template records, so a worker that restarts rolls the
leader), and status.distributed.

A worker has no probe (builders/distributed.py says why): it counts as running when its container runs. A
worker's process that restarted, or a pod replaced by the StatefulSet, lost the layers the leader had sent it,
which the identity (pod uid and restart count) captures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..api.v1beta1 import DistributedStatus, LlamaServer, WorkerStatus
from ..builders.distributed import worker_addresses, worker_pod_names, worker_selector
from ..builders.objects import label_selector
from ..contract import RPC_WORKER_CONTAINER
from ..fit import request_quantity
from ..fit.split import Placement
from ..kube import PODS
from .context import Context

NO_RPC_HINT = ("the image has no /app/ggml-rpc-server: it is not built with GGML_RPC=ON (upstream's images are "
               "not; docs/distributed.md)")


@dataclass(frozen=True)
class Worker:
    """One expected worker as observed; `pod` None when its pod does not exist (yet)."""

    name: str
    pod: Mapping[str, Any] | None

    def _container(self) -> Mapping[str, Any]:
        statuses = ((self.pod or {}).get("status") or {}).get("containerStatuses") or []
        return next((c for c in statuses if c.get("name") == RPC_WORKER_CONTAINER), {})

    @property
    def running(self) -> bool:
        if self.pod is None or (self.pod.get("metadata") or {}).get("deletionTimestamp"):
            return False
        return "running" in (self._container().get("state") or {})

    @property
    def node(self) -> str | None:
        return ((self.pod or {}).get("spec") or {}).get("nodeName")

    @property
    def fingerprint(self) -> str:
        uid = ((self.pod or {}).get("metadata") or {}).get("uid", "")
        return f"{self.name}:{uid}:{self._container().get('restartCount', 0)}"

    def problem(self) -> str | None:
        """Why it does not run, in the words of the scheduler or the kubelet; None when it runs."""
        if self.running:
            return None
        if self.pod is None:
            return "no pod yet"
        if (self.pod.get("metadata") or {}).get("deletionTimestamp"):
            return "stopping"
        status = self.pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                return f"not scheduled: {cond.get('message') or cond.get('reason') or 'no node fits'}"
        state = self._container().get("state") or {}
        waiting = state.get("waiting") or state.get("terminated") or {}
        detail = str(waiting.get("message") or "")
        if "ggml-rpc-server" in detail and ("no such file" in detail or "not found" in detail):
            return NO_RPC_HINT
        reason = waiting.get("reason")
        if reason:
            return f"{reason}: {detail}" if detail else str(reason)
        return f"pod {status.get('phase') or 'Pending'}"


async def observe_workers(ctx: Context, server: LlamaServer) -> list[Worker]:
    """Each worker the spec asks for, in --rpc order, with its pod (from the watch; a LIST where none runs)."""
    namespace, name = server.metadata.namespace, server.metadata.name
    if ctx.watched.attached:
        pods = ctx.watched.worker_pods(namespace, name)
    else:
        pods = await ctx.kube.list(PODS, namespace, label_selector=label_selector(worker_selector(name)))
    by_name = {(pod.get("metadata") or {}).get("name"): pod for pod in pods}
    return [Worker(pod_name, by_name.get(pod_name)) for pod_name in worker_pod_names(server)]


def identity(workers: Sequence[Worker]) -> str | None:
    """The identity of the worker processes when every worker runs, else None (builders/plan.Workers)."""
    if not workers or not all(worker.running for worker in workers):
        return None
    digest = hashlib.sha256("\n".join(worker.fingerprint for worker in workers).encode())
    return digest.hexdigest()[:16]


def waiting_message(workers: Sequence[Worker]) -> str | None:
    """What the leader waits for, None when every worker runs."""
    down = [(worker.name, worker.problem()) for worker in workers if not worker.running]
    if not down:
        return None
    first, problem = down[0]
    more = f" (and {len(down) - 1} more)" if len(down) > 1 else ""
    return (f"waiting for the RPC workers: {len(workers) - len(down)}/{len(workers)} running; {first}: "
            f"{problem}{more}")


def distributed_status(server: LlamaServer, placement: Placement | None,
                       workers: Sequence[Worker]) -> DistributedStatus:
    addresses = worker_addresses(server)
    slots = placement.worker_slots if placement is not None else ()
    estimates = placement.workers if placement is not None else ()
    entries = [
        WorkerStatus(name=worker.name, address=addresses[index], node=worker.node, ready=worker.running,
                     layers=slots[index] if index < len(slots) else 0,
                     memory=request_quantity(estimates[index].total) if index < len(estimates) else None,
                     message=worker.problem())
        for index, worker in enumerate(workers)]
    return DistributedStatus(
        workers=entries, ready_workers=f"{sum(w.running for w in workers)}/{len(workers)}",
        gpu_layers=placement.gpu_layers if placement is not None else None,
        tensor_split=placement.tensor_split() if placement is not None else None)


def placement_note(placement: Placement, server: LlamaServer) -> str:
    """The workers' part of the Fits message: where the layers went and what each worker then holds."""
    spec = server.spec.distributed
    assert spec is not None
    memory = spec.gpu.memory if spec.gpu is not None else spec.memory
    held = ", ".join(request_quantity(worker.total) for worker in placement.workers)
    return (f"{placement.gpu_layers} layer slots over {len(placement.workers)} workers of {memory} "
            f"(--tensor-split {placement.tensor_split()}): {held}")
