"""The llama-server arguments of a one-model LlamaServer (what its models rule out: flags/spec.py)."""

from __future__ import annotations

from ..api.v1beta1 import LlamaModel, LlamaServer
from ..contract import SLOTS_MOUNT
from ..flags.render import render_args
from .cache import mmproj_path, model_path
from .naming import model_name
from .resources import derived_threads


def draft_model_path(draft: LlamaModel) -> str:
    """The draft model is fetched into the served model's cache volume, under its own cache key (the plan has
    refused a draft that cannot be: flags/spec.py model_problems)."""
    return model_path(draft)


def needs_draft_cache(model: LlamaModel, draft: LlamaModel | None) -> bool:
    """Whether the pod needs a cache volume for the draft alone: the served model comes from a volume."""
    return draft is not None and model.spec.source.volume is not None


def server_args(server: LlamaServer, model: LlamaModel, draft: LlamaModel | None = None,
                adapters: tuple[LlamaModel, ...] = ()) -> list[str]:
    return render_args(
        server.spec,
        model_path=model_path(model),
        model_name=model_name(server),
        threads=derived_threads(server),
        draft_model_path=draft_model_path(draft) if draft is not None else None,
        mmproj_path=mmproj_path(model),
        adapter_paths=[model_path(adapter) for adapter in adapters],
        slot_save_path=SLOTS_MOUNT if server.spec.keeps_prompt_cache() else None,
    )
