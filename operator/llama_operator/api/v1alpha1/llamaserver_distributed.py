"""A LlamaServer split over llama.cpp RPC workers (spec.distributed), and what its status shows of them.

One model larger than a node: `ggml-rpc-server` workers lend their memory (and GPUs) over TCP, and the server's
one llama-server pod (the leader) offloads layers to them (`--rpc`, `--tensor-split` from the memory estimate).
Parts of LlamaServerSpec and LlamaServerStatus; docs/distributed.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import ApiModel, Quantity
from ..bounds import Message

WORKERS_MAX = 16
"""Workers of one server: every one is a device of the leader's split and a hop of each token's forward pass."""


class WorkerGpuSpec(ApiModel):
    """The GPU of each worker (one: each GPU would be a device of its own in the leader's split, so more GPUs are
    more workers): ggml-rpc-server then lends it instead of its CPU."""

    vendor: Literal["nvidia", "amd", "intel"] = Field(
        description="nvidia (nvidia.com/gpu), amd (amd.com/gpu) or intel (gpu.intel.com/i915).")
    memory: Quantity = Field(description="Memory of the GPU (e.g. 24Gi): what the layer placement fills.")


class DistributedSpec(ApiModel):
    """Workers that hold part of the model's layers: a StatefulSet of ggml-rpc-server pods the operator makes
    beside the server's one llama-server pod, which starts once every worker is ready (docs/distributed.md)."""

    workers: int = Field(ge=1, le=WORKERS_MAX, description="Number of ggml-rpc-server workers.")
    memory: Quantity = Field(
        description="Memory of each worker (its container's request and limit): the layers placed on a CPU "
        "worker, their KV cache and its compute buffer fit in it.")
    cpu: Quantity | None = Field(
        None, description="CPU of each worker (request and limit); its threads follow it. Default: no limit.")
    gpu: WorkerGpuSpec | None = Field(None, description="GPUs of each worker; absent: the worker lends its CPU.")
    one_per_node: bool = Field(
        True, description="Each worker on a different node (required pod anti-affinity): the point of a split "
        "is memory that one node lacks. false lets workers share a node.")


class WorkerStatus(ApiModel):
    """One worker of a distributed server."""

    name: str = Field(description="The worker's pod.")
    address: str = Field(description="Its RPC address, host:port, as the leader's --rpc names it.")
    node: str | None = Field(None, description="The node it runs on.")
    ready: bool = Field(False, description="Its ggml-rpc-server accepts connections.")
    layers: int = Field(0, description="Layer slots placed on it (blocks, and the output head on the last).")
    memory: str | None = Field(None, description="What the placement puts on it (weights, KV cache, compute).")
    message: Message | None = Field(None, description="Why it is not ready, when it is not.")


class DistributedStatus(ApiModel):
    """Where the layers are and which workers hold them."""

    workers: list[WorkerStatus] = Field(default_factory=list, max_length=WORKERS_MAX,
                                        description="Each worker, in --rpc order.")
    ready_workers: str | None = Field(None, description="ready/total workers, for kubectl get.")
    gpu_layers: int | None = Field(None, description="Layer slots offloaded to the workers (-ngl).")
    tensor_split: str | None = Field(
        None, description="Slots per worker (--tensor-split); the leader keeps the first blocks, those not offloaded.")
