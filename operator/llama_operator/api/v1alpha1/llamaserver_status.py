"""LlamaServer status: phase, replicas, the memory estimate, download progress, router models, autoscaling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import ApiModel
from ..bounds import Message
from .llamaserver_distributed import DistributedStatus
from .shared_types import Condition

ServerPhase = Literal["Pending", "Downloading", "Loading", "Ready", "Degraded", "Failed"]


class MemoryEstimate(ApiModel):
    """Memory one replica needs, estimated from the model's GGUF header and the server's settings."""

    host: str = Field(description="Host memory of the llama-server container (what resources.limits.memory "
                      "must hold), e.g. 1536Mi.")
    gpu: str | None = Field(None, description="VRAM per GPU (the largest share), when gpu is set.")
    weights: str = Field(description="Model weights, over all devices.")
    kv_cache: str = Field(description="KV cache and recurrent state, over all devices.")
    compute: str = Field(description="Compute buffers, over all devices.")
    overhead: str = Field(description="Process, tokenizer and GPU driver overhead.")
    context_size: int = Field(description="KV cells allocated for all slots together (llama.cpp rounds up).")
    context_per_slot: int = Field(description="Tokens one request can use.")
    slots: int = Field(description="Parallel request slots.")
    prompt_cache_max: str | None = Field(
        None, description="Host memory the prompt cache (--cache-ram) may add over time; 'unbounded' for -1."
    )
    checkpoints_max: str | None = Field(
        None, description="Host memory more context checkpoints (--ctx-checkpoints per slot; sliding-window and "
        "recurrent models) may add over time."
    )


class AutoscalingStatus(ApiModel):
    """The gateway autoscaler's view of this server (written by the gateway only)."""

    load: float | None = Field(None, description="Mean in-flight plus held requests over the window.")
    in_flight: int | None = Field(None, description="Requests in flight through the gateway right now.")
    queued: int | None = Field(None, description="Requests held by the gateway waiting for a ready replica.")
    desired_replicas: int | None = Field(None, description="Replicas the autoscaler wants.")
    last_scale_time: str | None = Field(None, description="When spec.replicas last changed (RFC 3339).")
    reason: str | None = Field(None, description="Why, in one CamelCase word (ScaleFromZero, LoadAboveTarget, ...).")
    message: Message | None = Field(None, description="Why, for people.")
    updated_time: str | None = Field(None, description="When the gateway wrote this view (RFC 3339).")


ModelState = Literal["Loaded", "Loading", "Sleeping", "Unloaded", "Failed"]


class ServedModelStatus(ApiModel):
    """One model of a router-mode server, as its pods' llama-server report it (GET /models)."""

    name: str = Field(description="The served name (alias, else the LlamaModel name).")
    model: str = Field(description="The LlamaModel.")
    state: ModelState = Field(
        description="Loaded (ready on at least one pod), Loading, Sleeping (idle: weights freed, loads again on "
        "the next request), Failed (its instance exited while loading; the message says where) or Unloaded.")
    loaded_replicas: int = Field(0, description="Pods on which it is loaded now.")
    estimate: str | None = Field(
        None, description="Host memory its instance needs, estimated from its GGUF header and settings (e.g. "
        "512Mi); what the gateway adds up against the memory budget (docs/multi-model.md).")
    message: Message | None = Field(None, description="Why it failed, when it did.")


class DownloadStatus(ApiModel):
    """A running model download, from the fetcher's newest progress line (the least advanced pod's)."""

    pod: str | None = Field(None, description="The pod whose fetcher this is.")
    file: str | None = Field(None, description="The file being downloaded.")
    bytes_done: int | None = Field(None, description="Bytes on disk so far.")
    bytes_total: int | None = Field(None, description="Size of the file in bytes.")
    percent: int | None = Field(None, description="bytesDone / bytesTotal, in percent.")
    bytes_per_second: int | None = Field(None, description="Transfer rate over the last progress interval.")
    summary: str | None = Field(None, description="Percent, size and rate, for kubectl get.")


class LlamaServerStatus(ApiModel):
    """What the fleet is doing."""

    phase: ServerPhase | None = Field(None, description="Pending, Downloading, Loading, Ready, Degraded or Failed.")
    message: Message | None = Field(None, description="What is wrong or in progress, for people.")
    observed_generation: int | None = Field(None, description="The metadata.generation this status is for.")
    replicas: int | None = Field(None, description="Pods that exist.")
    ready_replicas: int | None = Field(None, description="Pods that answer /health.")
    ready: str | None = Field(None, description="ready/desired, for kubectl get.")
    selector: str | None = Field(None, description="Label selector of the pods (for the scale subresource).")
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL inside the cluster.")
    model_name: str | None = Field(None, description="Model name served by /v1/models.")
    args: list[str] | None = Field(None, description="The llama-server arguments in use.")
    memory: MemoryEstimate | None = Field(
        None, description="Estimated memory per replica (docs/memory-fit.md); see the Fits condition."
    )
    download: DownloadStatus | None = Field(
        None, description="While Downloading: the model download's progress, read every few seconds."
    )
    autoscaling: AutoscalingStatus | None = Field(
        None, description="The gateway autoscaler's view (load, desired replicas, last scale, why); with spec.scaling."
    )
    models: list[ServedModelStatus] | None = Field(
        None, description="With spec.models: each model's state, read from the pods' /models every few seconds "
        "while pods are ready (docs/multi-model.md).")
    models_loaded: str | None = Field(None, description="With spec.models: loaded/total models, for kubectl get.")
    models_memory: str | None = Field(
        None, description="With spec.models and resources.limits.memory: the estimates of the models loaded on "
        "the fullest pod over the memory budget (e.g. 700Mi/1024Mi).")
    models_changed_time: str | None = Field(
        None, description="When the pods' answer last changed status.models (RFC 3339).")
    distributed: DistributedStatus | None = Field(
        None, description="With spec.distributed: the layer placement and each worker (docs/distributed.md).")
    conditions: list[Condition] | None = Field(
        None, description="ModelResolved, ArgsValid, Fits, Available, Progressing."
    )
