"""LlamaServer: a llama-server fleet for one LlamaModel (or several, router mode), and the object."""

from __future__ import annotations

import difflib
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from ...llamacpp.catalog import builtin_chat_templates
from ..base import ApiModel, ContextSize, GpuLayers, Quantity
from ..bounds import ENV_MAX_ITEMS, IMAGE_MAX_LENGTH, LABEL_VALUE_MAX_LENGTH, LIST_MAX_ITEMS, Annotations, Labels, Name
from ..cel import cel_schema, check_value
from ..k8s import Affinity, EnvVar, ResourceRequirements, Toleration, TopologySpreadConstraint
from .llamaserver_distributed import DistributedSpec
from .llamaserver_fleet import DisruptionSpec, PromptCacheSpec, RoutingSpec, ScalingSpec, ServiceSpec
from .llamaserver_rules import (
    ARG_MAX_LENGTH,
    ARGS_MAX_ITEMS,
    ARGS_RULES,
    DISTRIBUTED_RULES,
    MODELS_MAX_ITEMS,
    ROUTER_RULES,
    SERVED_MODEL_RULES,
    SERVER_RULES,
    SPECULATIVE_RULES,
)
from .llamaserver_status import LlamaServerStatus
from .shared_types import (
    API_VERSION,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    ObjectMeta,
    SecretKeyRef,
    ServedName,
)


class ModelRef(ApiModel):
    """A LlamaModel in the same namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="LlamaModel name.")
    namespace: str | None = Field(
        None,
        pattern=DNS_LABEL,
        max_length=LABEL_VALUE_MAX_LENGTH,
        description="Must be omitted or equal the LlamaServer's namespace: cross-namespace references are "
        "not supported (a model's cache and Secrets live in its own namespace).",
    )


GpuVendor = Literal["nvidia", "amd", "intel"]


class GpuSpec(ApiModel):
    """GPUs per replica. Absent means CPU only."""

    vendor: GpuVendor = Field(description="nvidia (nvidia.com/gpu), amd (amd.com/gpu) or intel (gpu.intel.com/i915).")
    count: int = Field(1, ge=1, le=16, description="GPUs per replica (1-16).")
    memory: Quantity | None = Field(
        None, description="Memory of one GPU (e.g. 24Gi): the budget of contextSize auto, since the operator "
        "does not see which node the pods land on.")


def _builtin_chat_template(name: str) -> str:
    if name not in builtin_chat_templates():
        close = difflib.get_close_matches(name, builtin_chat_templates(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{name!r} is not one of llama.cpp's built-in chat templates{hint}: "
                         f"{', '.join(builtin_chat_templates())}")
    return name


ChatTemplateName = Annotated[
    str, AfterValidator(_builtin_chat_template), Field(json_schema_extra={"enum": list(builtin_chat_templates())})]
"""A chat template llama.cpp formats itself. Rendered with --no-jinja: with Jinja on (llama-server's default)
--chat-template takes the template's text, so a name would be the whole prompt."""
CHAT_TEMPLATE_DESCRIPTION = (
    "--chat-template (with --no-jinja): one of llama.cpp's built-in templates, e.g. chatml, llama3, gemma, for a "
    "GGUF without a template of its own or to override it; tool calls need the GGUF's Jinja template. Unset: the "
    "GGUF's own template (llama-server falls back to chatml when it has none).")


KvCacheType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
LoadMode = Literal["auto", "none", "mmap", "mlock", "mmap+mlock", "dio"]


class SpeculativeSpec(ApiModel):
    """Speculative decoding with a small draft model that proposes tokens the served model verifies."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SPECULATIVE_RULES)}

    draft_model_ref: ModelRef = Field(
        description="The draft LlamaModel (same namespace); it must share the served model's vocabulary."
    )
    draft_max: int | None = Field(
        None, ge=1, le=1024, description="--spec-draft-n-max: tokens drafted per step (llama.cpp default 3)."
    )
    draft_min: int | None = Field(
        None, ge=0, le=1024, description="--spec-draft-n-min: minimum drafted tokens to use (default 0)."
    )
    draft_p_min: float | None = Field(
        None, ge=0, le=1, description="--spec-draft-p-min: minimum draft probability to keep drafting (0-1)."
    )
    draft_gpu_layers: GpuLayers | None = Field(
        None, description="--spec-draft-ngl: draft layers on the GPU, a number, auto or all."
    )


class AdapterRef(ApiModel):
    """A LoRA adapter (a LlamaModel with spec.adapterFor) the server loads beside its model."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253,
                      description="The adapter's LlamaModel (same namespace); requests name it as <model>:<name>.")
    scale: float = Field(1.0, gt=0, le=100,
                         description="The adapter's scale when a request names it (llama-server's lora scale).")


ADAPTERS_MAX_ITEMS = 8
"""Adapters one LlamaServer loads: each is in memory on every replica, and llama-server batches only requests
with the same adapters together."""


class ServedModel(ApiModel):
    """One LlamaModel of a multi-model LlamaServer (llama-server router mode), with its own settings."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SERVED_MODEL_RULES)}

    model_ref: ModelRef = Field(description="The LlamaModel (same namespace).")
    alias: ServedName | None = Field(
        None,
        description="Name of the model in /v1/models and in requests' `model` (default: the LlamaModel name); "
        "letters, digits, '.', '_' and '-'.")
    load_on_startup: bool = Field(
        False, description="Load the model when the server starts instead of on its first request.")
    idle_unload_seconds: int | None = Field(
        None, ge=1, le=2147483647,
        description="--sleep-idle-seconds of this model: after this many seconds without requests its weights "
        "and KV cache are freed (status Sleeping) and the next request loads them again. A sleeping model "
        "still counts toward maxLoaded. Default: never.")
    context_size: int | None = Field(
        None, ge=0, le=16777216, description="--ctx-size: total context in tokens shared by all slots (0 = model's).")
    parallel: int | None = Field(None, ge=1, le=256, description="--parallel: concurrent request slots.")
    flash_attention: Literal["auto", "on", "off"] | None = Field(None, description="--flash-attn: auto, on or off.")
    cache_type_k: KvCacheType | None = Field(None, description="--cache-type-k: KV cache type for K.")
    cache_type_v: KvCacheType | None = Field(
        None, description="--cache-type-v: KV cache type for V (quantized types need flash attention).")
    batch_size: int | None = Field(None, ge=1, le=1048576, description="--batch-size: logical batch size.")
    ubatch_size: int | None = Field(None, ge=1, le=1048576, description="--ubatch-size: physical batch size.")
    gpu_layers: GpuLayers | None = Field(
        None, description="--n-gpu-layers: a number, auto or all (default all when gpu is set).")
    mode: Literal["chat", "embedding", "rerank"] = Field(
        "chat", description="chat (completions), embedding (--embedding) or rerank (--reranking).")
    chat_template: ChatTemplateName | None = Field(None, description=CHAT_TEMPLATE_DESCRIPTION)
    load_mode: LoadMode | None = Field(
        None, description="--load-mode: auto, none, mmap, mlock, mmap+mlock or dio.")

    @property
    def served_name(self) -> str:
        """What /v1/models lists and requests name."""
        return self.alias or self.model_ref.name


class LlamaServerSpec(ApiModel):
    """A llama-server fleet serving one LlamaModel (spec.modelRef) or several (spec.models, router mode)."""

    model_config = {**ApiModel.model_config,
                    "json_schema_extra": cel_schema(SERVER_RULES + ROUTER_RULES + DISTRIBUTED_RULES)}

    model_ref: ModelRef | None = Field(
        None, description="The LlamaModel to serve (same namespace). Exactly one of modelRef and models.")
    models: list[ServedModel] | None = Field(
        None, min_length=1, max_length=MODELS_MAX_ITEMS,
        description="Several LlamaModels behind one endpoint (llama-server router mode): each loaded on demand "
        "with its own settings, at most maxLoaded at a time. Exactly one of modelRef and models.")
    max_loaded: int | None = Field(
        None, ge=0, le=MODELS_MAX_ITEMS,
        description="--models-max: models loaded at once with spec.models; the least recently used idle one is "
        "stopped to load another (0 = no limit; default: llama-server's, 4).")
    replicas: int = Field(1, ge=0, le=1000, description="Number of llama-server pods.")
    gpu: GpuSpec | None = Field(None, description="GPUs per replica; absent means CPU inference.")

    # Typed llama-server settings. Each renders to exactly one flag; the same flag in `args` is an error.
    context_size: ContextSize | None = Field(
        None, description="--ctx-size: total context in tokens shared by all slots (0 = model's), or auto: the "
        "largest that fits resources.limits.memory (CPU) or gpu.memory (GPU), at most the model's trained context "
        "(docs/memory-fit.md)."
    )
    parallel: int | None = Field(None, ge=1, le=256, description="--parallel: concurrent request slots.")
    flash_attention: Literal["auto", "on", "off"] | None = Field(None, description="--flash-attn: auto, on or off.")
    cache_type_k: KvCacheType | None = Field(None, description="--cache-type-k: KV cache type for K.")
    cache_type_v: KvCacheType | None = Field(
        None, description="--cache-type-v: KV cache type for V (quantized types need flash attention)."
    )
    batch_size: int | None = Field(None, ge=1, le=1048576, description="--batch-size: logical batch size.")
    ubatch_size: int | None = Field(None, ge=1, le=1048576, description="--ubatch-size: physical batch size.")
    gpu_layers: GpuLayers | None = Field(
        None, description="--n-gpu-layers: a number, auto or all (default all when gpu is set)."
    )
    split_mode: Literal["none", "layer", "row"] | None = Field(
        None, description="--split-mode across several GPUs: none, layer or row."
    )
    tensor_split: list[float] | None = Field(
        None, max_length=16, description="--tensor-split: share of the model per GPU, e.g. [3, 1]."
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="--threads (default: derived from the CPU limit or request on CPU)."
    )
    alias: ServedName | None = Field(
        None,
        description="Model name served by /v1/models and accepted in requests (default: the LlamaModel name); "
        "letters, digits, '.', '_' and '-'.",
    )
    mode: Literal["chat", "embedding", "rerank"] = Field(
        "chat", description="chat (completions), embedding (--embedding) or rerank (--reranking)."
    )
    chat_template: ChatTemplateName | None = Field(None, description=CHAT_TEMPLATE_DESCRIPTION)
    load_mode: LoadMode | None = Field(
        None,
        description="--load-mode: how weights are loaded: auto, none (read, no mmap), mmap, mlock (keep in RAM), "
        "mmap+mlock or dio (direct I/O). Replaces the removed --mlock and --no-mmap.",
    )
    speculative: SpeculativeSpec | None = Field(
        None, description="Speculative decoding with a draft LlamaModel (--spec-draft-model, --spec-type draft-simple)."
    )
    adapters: list[AdapterRef] | None = Field(
        None, min_length=1, max_length=ADAPTERS_MAX_ITEMS,
        description="LoRA adapters of the served model (LlamaModels whose spec.adapterFor is spec.modelRef), "
        "loaded at start and applied per request: the gateway serves each as <model>:<adapter> (docs/adapters.md).")
    args: list[Annotated[str, Field(max_length=ARG_MAX_LENGTH)]] | None = Field(
        None,
        max_length=ARGS_MAX_ITEMS,
        description="Extra llama-server flags, e.g. [--top-k, '20']. Validated; flags the operator manages "
        "or that have a typed field are rejected.",
        json_schema_extra=cel_schema(ARGS_RULES),
    )

    image: str | None = Field(
        None, min_length=1, max_length=IMAGE_MAX_LENGTH,
        description="llama-server image (default: by gpu.vendor). The operator's policy may refuse custom images "
        "or allow only some registries (docs/security.md).")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key clients must send (Authorization: Bearer ...)."
    )
    startup_timeout_seconds: int = Field(
        1800, ge=30, le=86400, description="How long loading the model may take before the pod is restarted."
    )
    termination_grace_period_seconds: int = Field(
        120, ge=10, le=3600,
        description="How long a stopping pod (rollout, scale-down, drain) may take: it leaves the endpoints at "
        "once, then llama-server finishes its requests and stops when idle or 5 s before this runs out "
        "(docs/operations.md).")

    resources: ResourceRequirements | None = Field(None, description="CPU and memory of the llama-server container.")
    node_selector: Labels | None = Field(None, description="Node labels the pods must match.")
    tolerations: list[Toleration] | None = Field(
        None, max_length=LIST_MAX_ITEMS, description="Tolerations (the GPU vendor's toleration is added automatically)."
    )
    affinity: Affinity | None = Field(None, description="Affinity rules for the pods.")
    topology_spread_constraints: list[TopologySpreadConstraint] | None = Field(
        None, max_length=8, description="How the replicas spread over nodes or zones; replaces the default (a "
        "soft spread over nodes: maxSkew 1, kubernetes.io/hostname, ScheduleAnyway).")
    disruption: DisruptionSpec | None = Field(
        None, description="The PodDisruptionBudget made when spec.replicas > 1 (default maxUnavailable: 1); none "
        "for one replica, whose budget would block every node drain.")
    priority_class_name: Name | None = Field(
        None, description="PriorityClass of the pods (the operator's policy may allow only some).")
    runtime_class_name: Name | None = Field(
        None, description="RuntimeClass of the pods, e.g. nvidia (the operator's policy may allow only some).")
    pod_annotations: Annotations | None = Field(
        None, description="Extra annotations on the pods; security-relevant ones (AppArmor, seccomp, the "
        "container runtime's, llamacpp.dev/) are refused (docs/security.md).")
    pod_labels: Labels | None = Field(None, description="Extra labels on the pods.")
    env: list[EnvVar] | None = Field(
        None, max_length=ENV_MAX_ITEMS,
        description="Extra environment variables (LLAMA_ARG_* ones are validated like flags)."
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The Service in front of the pods.")
    scaling: ScalingSpec | None = Field(
        None, description="Autoscaling and scale to zero by the gateway (docs/gateway.md); absent: spec.replicas "
        "is left to you.")
    routing: RoutingSpec | None = Field(
        None, description="How the gateway balances requests over the replicas (default LeastInFlight).")
    prompt_cache: PromptCacheSpec | None = Field(
        None, description="Keep the slots' prompt caches across pod restarts (docs/prompt-cache.md).")
    distributed: DistributedSpec | None = Field(
        None, description="Split the model over llama.cpp RPC workers on other nodes, for a model larger than "
        "one node (docs/distributed.md).")

    @field_validator("args")
    @classmethod
    def _args_are_strings(cls, value: list[str] | None) -> list[str] | None:
        return value if value is None else check_value(ARGS_RULES, value)

    @model_validator(mode="after")
    def _one_model_source(self) -> LlamaServerSpec:
        # Everything downstream needs modelRef or models; the other router rules are reported with the flags.
        return check_value(ROUTER_RULES[:1], self)

    def keeps_prompt_cache(self) -> bool:
        """spec.promptCache.persist: llama-server then runs with --slot-save-path and --swa-full. A saved slot
        carries no context checkpoints, so the KV of a sliding-window model restored without the full window
        cannot be reused (measured: 0 cached tokens on gemma-3 after a restore): flags/render.py passes the flag,
        fit counts its memory."""
        return self.prompt_cache is not None and self.prompt_cache.persist

    def model_refs(self) -> list[tuple[str, ModelRef]]:
        """Every LlamaModel this server uses, with the field that names it, in order: spec.modelRef, each
        spec.models[i].modelRef, spec.speculative.draftModelRef, each spec.adapters[i]. The one list of a server's
        references: the validation, the reconcile, `render` and the handlers' model index all read it."""
        refs = [("spec.modelRef", self.model_ref)] if self.model_ref is not None else []
        refs += [(f"spec.models[{index}].modelRef", entry.model_ref) for index, entry in enumerate(self.models or [])]
        if self.speculative is not None:
            refs.append(("spec.speculative.draftModelRef", self.speculative.draft_model_ref))
        refs += [(f"spec.adapters[{index}].name", ModelRef(name=entry.name))
                 for index, entry in enumerate(self.adapters or [])]
        return refs


class LlamaServer(ApiModel):
    """A LlamaServer object as stored in the API."""

    model_config = {**ApiModel.model_config, "extra": "ignore"}

    api_version: Literal["llamacpp.dev/v1alpha1"] = API_VERSION
    kind: Literal["LlamaServer"] = "LlamaServer"
    metadata: ObjectMeta
    spec: LlamaServerSpec
    status: LlamaServerStatus = Field(default_factory=LlamaServerStatus)

