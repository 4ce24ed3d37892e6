"""The llama-server arguments of a one-model LlamaServer, and what its referenced models rule out."""

from __future__ import annotations

from ..api.v1alpha1 import LlamaModel, LlamaServer
from ..errors import InvalidSpec
from ..flags.render import render_args
from .cache import mmproj_path, model_path
from .naming import model_name
from .resources import derived_threads


def model_problems(draft: LlamaModel | None) -> list[str]:
    """What cannot be built from the referenced models; each problem names the LlamaServer field.

    The reconcile and `render` ask this before building, so a bad combination is a status, not an exception.
    """
    if draft is not None and draft.spec.source.volume is not None:
        return [
            f"spec.speculative.draftModelRef: LlamaModel {draft.metadata.name} has a volume source; a draft model "
            "must be downloadable (huggingFace or http source): it is fetched into the served model's cache"
        ]
    return []


def draft_model_path(draft: LlamaModel) -> str:
    """The draft model is fetched into the served model's cache volume, under its own cache key."""
    problems = model_problems(draft)
    if problems:
        raise InvalidSpec(problems[0])
    return model_path(draft)


def needs_draft_cache(model: LlamaModel, draft: LlamaModel | None) -> bool:
    """Whether the pod needs a cache volume for the draft alone: the served model comes from a volume."""
    return draft is not None and model.spec.source.volume is not None


def server_args(server: LlamaServer, model: LlamaModel, draft: LlamaModel | None = None) -> list[str]:
    return render_args(
        server.spec,
        model_path=model_path(model),
        model_name=model_name(server),
        threads=derived_threads(server),
        draft_model_path=draft_model_path(draft) if draft is not None else None,
        mmproj_path=mmproj_path(model),
    )
