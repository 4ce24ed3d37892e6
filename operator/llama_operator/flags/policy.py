"""Which llama-server flags users may pass in `spec.args` / `spec.env`, and why the others are refused.

The policy is a table over the catalog's canonical (long) names. Every refused flag has a category and a
message; where a typed LlamaServer field does the job, the message names it. Anything not listed here is
allowed, subject to the value checks in validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Category = Literal["managed", "typed-field", "exits", "outside", "removed", "deprecated"]


@dataclass(frozen=True)
class Refusal:
    """Why a flag is not allowed in args/env."""

    category: Category
    reason: str


def _managed(reason: str) -> Refusal:
    return Refusal("managed", f"is managed by the operator: {reason}")


def _typed(field: str) -> Refusal:
    return Refusal("typed-field", f"has a typed field: use spec.{field} instead")


def _outside(reason: str) -> Refusal:
    return Refusal("outside", f"is not allowed: {reason}")


_MODEL_SOURCE = _managed("the model comes from spec.modelRef (a LlamaModel)")
_PRESET = _managed("preset flags download their own model; use spec.modelRef")
_ADAPTERS = _managed("LoRA adapters are LlamaModels with spec.adapterFor, listed in spec.adapters")
_ROUTER = _managed("router mode is spec.models (one section per LlamaModel) and spec.maxLoaded")
_LISTEN = _managed("the pod always listens on 0.0.0.0:8080; use spec.service to expose it")
_TLS = _managed("TLS terminates outside the pod (Service, Ingress or mesh)")
_API_KEY = _managed("use spec.apiKeySecretRef")
_LOGS = _managed("llama-server logs to stdout so `kubectl logs` works")
_EXITS = Refusal("exits", "prints something and exits: the container would restart in a loop")
_CORS = _outside("CORS is configured in front of the Service, not in the pod")
_TOOLS = _outside("built-in agent tools and MCP run commands and reach outside the pod")

REFUSED: dict[str, Refusal] = {
    # model and model source
    "--model": _MODEL_SOURCE,
    "--model-url": _MODEL_SOURCE,
    "--docker-repo": _MODEL_SOURCE,
    "--hf-repo": _MODEL_SOURCE,
    "--hf-file": _MODEL_SOURCE,
    "--hf-token": _managed("the token belongs to the LlamaModel (spec.source.huggingFace.tokenSecretRef)"),
    "--spec-draft-hf": _typed("speculative.draftModelRef"),
    "--mmproj-url": _outside("it downloads from the internet at start; put files on a volume"),
    "--mmproj": _managed("the multimodal projector comes from the LlamaModel's spec.mmproj"),
    # LoRA adapters: LlamaModels with spec.adapterFor, listed in the LlamaServer's spec.adapters
    "--lora": _ADAPTERS,
    "--lora-scaled": _ADAPTERS,
    "--lora-init-without-apply": _ADAPTERS,
    # presets that pick and download a model
    **{
        name: _PRESET
        for name in (
            "--embd-gemma-default", "--fim-qwen-1.5b-default", "--fim-qwen-3b-default", "--fim-qwen-7b-default",
            "--fim-qwen-7b-spec", "--fim-qwen-14b-spec", "--fim-qwen-30b-default", "--gpt-oss-20b-default",
            "--gpt-oss-120b-default", "--vision-gemma-4b-default", "--vision-gemma-12b-default",
            "--spec-default",
        )
    },  # fmt: skip
    # router mode
    "--models-dir": _ROUTER,
    "--models-preset": _ROUTER,
    "--models-max": _ROUTER,
    "--models-autoload": _ROUTER,
    # listening, TLS, auth, identity, metrics, logs
    "--host": _LISTEN,
    "--port": _LISTEN,
    "--reuse-port": _LISTEN,
    "--path": _managed("the pod serves the API only, not static files"),
    "--api-prefix": _managed("the Service endpoint is http://<name>.<namespace>.svc:<port>/v1"),
    "--ssl-key-file": _TLS,
    "--ssl-cert-file": _TLS,
    "--api-key": _API_KEY,
    "--api-key-file": _API_KEY,
    "--alias": _typed("alias"),
    "--metrics": _managed("the /metrics endpoint is always on"),
    "--log-file": _LOGS,
    "--log-disable": _LOGS,
    # print-and-exit flags
    "--help": _EXITS,
    "--version": _EXITS,
    "--cache-list": _EXITS,
    "--completion-bash": _EXITS,
    "--list-devices": _EXITS,
    # reach outside the pod or open tools
    "--media-path": _outside("it serves local files to API clients through file:// URLs"),
    "--slot-save-path": _managed("spec.promptCache.persist keeps the slots on the model's claim, pruned to its "
                                 "maxSize (a path of your own would let API clients fill it)"),
    "--log-prompts-dir": _outside("it writes every user prompt to disk"),
    "--rpc": _managed("spec.distributed makes the RPC workers and passes their addresses; workers of your own "
                      "would receive the model's tensors over an unauthenticated protocol (docs/distributed.md)"),
    "--tools": _TOOLS,
    "--tools-runtime": _TOOLS,
    "--agent": _TOOLS,
    "--mcp-servers-config": _TOOLS,
    "--mcp-servers-json": _TOOLS,
    "--ui-mcp-proxy": _TOOLS,
    "--cors-origins": _CORS,
    "--cors-methods": _CORS,
    "--cors-headers": _CORS,
    "--cors-credentials": _CORS,
    # flags with a typed LlamaServer field
    "--ctx-size": _typed("contextSize"),
    "--parallel": _typed("parallel"),
    "--flash-attn": _typed("flashAttention"),
    "--cache-type-k": _typed("cacheTypeK"),
    "--cache-type-v": _typed("cacheTypeV"),
    "--batch-size": _typed("batchSize"),
    "--ubatch-size": _typed("ubatchSize"),
    "--gpu-layers": _typed("gpuLayers"),
    "--split-mode": _typed("splitMode"),
    "--tensor-split": _typed("tensorSplit"),
    "--threads": _typed("threads"),
    "--embedding": _typed("mode (embedding)"),
    "--rerank": _typed("mode (rerank)"),
    "--chat-template": _typed("chatTemplate"),
    "--load-mode": _typed("loadMode"),
    "--spec-draft-model": _typed("speculative.draftModelRef"),
    "--spec-draft-n-max": _typed("speculative.draftMax"),
    "--spec-draft-n-min": _typed("speculative.draftMin"),
    "--spec-draft-p-min": _typed("speculative.draftPMin"),
    "--spec-draft-ngl": _typed("speculative.draftGpuLayers"),
}
"""Refused options by canonical name (Option.canonical); every spelling and the env var share the entry."""

REMOVED: dict[str, str] = {
    # Gone from llama.cpp entirely (not in the catalog): llama-server says "invalid argument".
    "--mlock": "use spec.loadMode: mlock (--load-mode mlock)",
    "--no-mmap": "use spec.loadMode: none (--load-mode none)",
    "--mmap": "use spec.loadMode: mmap (--load-mode mmap)",
    "--no-mlock": "leave spec.loadMode unset (--load-mode auto)",
    "--draft-max": "use spec.speculative.draftMax (--spec-draft-n-max)",
    "--draft-min": "use spec.speculative.draftMin (--spec-draft-n-min)",
    "--draft": "use spec.speculative.draftMax (--spec-draft-n-max)",
    "--draft-n": "use spec.speculative.draftMax (--spec-draft-n-max)",
    "--draft-n-min": "use spec.speculative.draftMin (--spec-draft-n-min)",
}
"""Removed spellings and their replacement; checked before the catalog (some are still listed there,
answering "the argument has been removed")."""

RANGES: dict[str, tuple[float | None, float | None]] = {
    # Documented ranges llama.cpp's parser does not enforce (it takes --poll 200 and --top-p 7).
    "--poll": (0, 100),
    "--prio": (-1, 3),
    "--prio-batch": (0, 3),
    "--spec-draft-prio": (0, 3),
    "--spec-draft-prio-batch": (0, 3),
    "--threads-batch": (-1, 1024),
    "--spec-draft-threads": (-1, 1024),
    "--spec-draft-threads-batch": (-1, 1024),
    "--threads-http": (-1, 1024),
    "--predict": (-1, None),
    "--keep": (-1, None),
    "--top-k": (0, None),
    "--top-p": (0, 1),
    "--min-p": (0, 1),
    "--typical": (0, 1),
    "--xtc-probability": (0, 1),
    "--xtc-threshold": (0, 1),
    "--temp": (0, None),
    "--repeat-last-n": (-1, None),
    "--mirostat": (0, 2),
    "--adaptive-decay": (0, 0.99),
    "--main-gpu": (0, 15),
    "--n-cpu-moe": (0, None),
    "--n-cpu-ffn": (0, None),
    "--timeout": (1, None),
    "--cache-reuse": (0, None),
    "--cache-ram": (-1, None),
    "--ctx-checkpoints": (0, None),
    "--checkpoint-min-step": (0, None),
    "--reasoning-budget": (-1, None),
    "--sleep-idle-seconds": (1, None),  # llama.cpp refuses 0; -1 (disabled) is the default: omit the flag
    "--repeat-penalty": (0.01, None),  # llama.cpp: finite and > 0
    "--dry-penalty-last-n": (-1, None),
    # llama.cpp's own limits for the n-gram speculative settings
    "--spec-ngram-mod-n-min": (0, 1024),
    "--spec-ngram-mod-n-max": (0, 1024),
    "--spec-ngram-mod-n-match": (1, 1024),
    "--spec-ngram-simple-size-n": (1, 1024),
    "--spec-ngram-simple-size-m": (1, 1024),
    "--spec-ngram-simple-min-hits": (1, None),
    "--spec-ngram-map-k-size-n": (1, 1024),
    "--spec-ngram-map-k-size-m": (1, 1024),
    "--spec-ngram-map-k-min-hits": (1, None),
    "--spec-ngram-map-k4v-size-n": (1, 1024),
    "--spec-ngram-map-k4v-size-m": (1, 1024),
    "--spec-ngram-map-k4v-min-hits": (1, None),
    "--embd-normalize": (-1, None),
    "--image-min-tokens": (1, None),
    "--image-max-tokens": (1, None),
    "--kv-unified-per-slot": (1, None),
    "--fit-ctx": (0, None),
    "--sse-ping-interval": (-1, None),
    "--slot-prompt-similarity": (0, 1),
}
"""Inclusive bounds by canonical name (None = open)."""

INT32 = (-(2**31), 2**31 - 1)  # llama.cpp parses ints with std::stoi


def refusal(canonical: str) -> Refusal | None:
    """Why an option may not be set through args or env, or None if it may."""
    return REFUSED.get(canonical)


def flag_for_field(field: str) -> str | None:
    """The canonical flag of a typed field (for messages): 'contextSize' -> '--ctx-size'."""
    for flag, rule in REFUSED.items():
        if rule.category == "typed-field" and rule.reason.endswith(f"spec.{field} instead"):
            return flag
    return None
