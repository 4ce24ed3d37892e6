"""Reconciles one LlamaModel: resolve its source into status (files, size, sha256, cache key) and apply the
cache PVC when the cache type asks for one.

Source credentials are read here, only from Secrets that opt in (`fetch.secrets.SOURCE_CREDENTIALS_LABEL` or
`SOURCE_CREDENTIALS_TYPE`), cleaned, and every message of the resolution is scrubbed of their values before it
reaches status, an Event or the log."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .. import sources
from ..api.errors import describe
from ..api.v1beta1 import LlamaModel, LlamaModelStatus, ModelFile
from ..builders import build_cache_pvc
from ..builders.cache import cache_type
from ..builders.trust import build_trust_configmap
from ..clock import now_rfc3339, parse_rfc3339, rfc3339
from ..config import Settings
from ..errors import InvalidSecret, OperatorError, RetryLater, SecretNotAllowed
from ..fetch.secrets import SOURCE_CREDENTIALS_LABEL, SOURCE_CREDENTIALS_TYPE, check_header_name, clean, scrub
from ..kube import CONFIG_MAPS, LLAMA_MODELS, PERSISTENT_VOLUME_CLAIMS, SECRETS, Invalid, NotFound
from ..metrics import PHASES
from ..policy import model_policy_problems
from .boundary import reconciled
from .conditions import condition, merge_conditions
from .context import Context

log = logging.getLogger(__name__)

WAITS_ON_SECRET = (SecretNotAllowed.reason, InvalidSecret.reason)
"""Ready reasons fixed by editing a Secret, not the spec: resolved again with backoff (Secrets are not watched)."""


def offline_status(model: LlamaModel, settings: Settings) -> LlamaModelStatus:
    """What the spec alone says, without network: the fetcher resolves the rest at download time."""
    file = ModelFile(
        name=model.spec.source.file_name,
        url=sources.source_url(model.spec, settings.huggingface_endpoint),
        sha256=model.spec.sha256,
    )
    sha256 = model.spec.sha256
    mmproj = None
    if model.spec.mmproj is not None:
        mmproj = ModelFile(name=model.spec.mmproj.file_name, sha256=model.spec.mmproj.sha256,
                           url=sources.mmproj_url(model.spec, settings.huggingface_endpoint))
    return LlamaModelStatus(phase="Ready", files=[file], sha256=sha256, mmproj=mmproj,
                            cache_key=sources.cache_key(model.spec, sha256))


async def _source_secret(ctx: Context, namespace: str, name: str, known: list[str]) -> dict[str, str]:
    """Every key of a Secret that opted in as source credentials, decoded; the raw values go into `known`."""
    secret = await ctx.kube.get(SECRETS, namespace, name)
    if secret is None:
        raise NotFound(f"Secret {namespace}/{name} not found", status=404)
    labels = (secret.get("metadata") or {}).get("labels") or {}
    if labels.get(SOURCE_CREDENTIALS_LABEL) != "true" and secret.get("type") != SOURCE_CREDENTIALS_TYPE:
        raise SecretNotAllowed(
            f"Secret {namespace}/{name} is not marked as model source credentials: label it "
            f"(kubectl label secret -n {namespace} {name} {SOURCE_CREDENTIALS_LABEL}=true) or give it the type "
            f"{SOURCE_CREDENTIALS_TYPE}; retrying")
    values = {}
    for key, encoded in (secret.get("data") or {}).items():
        try:
            values[key] = base64.b64decode(encoded).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidSecret(f"Secret {namespace}/{name} key {key!r}: the value is not UTF-8 text") from None
        known.append(values[key])
    return values


async def _secrets(model: LlamaModel, ctx: Context, known: list[str]) -> tuple[str | None, dict[str, str]]:
    """The source's credentials, read from Secrets at the moment they are needed and never stored; every value
    read is appended to `known` (for scrubbing) before it is checked."""
    namespace, source = model.metadata.namespace, model.spec.source
    token: str | None = None
    headers: dict[str, str] = {}
    if source.hugging_face is not None and source.hugging_face.token_secret_ref is not None:
        ref = source.hugging_face.token_secret_ref
        data = await _source_secret(ctx, namespace, ref.name, known)
        if ref.key not in data:
            raise NotFound(f"Secret {namespace}/{ref.name} has no key {ref.key!r}", status=404)
        token = clean(data[ref.key], where=f"Secret {namespace}/{ref.name} key {ref.key!r}") or None
    if source.http is not None and source.http.headers_secret_ref is not None:
        name = source.http.headers_secret_ref.name
        for key, value in (await _source_secret(ctx, namespace, name, known)).items():
            check_header_name(key, where=f"Secret {namespace}/{name}")
            headers[key] = clean(value, where=f"Secret {namespace}/{name} key {key!r}")
    return token, headers


async def resolve_source(model: LlamaModel, ctx: Context) -> LlamaModelStatus:
    """Inspect the source over the network: files, sizes, sha256, GGUF header. Never downloads weights.

    Every message is scrubbed of the Secret values read for it (a remote host or the HTTP stack may echo them).
    """
    known: list[str] = []
    try:
        token, headers = await _secrets(model, ctx, known)
        resolved = await sources.resolve(model.spec, settings=ctx.settings, hf_token=token, headers=headers)
    except NotFound as exc:
        # Secrets are not watched: a Secret created later is picked up by the retry.
        return LlamaModelStatus(phase="Resolving", message=f"{exc}; retrying until it exists")
    except sources.SourceUnreachable as exc:
        return LlamaModelStatus(phase="Resolving", message=scrub(f"source unreachable, retrying: {exc}", known))
    except sources.SourceError as exc:
        message = scrub(str(exc), known)
        return LlamaModelStatus(phase="Failed", message=message, conditions=[
            condition("Ready", False, exc.reason, message, generation=model.metadata.generation)])
    except OperatorError:
        raise  # API trouble keeps its class (and retry policy); its messages never hold a Secret value
    except Exception as exc:  # noqa: BLE001 - a bug's message may hold a value: only its scrubbed text goes on
        raise RuntimeError(scrub(f"{type(exc).__name__}: {exc}", known)) from None
    return LlamaModelStatus(
        phase="Ready",
        files=resolved.files,
        size=resolved.size,
        sha256=resolved.sha256,
        gguf=resolved.gguf,
        cache_key=resolved.cache_key,
        mmproj=resolved.mmproj,
    )


async def reconcile_model(body: Mapping[str, Any], ctx: Context) -> LlamaModelStatus:
    """Resolve the model and write its status; raises RetryLater when it must be tried again."""
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
    refused = model_policy_problems(model.spec, ctx.settings)
    if refused:
        # Nothing is resolved or applied for a spec the operator's policy refuses (e.g. admitted before it changed).
        message = "; ".join(refused)
        return await _write(ctx, body, previous, LlamaModelStatus(phase="Failed", message=message, conditions=[
            condition("Ready", False, "PolicyRefused", message, generation=generation)]), generation)

    if not resolution_due(model, previous, now=ctx.clock(), interval=ctx.settings.model_resync_seconds):
        if previous.cache_key is None:
            return await _write(ctx, body, previous, previous, generation)  # a failed source waits for its turn
        # Resolved for this generation and not due again: reuse it, no network (a PVC event lands here).
        status = previous.model_copy(update={"phase": "Ready", "message": None, "conditions": None})
        return await _converge(ctx, body, model, previous, status, generation)
    if previous.phase in (None, "Pending") or model.metadata.generation != previous.observed_generation:
        previous = await _write(ctx, body, previous, previous.model_copy(update={
            "phase": "Resolving", "message": "inspecting the model source"}), generation)
    status = await resolve_source(model, ctx)
    if status.phase in ("Ready", "Failed"):
        status = status.model_copy(update={"last_resolved_time": rfc3339(ctx.clock())})
    trusted = previous.trust_on_first_use
    if status.phase == "Ready" and trusted is not None and trusted.cache_key == status.cache_key:
        # The same source (its cache key hashes its identity): what its first download verified still holds.
        status = status.model_copy(update={"trust_on_first_use": trusted})
    if status.phase == "Resolving":
        await _write(ctx, body, previous, status.model_copy(update={"conditions": [
            condition("Ready", False, "Resolving", status.message or "", generation=generation)]}), generation)
        raise RetryLater(status.message)
    if status.phase == "Failed":
        written = await _write(ctx, body, previous, status, generation)
        if _waits_on_secret(status):
            raise RetryLater(status.message)
        return written
    return await _converge(ctx, body, model, previous, status, generation)


def _waits_on_secret(status: LlamaModelStatus) -> bool:
    return status.phase == "Failed" and any(c.type == "Ready" and c.reason in WAITS_ON_SECRET
                                            for c in status.conditions or [])


def resolution_due(model: LlamaModel, previous: LlamaModelStatus, *, now: float, interval: float) -> bool:
    """Whether the source must be inspected (over the network) in this reconcile.

    Yes for a new generation, while still resolving (a transient error's retry), for a status that never
    recorded a resolution, and when the periodic re-resolution is due (a moved `revision: main`, a file that
    appeared at a 404'd URL). A tenth of the interval is slack: the resync that comes once per interval must
    find it due even if the last resolution ran a moment after the previous resync.
    """
    if model.metadata.generation != previous.observed_generation or previous.phase in (None, "Resolving"):
        return True
    if _waits_on_secret(previous):
        return True
    resolved = parse_rfc3339(previous.last_resolved_time)
    return resolved is None or now - resolved >= 0.9 * interval


async def _converge(
    ctx: Context, body: Mapping[str, Any], model: LlamaModel, previous: LlamaModelStatus, status: LlamaModelStatus,
    generation: int | None,
) -> LlamaModelStatus:
    """Apply the cache PVC (when the cache type asks for one) and write the resolved status."""
    resolved = model.model_copy(update={"status": status})
    pvc = build_cache_pvc(resolved, ctx.settings)
    notes = []
    if pvc is not None:
        try:
            live = await ctx.kube.get(PERSISTENT_VOLUME_CLAIMS, pvc["metadata"]["namespace"], pvc["metadata"]["name"])
            await ctx.kube.apply(pvc, live=live)
        except Invalid as exc:
            # Most of a PVC's spec is immutable once created: retrying the same apply can never succeed.
            message = (f"cache PVC {pvc['metadata']['name']} cannot be changed to match spec.cache ({exc}); "
                       "revert spec.cache, or delete the PVC so it is re-created (the model is downloaded again)")
            return await _write(ctx, body, previous, status.model_copy(update={
                "phase": "Failed", "message": message, "conditions": [
                    condition("Ready", False, "CachePVCImmutable", message, generation=generation)]}), generation)
        modes = pvc["spec"]["accessModes"]
        if modes == ["ReadWriteOnce"]:
            notes.append(f"cache PVC {pvc['metadata']['name']} is ReadWriteOnce: every replica runs on the node "
                         "that mounts it (use accessModes [ReadWriteMany] to spread replicas)")
    elif cache_type(resolved, ctx.settings) == "PersistentVolumeClaim":
        status = status.model_copy(update={"phase": "Pending"})
        notes.append("cache.size is needed to create the cache PVC until the model size is known")
    trust = build_trust_configmap(resolved)
    if trust is not None:  # recorded by a server reconcile; put back here when deleted or edited
        live = await ctx.kube.get(CONFIG_MAPS, trust["metadata"]["namespace"], trust["metadata"]["name"])
        await ctx.kube.apply(trust, live=live)
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
        "conditions": merge_conditions(previous.conditions, [*(status.conditions or []), reconciled(generation)],
                                       now=now_rfc3339()),
    })
    PHASES.observe("LlamaModel", meta["namespace"], meta["name"], status.phase)
    if status == previous:
        return status
    if status.phase != previous.phase:
        event_type = "Warning" if status.phase == "Failed" else "Normal"
        ctx.record_event(body, type=event_type, reason=status.phase or "Pending",
                         message=status.message or f"LlamaModel is {status.phase}")
    await ctx.kube.patch_status(LLAMA_MODELS, meta["namespace"], meta["name"], status.to_wire(),
                                previous=previous.to_wire())
    log.info("LlamaModel %s/%s is %s%s", meta["namespace"], meta["name"], status.phase,
             f": {status.message}" if status.message else "")
    return status
