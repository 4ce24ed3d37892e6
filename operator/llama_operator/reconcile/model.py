"""Reconciles one LlamaModel: resolve its source into status (files, size, sha256, cache key) and apply the
cache PVC when the cache type asks for one."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import ValidationError

from ..api.errors import describe
from ..api.v1alpha1 import LlamaModel, LlamaModelStatus, ModelFile
from ..builders import build_cache_pvc
from ..builders.cache import cache_type
from ..config import Settings
from ..kube import LLAMA_MODELS
from .conditions import condition, merge_conditions, now_rfc3339
from .context import Context

log = logging.getLogger(__name__)

Resolver = Callable[[LlamaModel, Context], Awaitable[LlamaModelStatus]]


def _source_url(model: LlamaModel, hf_endpoint: str) -> str | None:
    source = model.spec.source
    if source.hugging_face is not None:
        hf = source.hugging_face
        return f"{hf_endpoint}/{hf.repo}/resolve/{hf.revision}/{hf.file}"
    if source.http is not None:
        return source.http.url
    return None


def offline_status(model: LlamaModel, settings: Settings) -> LlamaModelStatus:
    """What the spec alone says, without network: the fetcher resolves the rest at download time."""
    from ..sources import cache_key

    file = ModelFile(
        name=model.spec.source.file_name,
        url=_source_url(model, settings.huggingface_endpoint),
        sha256=model.spec.sha256,
    )
    return LlamaModelStatus(
        phase="Ready", files=[file], sha256=model.spec.sha256, cache_key=cache_key(model.spec, model.spec.sha256)
    )


async def status_from_spec(model: LlamaModel, ctx: Context) -> LlamaModelStatus:
    return offline_status(model, ctx.settings)


async def reconcile_model(
    body: Mapping[str, Any], ctx: Context, resolve: Resolver = status_from_spec
) -> LlamaModelStatus:
    meta = body["metadata"]
    generation = meta.get("generation")
    try:
        previous = LlamaModelStatus.model_validate(body.get("status") or {})
    except ValidationError:
        previous = LlamaModelStatus()
    try:
        model = LlamaModel.model_validate(body)
    except ValidationError as exc:
        message = "; ".join(describe(exc))
        status = LlamaModelStatus(phase="Failed", message=message, conditions=[
            condition("Ready", False, "InvalidSpec", message, generation=generation)])
        return await _write(ctx, body, previous, status, generation)

    status = await resolve(model, ctx)
    resolved = model.model_copy(update={"status": status})
    pvc = build_cache_pvc(resolved, ctx.settings)
    notes = []
    if pvc is not None:
        await ctx.kube.apply(pvc)
        modes = pvc["spec"]["accessModes"]
        if modes == ["ReadWriteOnce"]:
            notes.append(f"cache PVC {pvc['metadata']['name']} is ReadWriteOnce: every replica runs on the node "
                         "that mounts it (use accessModes [ReadWriteMany] to spread replicas)")
    elif cache_type(resolved, ctx.settings) == "PersistentVolumeClaim":
        status = status.model_copy(update={"phase": "Pending"})
        notes.append("cache.size is needed to create the cache PVC until the model size is known")
    ready = status.phase == "Ready"
    message = "; ".join(filter(None, [status.message, *notes]))
    status = status.model_copy(update={
        "message": message or None,
        "conditions": [condition("Ready", ready, "Resolved" if ready else status.phase or "Pending", message,
                                 generation=generation)],
    })
    return await _write(ctx, body, previous, status, generation)


async def _write(
    ctx: Context, body: Mapping[str, Any], previous: LlamaModelStatus, status: LlamaModelStatus, generation: int | None
) -> LlamaModelStatus:
    meta = body["metadata"]
    status = status.model_copy(update={
        "observed_generation": generation,
        "conditions": merge_conditions(previous.conditions, status.conditions or [], now=now_rfc3339()),
    })
    if status == previous:
        return status
    if status.phase != previous.phase:
        event_type = "Warning" if status.phase == "Failed" else "Normal"
        ctx.record_event(body, type=event_type, reason=status.phase or "Pending",
                         message=status.message or f"LlamaModel is {status.phase}")
    wire = status.to_wire()
    cleared = {key: None for key in previous.to_wire() if key not in wire}
    await ctx.kube.patch_status(LLAMA_MODELS, meta["namespace"], meta["name"], {**wire, **cleared})
    log.info("LlamaModel %s/%s is %s%s", meta["namespace"], meta["name"], status.phase,
             f": {status.message}" if status.message else "")
    return status
