"""The CEL tables of LlamaServer: cross-field rules of its spec, its speculative, scaling and router settings.

Each table is attached to its model in llamaserver_types.py (`cel_schema`), so the API server enforces it at
`kubectl apply`, and the operator evaluates the same rules' Python predicates (api/cel.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..cel import Rule, snake

if TYPE_CHECKING:
    from .llamaserver_types import LlamaServerSpec, ServedModel

ARGS_MAX_ITEMS = 128
ARG_MAX_LENGTH = 2048
"""Bounds of spec.args (the API server estimates a rule's cost from them: CEL rules look into args). 128 x 2 KiB:
the spec's args and their copy in status.args stay far below the API server's object size limit."""
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


SCALING_RULES = (
    Rule("min-above-max", "self.minReplicas <= self.maxReplicas",
         lambda s: s.min_replicas <= s.max_replicas,
         "minReplicas ({minReplicas}) must be <= maxReplicas ({maxReplicas})", field="minReplicas"),
)

_PERCENT = re.compile(r"(100|[1-9]?[0-9])%")
BUDGET_RULES = (
    Rule("disruption-budget", "type(self) == int ? self >= 0 : self.matches('^(100|[1-9]?[0-9])%$')",
         lambda v: v >= 0 if isinstance(v, int) else _PERCENT.fullmatch(v) is not None,
         "must be a number >= 0 or a percentage (0%-100%)"),
)
"""A PodDisruptionBudget's maxUnavailable or minAvailable: pods, or a percentage of spec.replicas."""

DISRUPTION_RULES = (
    Rule("one-disruption-budget", "has(self.maxUnavailable) != has(self.minAvailable)",
         lambda d: (d.max_unavailable is None) != (d.min_available is None),
         "set exactly one of maxUnavailable and minAvailable"),
)


def _gpus(spec: LlamaServerSpec) -> int:
    return spec.gpu.count if spec.gpu else 0


def _context_budget_given(spec: LlamaServerSpec) -> bool:
    """contextSize auto has a memory to size to: gpu.memory on a GPU server, else resources.limits.memory."""
    if spec.context_size != "auto":
        return True
    if spec.gpu is not None:
        return spec.gpu.memory is not None
    limits = spec.resources.limits if spec.resources is not None else None
    return bool(limits) and "memory" in limits


def _pooling_value(args: list[str] | None) -> str | None:
    """The item after the first `--pooling` in args ('' when it is last), None without `--pooling`."""
    if not args or "--pooling" not in args:
        return None
    index = args.index("--pooling") + 1
    return args[index] if index < len(args) else ""


# Cross-field rules of the typed llama-server settings. The API server checks them at `kubectl apply`; the
# operator checks them with the flags (flags/validate.py) for objects that got past an older CRD.
_NO_KEPT_CACHE = "!has(self.promptCache) || !has(self.promptCache.persist) || !self.promptCache.persist"


def _keeps_cache(spec: LlamaServerSpec) -> bool:
    return spec.prompt_cache is not None and spec.prompt_cache.persist


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
    Rule("adapters-with-models", "!has(self.adapters) || !has(self.models)",
         lambda s: s.adapters is None or s.models is None,
         "adapters are served with one model (spec.modelRef); router mode (spec.models) loads none",
         field="adapters"),
    Rule("adapters-mode", "!has(self.adapters) || !has(self.mode) || self.mode == 'chat'",
         lambda s: s.adapters is None or s.mode == "chat",
         "adapters change generated text; mode {mode} generates none", field="adapters"),
    Rule("duplicate-adapter",
         "!has(self.adapters) || self.adapters.all(a, self.adapters.filter(o, o.name == a.name).size() == 1)",
         lambda s: len({a.name for a in s.adapters or []}) == len(s.adapters or []),
         "an adapter is listed twice in spec.adapters", field="adapters"),
    Rule("prompt-cache-with-adapters", f"{_NO_KEPT_CACHE} || !has(self.adapters)",
         lambda s: not _keeps_cache(s) or s.adapters is None,
         "promptCache.persist cannot be used with adapters: a saved slot does not record which adapter computed "
         "it, so a restore could answer a base-model request from an adapter's cache", field="promptCache"),
    Rule("context-auto-needs-budget",
         "!has(self.contextSize) || type(self.contextSize) == int || self.contextSize != 'auto' "
         "|| (has(self.gpu) ? has(self.gpu.memory) "
         ": (has(self.resources) && has(self.resources.limits) && 'memory' in self.resources.limits))",
         _context_budget_given,
         "contextSize auto sizes the context to the memory: set resources.limits.memory (with gpu: gpu.memory, "
         "the memory of one GPU), or give contextSize a number", field="contextSize"),
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



def _unset_with_distributed(field: str) -> Callable[[LlamaServerSpec], bool]:
    attribute = snake(field)
    return lambda s: s.distributed is None or getattr(s, attribute) is None


_DISTRIBUTED_EXCLUDES = (
    ("models", "router mode loads and unloads models at run time; a split is placed once, for one model"),
    ("scaling", "the leader and its workers are one replica; the gateway does not scale a split"),
    ("gpu", "the leader's own GPU is not a device of the split yet: give the workers GPUs (distributed.gpu)"),
    ("gpuLayers", "the operator sets -ngl from the placement (status.distributed.gpuLayers)"),
    ("tensorSplit", "the operator sets --tensor-split from the placement (status.distributed.tensorSplit)"),
    ("splitMode", "a split over workers is by layer"),
    ("speculative", "a draft model beside a split is not supported yet"),
    ("adapters", "adapters on a split are not supported yet"),
    ("promptCache", "a split's prompt cache is not kept yet"),
)
DISTRIBUTED_RULES = (
    *(Rule("distributed-excludes", f"!has(self.distributed) || !has(self.{name})",
           _unset_with_distributed(name), f"distributed cannot be used with {name}: {why}", field="distributed")
      for name, why in _DISTRIBUTED_EXCLUDES),
    Rule("distributed-one-replica", "!has(self.distributed) || !has(self.replicas) || self.replicas <= 1",
         lambda s: s.distributed is None or s.replicas <= 1,
         "distributed serves one replica (a leader and its workers); replicas is {replicas}", field="replicas"),
)
"""Rules of a server split over RPC workers (spec.distributed, docs/distributed.md)."""
