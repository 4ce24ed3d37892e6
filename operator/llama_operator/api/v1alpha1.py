"""The llamacpp.dev/v1alpha1 API: LlamaModel and LlamaServer spec and status.

These pydantic models are the single source of truth: the CRDs (`llama-operator crds`), the admission
checks and the builders all derive from them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from ..flags.catalog import builtin_chat_templates
from .base import ApiModel, GpuLayers, Quantity
from .cel import Rule, cel_schema, check_value, snake
from .k8s import Affinity, EnvVar, ResourceRequirements, Toleration

GROUP = "llamacpp.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SHA256_HEX = r"^[a-f0-9]{64}$"
SPLIT_GGUF_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


# ---------------------------------------------------------------------------------------------- shared


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    key: str = Field(min_length=1, description="Key inside the Secret.")


class SecretRef(ApiModel):
    """A whole Secret in the resource's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")


class Condition(ApiModel):
    """A status condition in the Kubernetes convention."""

    type: str = Field(description="Condition type, e.g. Ready, ArgsValid, Available.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word for machines.")
    message: str = Field("", description="What a person needs to know.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The metadata.generation this was computed for.")


# ---------------------------------------------------------------------------------------------- LlamaModel


GGUF_FILE_RULES = (
    Rule("relative-path",
         "!self.startsWith('/') && self != '..' && !self.startsWith('../') && !self.contains('/../') "
         "&& !self.endsWith('/..')",
         lambda v: not v.startswith("/") and ".." not in v.split("/"),
         "must be a relative path inside the repository or volume, without '..'"),
    Rule("gguf-file", "self.endsWith('.gguf')", lambda v: v.endswith(".gguf"),
         "must name a .gguf file (for a split model, its first shard: name-00001-of-0000N.gguf)"),
)
"""A GGUF file inside a repository or volume (huggingFace.file, volume.path)."""


class HuggingFaceSource(ApiModel):
    """A GGUF file in a Hugging Face model repository."""

    repo: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Repository id, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF.",
    )
    file: str = Field(
        min_length=6,
        max_length=1024,
        description="Path of the .gguf file in the repository; for a split model its first shard "
        "(name-00001-of-0000N.gguf) and every shard is fetched.",
        json_schema_extra=cel_schema(GGUF_FILE_RULES),
    )
    revision: str = Field("main", min_length=1, description="Branch, tag or commit (default main).")
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token, for gated or private repositories."
    )

    _file = field_validator("file")(classmethod(lambda cls, v: check_value(GGUF_FILE_RULES, v)))


class HttpSource(ApiModel):
    """A GGUF file at a plain HTTP(S) URL."""

    url: str = Field(pattern=r"^https?://[^\s]+$", description="http:// or https:// URL of the .gguf file.")
    headers_secret_ref: SecretRef | None = Field(
        None,
        description="Secret whose keys are HTTP header names and values their values (e.g. Authorization), "
        "sent with every request.",
    )


class VolumeSource(ApiModel):
    """A GGUF file already present on an existing PersistentVolumeClaim: nothing is downloaded."""

    persistent_volume_claim: str = Field(
        pattern=DNS_SUBDOMAIN, max_length=253, description="Name of the PVC in the same namespace."
    )
    path: str = Field(min_length=6, max_length=1024, description="Path of the .gguf file inside the volume.",
                      json_schema_extra=cel_schema(GGUF_FILE_RULES))

    _path = field_validator("path")(classmethod(lambda cls, v: check_value(GGUF_FILE_RULES, v)))


SOURCE_KINDS = ("huggingFace", "http", "volume")
# The names of the sources that are set, comma-separated, or 'none' (no `join`: its cost estimate is unbounded).
_GIVEN = " && ".join(f"!has(self.{kind})" for kind in SOURCE_KINDS) + " ? 'none' : " + " + ".join(
    f"(has(self.{kind}) ? " + ("(" + " || ".join(f"has(self.{k})" for k in SOURCE_KINDS[:i]) + " ? ', ' : '') + "
                               if i else "") + f"'{kind}' : '')"
    for i, kind in enumerate(SOURCE_KINDS))

SOURCE_RULES = (
    Rule("one-source", "size([has(self.huggingFace), has(self.http), has(self.volume)].filter(s, s)) == 1",
         lambda s: len(s.given) == 1,
         "exactly one of huggingFace, http, volume must be set (got {given})",
         values={"given": (_GIVEN, lambda s: ", ".join(s.given) or "none")}),
)


class ModelSource(ApiModel):
    """Where the model comes from: exactly one of huggingFace, http, volume."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SOURCE_RULES)}

    hugging_face: HuggingFaceSource | None = Field(None, description="A file in a Hugging Face repository.")
    http: HttpSource | None = Field(None, description="A plain HTTP(S) URL.")
    volume: VolumeSource | None = Field(None, description="A file on an existing PersistentVolumeClaim.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        return check_value(SOURCE_RULES, self)

    @property
    def given(self) -> list[str]:
        """The sources that are set (exactly one in a valid object)."""
        return [name for name in SOURCE_KINDS if getattr(self, snake(name)) is not None]

    @property
    def kind(self) -> Literal["huggingFace", "http", "volume"]:
        if self.hugging_face is not None:
            return "huggingFace"
        if self.http is not None:
            return "http"
        return "volume"

    @property
    def file_name(self) -> str:
        """Base name of the (first) GGUF file."""
        if self.hugging_face is not None:
            path = self.hugging_face.file
        elif self.http is not None:
            path = self.http.url.split("?", 1)[0]
        else:
            assert self.volume is not None
            path = self.volume.path
        return path.rstrip("/").rsplit("/", 1)[-1]


CacheType = Literal["EmptyDir", "PersistentVolumeClaim", "HostPath"]


class CacheSpec(ApiModel):
    """Where downloaded files are kept between pod starts."""

    type: CacheType | None = Field(
        None,
        description="EmptyDir (per pod, lost with it), PersistentVolumeClaim (created and owned by the "
        "LlamaModel; ReadWriteMany lets replicas spread across nodes, ReadWriteOnce pins them to one node) or "
        "HostPath (node-local directory shared by every pod on that node). Default: the operator's setting.",
    )
    size: Quantity | None = Field(
        None, description="Volume size (EmptyDir size limit or PVC request). Default: model size plus headroom."
    )
    storage_class_name: str | None = Field(None, description="StorageClass of the PVC (default: the cluster's).")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"]] | None = (
        Field(None, description="PVC access modes (default ReadWriteOnce).")
    )
    path: str | None = Field(
        None,
        pattern=r"^/",
        description="HostPath only: node directory of the cache (default: the operator's hostPath root).",
    )


class MmprojSpec(ApiModel):
    """A multimodal projector (mmproj) GGUF next to the weights: llama-server gets `--mmproj` and accepts images
    (or audio) in chat messages. Fetched and verified like the weights, into the same cache directory."""

    file: str = Field(
        min_length=6, max_length=1024,
        description="huggingFace: path of the projector in the same repository and revision; volume: path in the "
        "same PVC; http: a URL relative to the model's URL (a bare file name is the same directory) or a whole "
        "http(s) URL.",
        json_schema_extra=cel_schema(GGUF_FILE_RULES))
    sha256: str | None = Field(
        None, pattern=SHA256_HEX,
        description="Expected sha256, lowercase hex. Optional where the source publishes it (Hugging Face LFS); "
        "a downloaded projector whose sha256 nobody publishes or pins is refused.")

    _file = field_validator("file")(classmethod(lambda cls, v: check_value(GGUF_FILE_RULES, v)))

    @property
    def file_name(self) -> str:
        """Base name of the projector file (in the cache directory or the volume)."""
        return self.file.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


class LlamaModelSpec(ApiModel):
    """A GGUF model: where it comes from, its checksum, how it is cached."""

    source: ModelSource = Field(description="Where the GGUF comes from: exactly one of huggingFace, http, volume.")
    sha256: str | None = Field(
        None,
        pattern=SHA256_HEX,
        description="Expected sha256 of the (first) file, lowercase hex. Optional: Hugging Face publishes it for "
        "LFS files and that is used when absent.",
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="How downloaded files are cached.")
    mmproj: MmprojSpec | None = Field(
        None, description="A multimodal projector file for vision models (llama-server --mmproj).")


class ModelFile(ApiModel):
    """One resolved file of the model (several for a split GGUF)."""

    name: str = Field(description="File name inside the cache directory.")
    url: str | None = Field(None, description="Where it is downloaded from (absent for volume sources).")
    size: int | None = Field(None, description="Size in bytes, when known.")
    sha256: str | None = Field(None, description="Content sha256, when known.")


class ModelMemoryShape(ApiModel):
    """The sizes a memory estimate needs, derived from the GGUF header (see docs/memory-fit.md)."""

    weight_bytes: int = Field(0, description="Bytes of all tensor data.")
    layer_weight_bytes: int = Field(0, description="Bytes of the repeating blk.N tensors (offloaded per layer).")
    embedding_weight_bytes: int = Field(0, description="Bytes of token_embd (always kept in host memory).")
    output_weight_bytes: int = Field(0, description="Bytes of the output head (0 when tied to token_embd).")
    cpu_repacked_bytes: int = Field(
        0, description="Bytes of weights the CPU backend also keeps in its repacked layout (Q4_0, Q4_K, IQ4_NL, "
        "MXFP4 on AVX2): counted twice for layers that run on the CPU."
    )
    layers: int = Field(0, description="Transformer blocks.")
    vocab_size: int = Field(0, description="Tokens in the vocabulary.")
    embedding_length: int = Field(0, description="Embedding width.")
    feed_forward_length: int = Field(0, description="Widest feed-forward layer.")
    head_count: int = Field(0, description="Most attention (query) heads in a layer.")
    attention_layers: int = Field(0, description="Layers with a full-context KV cache.")
    sliding_window_layers: int = Field(0, description="Layers with a sliding-window KV cache.")
    sliding_window: int = Field(0, description="Tokens a sliding-window layer attends to.")
    recurrent_layers: int = Field(0, description="Layers with a fixed-size recurrent state (Mamba, RWKV, ...).")
    key_width: int = Field(0, description="K elements per token, summed over the full-context layers.")
    value_width: int = Field(0, description="V elements per token, summed over the full-context layers.")
    sliding_key_width: int = Field(0, description="K elements per token, summed over the sliding-window layers.")
    sliding_value_width: int = Field(0, description="V elements per token, summed over the sliding-window layers.")
    recurrent_state_width: int = Field(
        0, description="f32 elements of recurrent state per sequence, summed over the recurrent layers."
    )


class GgufInfo(ApiModel):
    """Metadata read from the GGUF header."""

    architecture: str | None = Field(None, description="general.architecture, e.g. llama, qwen2, gemma3.")
    name: str | None = Field(None, description="general.name.")
    size_label: str | None = Field(None, description="general.size_label, e.g. 0.5B.")
    file_type: str | None = Field(None, description="Quantization, e.g. Q4_K_M.")
    parameter_count: int | None = Field(None, description="Parameters counted from tensor shapes.")
    context_length: int | None = Field(None, description="Training context length.")
    block_count: int | None = Field(None, description="Number of transformer blocks.")
    embedding_length: int | None = Field(None, description="Embedding width.")
    head_count: int | None = Field(None, description="Attention heads.")
    head_count_kv: int | None = Field(None, description="Key/value heads.")
    has_chat_template: bool | None = Field(
        None, description="tokenizer.chat_template is set: llama-server formats chat requests with it (without "
        "one, and without a LlamaServer chatTemplate, it falls back to chatml).")
    memory: ModelMemoryShape | None = Field(
        None, description="Sizes the memory estimate of a LlamaServer uses (weights, KV cache widths, layers)."
    )


class FileChecksum(ApiModel):
    """The sha256 of one model file."""

    name: str = Field(description="File name inside the cache directory.")
    sha256: str = Field(pattern=SHA256_HEX, description="Content sha256, lowercase hex.")


class TrustOnFirstUse(ApiModel):
    """Checksums recorded from the first verified download of a source that publishes none.

    Every later download (other pods, other nodes) must produce the same bytes; see docs/model-sources.md.
    """

    cache_key: str = Field(description="The cache key (status.cacheKey) they were recorded for: a source without "
                           "a published sha256 is keyed by its identity, so another source starts over.")
    source: str | None = Field(None, description="The source they were recorded for (hf:repo@revision/file, url:...).")
    files: list[FileChecksum] = Field(description="sha256 of every file, as the first verified download found it.")
    recorded_time: str | None = Field(None, description="When they were recorded (RFC 3339).")
    recorded_from: str | None = Field(None, description="The pod whose download recorded them.")


ModelPhase = Literal["Pending", "Resolving", "Ready", "Failed"]


class LlamaModelStatus(ApiModel):
    """What the operator knows about the model."""

    phase: ModelPhase | None = Field(None, description="Pending, Resolving, Ready or Failed.")
    message: str | None = Field(None, description="What is wrong, when something is.")
    observed_generation: int | None = Field(None, description="The metadata.generation this status is for.")
    conditions: list[Condition] | None = Field(None, description="Resolved, Ready conditions.")
    files: list[ModelFile] | None = Field(None, description="Every file of the model.")
    size: int | None = Field(None, description="Total size in bytes.")
    sha256: str | None = Field(None, description="sha256 of the (first) file.")
    cache_key: str | None = Field(None, description="Directory of this model inside the cache volume.")
    gguf: GgufInfo | None = Field(None, description="GGUF header metadata.")
    mmproj: ModelFile | None = Field(None, description="The resolved multimodal projector file (spec.mmproj).")
    last_resolved_time: str | None = Field(
        None, description="When the source was last inspected (RFC 3339); it is inspected again when the spec "
        "changes or LLAMA_OPERATOR_MODEL_RESYNC_SECONDS later.")
    trust_on_first_use: TrustOnFirstUse | None = Field(
        None, description="For a source without a published sha256 (and no spec.sha256): the checksums of the "
        "first verified download, which every later download must match.")


# ---------------------------------------------------------------------------------------------- LlamaServer


class ModelRef(ApiModel):
    """A LlamaModel in the same namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="LlamaModel name.")
    namespace: str | None = Field(
        None,
        description="Must be omitted or equal the LlamaServer's namespace: cross-namespace references are "
        "not supported (a model's cache and Secrets live in its own namespace).",
    )


GpuVendor = Literal["nvidia", "amd", "intel"]


class GpuSpec(ApiModel):
    """GPUs per replica. Absent means CPU only."""

    vendor: GpuVendor = Field(description="nvidia (nvidia.com/gpu), amd (amd.com/gpu) or intel (gpu.intel.com/i915).")
    count: int = Field(1, ge=1, le=16, description="GPUs per replica (1-16).")


class ServiceSpec(ApiModel):
    """The Service in front of the replicas: the OpenAI-compatible endpoint."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(8080, ge=1, le=65535, description="Service port (the pods always listen on 8080).")
    annotations: dict[str, str] | None = Field(None, description="Annotations for the Service.")


SCALING_RULES = (
    Rule("min-above-max", "self.minReplicas <= self.maxReplicas",
         lambda s: s.min_replicas <= s.max_replicas,
         "minReplicas ({minReplicas}) must be <= maxReplicas ({maxReplicas})", field="minReplicas"),
)


class ScalingSpec(ApiModel):
    """Replicas that follow the load, down to zero while idle: decided by the gateway (docs/gateway.md).

    With this set, the gateway is the one component that writes spec.replicas (through the scale subresource).
    A `kubectl scale` inside [minReplicas, maxReplicas] is kept for at least scaleDownDelaySeconds (and counts as
    activity for idleSeconds); a value outside is put back to the nearest bound.
    """

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SCALING_RULES)}

    min_replicas: int = Field(
        1, ge=0, le=1000, description="Fewest replicas; 0 lets the server scale to zero while idle (the gateway "
        "holds the first request while it scales up again).")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most replicas the load may ask for.")
    target_in_flight: int | None = Field(
        None, ge=1, le=1024, description="In-flight requests per replica the autoscaler aims at (mean over "
        "windowSeconds); default: spec.parallel, else 4.")
    idle_seconds: int = Field(
        300, ge=1, le=604800, description="With minReplicas 0: seconds without any request before scaling to zero.")
    scale_down_delay_seconds: int = Field(
        60, ge=0, le=86400, description="A scale-down happens only when no higher replica count was wanted during "
        "this many seconds (no flapping); scale-ups are immediate.")
    window_seconds: int = Field(
        30, ge=1, le=3600, description="Seconds over which in-flight requests are averaged into the load.")


class RoutingSpec(ApiModel):
    """How the gateway spreads requests over this server's ready replicas."""

    strategy: Literal["LeastInFlight", "PrefixAffinity"] = Field(
        "LeastInFlight", description="LeastInFlight: the replica with the fewest requests in flight. "
        "PrefixAffinity: consistent hashing with bounded load over the prompt prefix, so one conversation keeps "
        "hitting the replica whose KV cache holds it, unless that replica is over loadBound times the mean load.")
    prefix_characters: int = Field(
        2048, ge=16, le=1048576, description="PrefixAffinity: characters of the prompt hashed (for chat: the "
        "messages up to and including the first user message).")
    load_bound: float = Field(
        1.25, ge=1.0, le=100.0, description="PrefixAffinity: no replica takes more than ceil(loadBound x mean "
        "in-flight) requests; past that the next replica on the ring gets the request.")


def _builtin_chat_template(name: str) -> str:
    if name not in builtin_chat_templates():
        import difflib

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
ARGS_MAX_ITEMS = 256
ARG_MAX_LENGTH = 16384
"""Bounds of spec.args (the API server estimates a rule's cost from them: CEL rules look into args)."""
ARGS_RULES = (
    Rule("empty-arg", "self.all(a, size(a) > 0)", lambda args: all(args),
         "empty strings are not valid llama-server arguments"),
)
QUANTIZED_KV = ("q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
"""KV cache types that are quantized (a quantized V cache needs flash attention)."""

SPECULATIVE_RULES = (
    Rule("draft-min-above-max", "!has(self.draftMin) || !has(self.draftMax) || self.draftMin <= self.draftMax",
         lambda s: s.draft_min is None or s.draft_max is None or s.draft_min <= s.draft_max,
         "draftMin ({draftMin}) must be <= draftMax ({draftMax})", field="draftMin"),
)


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


def _gpus(spec: LlamaServerSpec) -> int:
    return spec.gpu.count if spec.gpu else 0


def _pooling_value(args: list[str] | None) -> str | None:
    """The item after the first `--pooling` in args ('' when it is last), None without `--pooling`."""
    if not args or "--pooling" not in args:
        return None
    index = args.index("--pooling") + 1
    return args[index] if index < len(args) else ""


# Cross-field rules of the typed llama-server settings. The API server checks them at `kubectl apply`; the
# operator checks them with the flags (flags/validate.py) for objects that got past an older CRD.
SERVER_RULES = (
    Rule("kv-quant-needs-flash-attention",
         f"!has(self.cacheTypeV) || !(self.cacheTypeV in {list(QUANTIZED_KV)}) "
         "|| (has(self.flashAttention) && self.flashAttention == 'on')",
         lambda s: s.cache_type_v not in QUANTIZED_KV or s.flash_attention == "on",
         "a quantized V cache ({cacheTypeV}) needs flash attention: set flashAttention: on", field="cacheTypeV"),
    Rule("batch-below-parallel", "!has(self.batchSize) || !has(self.parallel) || self.batchSize >= self.parallel",
         lambda s: s.batch_size is None or s.parallel is None or s.batch_size >= s.parallel,
         "batchSize ({batchSize}) must be >= parallel ({parallel}): every slot needs room in a batch",
         field="batchSize"),
    Rule("ubatch-above-batch",
         "!has(self.batchSize) || !has(self.ubatchSize) || self.ubatchSize <= self.batchSize",
         lambda s: s.batch_size is None or s.ubatch_size is None or s.ubatch_size <= s.batch_size,
         "ubatchSize ({ubatchSize}) must be <= batchSize ({batchSize})", field="ubatchSize"),
    Rule("pooling-mode-ubatch",
         "!has(self.mode) || self.mode == 'chat' || !has(self.batchSize) || !has(self.ubatchSize) "
         "|| self.batchSize == self.ubatchSize",
         lambda s: s.mode == "chat" or s.batch_size is None or s.ubatch_size is None
         or s.batch_size == s.ubatch_size,
         "mode {mode} encodes each input in one physical batch: ubatchSize must equal batchSize "
         "(or leave ubatchSize unset and it follows batchSize)", field="ubatchSize"),
    Rule("mode-speculative", "!has(self.speculative) || !has(self.mode) || self.mode == 'chat'",
         lambda s: s.speculative is None or s.mode == "chat",
         "speculative decoding generates text; mode {mode} does not", field="speculative"),
    # --pooling is the one flag a mode decides (rerank sets --pooling rank); no other option takes it as a value.
    Rule("chat-pooling", "!has(self.args) || (has(self.mode) && self.mode != 'chat') || !('--pooling' in self.args)",
         lambda s: s.mode != "chat" or _pooling_value(s.args) is None,
         "--pooling only applies to mode embedding or rerank", field="args"),
    Rule("rerank-pooling",
         "!has(self.args) || !has(self.mode) || self.mode != 'rerank' || !('--pooling' in self.args) "
         "|| (self.args.indexOf('--pooling') + 1 < size(self.args) "
         "&& self.args[self.args.indexOf('--pooling') + 1] == 'rank')",
         lambda s: s.mode != "rerank" or _pooling_value(s.args) in (None, "rank"),
         "mode rerank needs --pooling rank (it is set for you; remove --pooling)", field="args"),
    Rule("tensor-split-gpus",
         "!has(self.tensorSplit) || size(self.tensorSplit) == 0 "
         "|| size(self.tensorSplit) == (has(self.gpu) ? self.gpu.count : 0)",
         lambda s: not s.tensor_split or len(s.tensor_split) == _gpus(s),
         "tensorSplit has {shares} shares but gpu.count is {gpus}: give one share per GPU", field="tensorSplit",
         values={"shares": ("size(self.tensorSplit)", lambda s: len(s.tensor_split)),
                 "gpus": ("has(self.gpu) ? self.gpu.count : 0", _gpus)}),
    Rule("tensor-split-gpus",
         "!has(self.tensorSplit) || size(self.tensorSplit) == 0 "
         "|| size(self.tensorSplit) != (has(self.gpu) ? self.gpu.count : 0) "
         "|| (self.tensorSplit.all(x, x >= 0.0) && self.tensorSplit.exists(x, x > 0.0))",
         lambda s: not s.tensor_split or len(s.tensor_split) != _gpus(s)
         or (all(x >= 0 for x in s.tensor_split) and sum(s.tensor_split) > 0),
         "tensorSplit shares must be >= 0 with a positive sum", field="tensorSplit"),
)


MODELS_MAX_ITEMS = 16
"""Most models one router-mode LlamaServer serves: the API server multiplies every per-model CEL rule's cost
by it (and the duplicate-name rule compares every pair), so it stays small."""
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""A model name in router mode: a preset section name that llama-server keeps as written (no `:` tag, no `]`)."""
_SERVED_NAME_CEL = "(has({m}.alias) ? {m}.alias : {m}.modelRef.name)"


def _served(model: ServedModel) -> str:
    return model.served_name


def _per_model(rule: Rule) -> Rule:
    """A LlamaServer cross-field rule on one entry of spec.models, its message naming the model."""
    return Rule(rule.id, rule.cel, rule.holds, "model {model}: " + rule.message, field=rule.field,
                values={**rule.values, "model": (_SERVED_NAME_CEL.format(m="self"), _served)})


# Entries of spec.models carry the same typed settings as a single-model server: the same rules hold for each.
SERVED_MODEL_RULES = tuple(_per_model(rule) for rule in SERVER_RULES if rule.id in (
    "kv-quant-needs-flash-attention", "batch-below-parallel", "ubatch-above-batch", "pooling-mode-ubatch"))


class ServedModel(ApiModel):
    """One LlamaModel of a multi-model LlamaServer (llama-server router mode), with its own settings."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SERVED_MODEL_RULES)}

    model_ref: ModelRef = Field(description="The LlamaModel (same namespace).")
    alias: str | None = Field(
        None, min_length=1, max_length=128, pattern=SERVED_NAME_PATTERN,
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


PER_MODEL_FIELDS = ("contextSize", "parallel", "flashAttention", "cacheTypeK", "cacheTypeV", "batchSize",
                    "ubatchSize", "gpuLayers", "chatTemplate", "loadMode", "alias", "speculative")
"""Typed settings that belong to each model in router mode: with spec.models they are set per entry."""

_MODEL_GIVEN = " && ".join(f"!has(self.{k})" for k in ("modelRef", "models")) + " ? 'none' : 'modelRef, models'"
_DUPLICATE = ("self.models.filter(m, self.models.filter(o, {o} == {m}).size() > 1).map(m, {m})[0]"
              .format(o=_SERVED_NAME_CEL.format(m="o"), m=_SERVED_NAME_CEL.format(m="m")))


def _duplicate_name(spec: LlamaServerSpec) -> str | None:
    names = [m.served_name for m in spec.models or []]
    return next((name for name in names if names.count(name) > 1), None)


def _unset_with_models(field: str) -> Callable[[LlamaServerSpec], bool]:
    attribute = snake(field)
    return lambda s: s.models is None or getattr(s, attribute) is None


ROUTER_RULES = (
    Rule("one-model-source", "has(self.modelRef) != has(self.models)",
         lambda s: (s.model_ref is None) != (s.models is None),
         "exactly one of modelRef, models must be set (got {given})",
         values={"given": (_MODEL_GIVEN, lambda s: "none" if s.model_ref is None else "modelRef, models")}),
    *(Rule("per-model-setting", f"!has(self.models) || !has(self.{name})", _unset_with_models(name),
           f"with spec.models, {name} is set per model: use spec.models[].{name}", field=name)
      for name in PER_MODEL_FIELDS),
    Rule("per-model-setting", "!has(self.models) || !has(self.mode) || self.mode == 'chat'",
         lambda s: s.models is None or s.mode == "chat",
         "with spec.models, mode is set per model: use spec.models[].mode", field="mode"),
    Rule("max-loaded-without-models", "!has(self.maxLoaded) || has(self.models)",
         lambda s: s.max_loaded is None or s.models is not None,
         "maxLoaded applies to spec.models (router mode) only", field="maxLoaded"),
    Rule("duplicate-model-name",
         "!has(self.models) || self.models.all(m, self.models.filter(o, {o} == {m}).size() == 1)".format(
             o=_SERVED_NAME_CEL.format(m="o"), m=_SERVED_NAME_CEL.format(m="m")),
         lambda s: _duplicate_name(s) is None,
         "model name {name} is served twice: give each entry of spec.models its own alias", field="models",
         values={"name": (_DUPLICATE, _duplicate_name)}),
)
"""Rules of multi-model (router mode) servers; in the CRD next to SERVER_RULES."""


class LlamaServerSpec(ApiModel):
    """A llama-server fleet serving one LlamaModel (spec.modelRef) or several (spec.models, router mode)."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SERVER_RULES + ROUTER_RULES)}

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
    context_size: int | None = Field(
        None, ge=0, le=16777216, description="--ctx-size: total context in tokens shared by all slots (0 = model's)."
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
    alias: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Model name served by /v1/models and accepted in requests (default: the LlamaModel name).",
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
    args: list[Annotated[str, Field(max_length=ARG_MAX_LENGTH)]] | None = Field(
        None,
        max_length=ARGS_MAX_ITEMS,
        description="Extra llama-server flags, e.g. [--top-k, '20']. Validated; flags the operator manages "
        "or that have a typed field are rejected.",
        json_schema_extra=cel_schema(ARGS_RULES),
    )

    image: str | None = Field(None, min_length=1, description="llama-server image (default: by gpu.vendor).")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key clients must send (Authorization: Bearer ...)."
    )
    startup_timeout_seconds: int = Field(
        1800, ge=30, le=86400, description="How long loading the model may take before the pod is restarted."
    )

    resources: ResourceRequirements | None = Field(None, description="CPU and memory of the llama-server container.")
    node_selector: dict[str, str] | None = Field(None, description="Node labels the pods must match.")
    tolerations: list[Toleration] | None = Field(
        None, description="Tolerations (the GPU vendor's toleration is added automatically)."
    )
    affinity: Affinity | None = Field(None, description="Affinity rules for the pods.")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pods.")
    runtime_class_name: str | None = Field(None, description="RuntimeClass of the pods, e.g. nvidia.")
    pod_annotations: dict[str, str] | None = Field(None, description="Extra annotations on the pods.")
    pod_labels: dict[str, str] | None = Field(None, description="Extra labels on the pods.")
    env: list[EnvVar] | None = Field(
        None, description="Extra environment variables (LLAMA_ARG_* ones are validated like flags)."
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The Service in front of the pods.")
    scaling: ScalingSpec | None = Field(
        None, description="Autoscaling and scale to zero by the gateway (docs/gateway.md); absent: spec.replicas "
        "is left to you.")
    routing: RoutingSpec | None = Field(
        None, description="How the gateway balances requests over the replicas (default LeastInFlight).")

    @field_validator("args")
    @classmethod
    def _args_are_strings(cls, value: list[str] | None) -> list[str] | None:
        return value if value is None else check_value(ARGS_RULES, value)

    @model_validator(mode="after")
    def _one_model_source(self) -> LlamaServerSpec:
        # Everything downstream needs modelRef or models; the other router rules are reported with the flags.
        return check_value(ROUTER_RULES[:1], self)


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
    message: str | None = Field(None, description="Why, for people.")
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
    message: str | None = Field(None, description="Why it failed, when it did.")


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
    message: str | None = Field(None, description="What is wrong or in progress, for people.")
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
    models_changed_time: str | None = Field(
        None, description="When the pods' answer last changed status.models (RFC 3339).")
    conditions: list[Condition] | None = Field(
        None, description="ModelResolved, ArgsValid, Fits, Available, Progressing."
    )


# ---------------------------------------------------------------------------------------------- objects


class ObjectMeta(ApiModel):
    """The parts of metadata the operator reads."""

    model_config = {**ApiModel.model_config, "extra": "ignore"}

    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class LlamaModel(ApiModel):
    """A LlamaModel object as stored in the API."""

    model_config = {**ApiModel.model_config, "extra": "ignore"}

    api_version: Literal["llamacpp.dev/v1alpha1"] = API_VERSION
    kind: Literal["LlamaModel"] = "LlamaModel"
    metadata: ObjectMeta
    spec: LlamaModelSpec
    status: LlamaModelStatus = Field(default_factory=LlamaModelStatus)


class LlamaServer(ApiModel):
    """A LlamaServer object as stored in the API."""

    model_config = {**ApiModel.model_config, "extra": "ignore"}

    api_version: Literal["llamacpp.dev/v1alpha1"] = API_VERSION
    kind: Literal["LlamaServer"] = "LlamaServer"
    metadata: ObjectMeta
    spec: LlamaServerSpec
    status: LlamaServerStatus = Field(default_factory=LlamaServerStatus)
