"""Renders a LlamaServer's typed settings into llama-server arguments: one small pure function per flag.

Each function takes the spec and returns the flag and its value (or nothing). The managed flags (model,
host, port, alias, metrics) come first, then the typed settings, `--no-slots` (unless the spec asks for /slots),
then the user's validated `args`.
Render only specs that `validate.validate_server_spec` passed: it guarantees no flag is emitted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..api.v1beta1 import LlamaServerSpec
from ..contract import CACHE_RAM_FLAGS, adapters_cache_ram

SERVER_PORT = 8080
"""The port llama-server listens on inside the pod, whatever the Service port."""

Rendered = list[str]


def context_size(spec: LlamaServerSpec) -> Rendered:
    if spec.context_size == "auto":  # the plan replaces it with the number that fits (builders/context.py)
        raise ValueError("contextSize auto must be resolved before rendering")
    return [] if spec.context_size is None else ["--ctx-size", str(spec.context_size)]


def parallel(spec: LlamaServerSpec) -> Rendered:
    return [] if spec.parallel is None else ["--parallel", str(spec.parallel)]


def flash_attention(spec: LlamaServerSpec) -> Rendered:
    return [] if spec.flash_attention is None else ["--flash-attn", spec.flash_attention]


def cache_type_k(spec: LlamaServerSpec) -> Rendered:
    return [] if spec.cache_type_k is None else ["--cache-type-k", spec.cache_type_k]


def cache_type_v(spec: LlamaServerSpec) -> Rendered:
    return [] if spec.cache_type_v is None else ["--cache-type-v", spec.cache_type_v]


def batch_size(spec: LlamaServerSpec) -> Rendered:
    return [] if spec.batch_size is None else ["--batch-size", str(spec.batch_size)]


def ubatch_size(spec: LlamaServerSpec) -> Rendered:
    if spec.ubatch_size is not None:
        return ["--ubatch-size", str(spec.ubatch_size)]
    # Embedding and rerank encode each input in one physical batch: follow batchSize instead of
    # letting llama-server override it at load time.
    if spec.mode != "chat" and spec.batch_size is not None:
        return ["--ubatch-size", str(spec.batch_size)]
    return []


def gpu_layers(spec: LlamaServerSpec) -> Rendered:
    # With a GPU, offload everything unless told otherwise; on CPU the flag is meaningless.
    if spec.gpu_layers is not None:
        return ["--n-gpu-layers", str(spec.gpu_layers)]
    return ["--n-gpu-layers", "all"] if spec.gpu is not None else []


def split_mode(spec: LlamaServerSpec) -> Rendered:
    return [] if spec.split_mode is None else ["--split-mode", spec.split_mode]


def tensor_split(spec: LlamaServerSpec) -> Rendered:
    if not spec.tensor_split:
        return []
    return ["--tensor-split", ",".join(f"{share:g}" for share in spec.tensor_split)]


def mode(spec: LlamaServerSpec) -> Rendered:
    return {"chat": [], "embedding": ["--embedding"], "rerank": ["--reranking"]}[spec.mode]


def chat_template(spec: LlamaServerSpec) -> Rendered:
    # A built-in template is llama.cpp's own formatter, which Jinja (on by default) bypasses: with Jinja on,
    # --chat-template takes template text, and `llama3` would be rendered as the literal prompt "llama3".
    return [] if spec.chat_template is None else ["--no-jinja", "--chat-template", spec.chat_template]


def load_mode(spec: LlamaServerSpec) -> Rendered:
    return [] if spec.load_mode is None else ["--load-mode", spec.load_mode]


def speculative_settings(spec: LlamaServerSpec) -> Rendered:
    """Draft tuning; the draft model's path comes from the caller (see draft_model_arg)."""
    draft = spec.speculative
    if draft is None:
        return []
    args = ["--spec-type", "draft-simple"]
    if draft.draft_max is not None:
        args += ["--spec-draft-n-max", str(draft.draft_max)]
    if draft.draft_min is not None:
        args += ["--spec-draft-n-min", str(draft.draft_min)]
    if draft.draft_p_min is not None:
        args += ["--spec-draft-p-min", f"{draft.draft_p_min:g}"]
    if draft.draft_gpu_layers is not None:
        args += ["--spec-draft-ngl", str(draft.draft_gpu_layers)]
    elif spec.gpu is not None:
        args += ["--spec-draft-ngl", "all"]
    return args


def draft_model_arg(spec: LlamaServerSpec, draft_model_path: str | None) -> Rendered:
    if spec.speculative is None:
        return []
    if draft_model_path is None:
        raise ValueError("spec.speculative is set: render_args needs draft_model_path")
    return ["--spec-draft-model", draft_model_path]


def adapter_args(spec: LlamaServerSpec, paths: Sequence[str]) -> Rendered:
    """Every LoRA adapter loaded at start at scale 0, in spec.adapters' order (llama-server's ids): a request
    without a `lora` field is the base model, and one applies an adapter with `"lora": [{"id", "scale"}]` (the
    gateway adds it for `<model>:<adapter>`). Not `--lora` with `--lora-init-without-apply`: b11312 keeps scale 1
    for `--lora` adapters and a request without `lora` gets them all (tests/runtime/test_gateway_adapters.py).
    One flag for all of them: the repeated `--lora*` flags are deprecated ("only last value will be used"). The host
    prompt cache off unless args or env set it (contract.adapters_cache_ram says why)."""
    if len(paths) != len(spec.adapters or []):
        raise ValueError(f"spec.adapters has {len(spec.adapters or [])} adapters: render_args needs their paths")
    if not paths:
        return []
    cache_ram = adapters_cache_ram(spec.args or [], [env.name for env in spec.env or []])
    return ["--lora-scaled", ",".join(f"{path}:0" for path in paths),
            *([CACHE_RAM_FLAGS[1], cache_ram] if cache_ram is not None else [])]


TYPED_RENDERERS: Sequence[Callable[[LlamaServerSpec], Rendered]] = (
    context_size,
    parallel,
    flash_attention,
    cache_type_k,
    cache_type_v,
    batch_size,
    ubatch_size,
    gpu_layers,
    split_mode,
    tensor_split,
    mode,
    chat_template,
    load_mode,
    speculative_settings,
)


def managed_args(*, model_path: str, model_name: str, mmproj_path: str | None = None) -> Rendered:
    """Flags the operator owns: users cannot set these through `args`."""
    return [
        "--model", model_path,
        *(["--mmproj", mmproj_path] if mmproj_path else []),
        "--host", "0.0.0.0",
        "--port", str(SERVER_PORT),
        "--alias", model_name,
        "--metrics",
    ]  # fmt: skip


def threads_arg(threads: int | None) -> Rendered:
    return [] if threads is None else ["--threads", str(threads)]


SLOTS_FLAGS = ("--slots", "--no-slots")
SLOTS_ENV = "LLAMA_ARG_ENDPOINT_SLOTS"
"""The environment variable llama-server reads as --slots/--no-slots (the catalog's `env` of `--slots`)."""


def slots_arg(spec: LlamaServerSpec) -> Rendered:
    """`--no-slots` unless the server says otherwise (`--slots` or `--no-slots` in args, or LLAMA_ARG_ENDPOINT_SLOTS
    in env): llama-server's /slots shows every slot's task and sampling settings to anyone who reaches the pod,
    and it is on by default (docs/security.md#network)."""
    if any(arg in SLOTS_FLAGS for arg in spec.args or []) or any(var.name == SLOTS_ENV for var in spec.env or []):
        return []
    return ["--no-slots"]


def render_args(
    spec: LlamaServerSpec,
    *,
    model_path: str,
    model_name: str,
    threads: int | None,
    draft_model_path: str | None = None,
    mmproj_path: str | None = None,
    adapter_paths: Sequence[str] = (),
    slot_save_path: str | None = None,
) -> Rendered:
    """The complete llama-server argument list for a validated spec.

    `threads` is the caller's resolved value (spec.threads, or derived from the CPU limit): llama-server's
    own default is the host's physical cores, which ignores the container's CPU limit.
    `draft_model_path` is where the speculative draft LlamaModel's file is in the pod (required when
    spec.speculative is set); `mmproj_path` where the LlamaModel's multimodal projector is (spec.mmproj);
    `adapter_paths` where each of spec.adapters is, in order; `slot_save_path` the directory of the kept prompt
    caches (spec.promptCache.persist: builders/prompt_cache.py).
    """
    args = managed_args(model_path=model_path, model_name=model_name, mmproj_path=mmproj_path)
    args += draft_model_arg(spec, draft_model_path)
    args += adapter_args(spec, adapter_paths)
    for render in TYPED_RENDERERS:
        args += render(spec)
    args += threads_arg(threads)
    args += slots_arg(spec)
    if slot_save_path is not None:
        args += ["--slot-save-path", slot_save_path]
    if spec.keeps_prompt_cache() and "--swa-full" not in (spec.args or []):
        args.append("--swa-full")  # LlamaServerSpec.keeps_prompt_cache says why
    args += list(spec.args or [])
    return args
