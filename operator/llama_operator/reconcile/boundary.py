"""One error boundary per reconcile: whatever a reconcile raises becomes status, an Event and a retry decision.

The reconcile functions report what they expect themselves (a bad spec, a model not ready, an unreachable
source). Everything else that escapes them — an API error, a refused permission, a bug — ends here: the
object gets `Reconciled=False` with the error's reason, a message that says what failed and when it is tried
again, and a Warning Event (once per distinct error, not once per retry). `errors.RetryPolicy` turns the error
class into the delay: none for a bad spec (the next generation reconciles it), slow for RBAC refusals, capped
exponential backoff with jitter for transient trouble and for anything unexpected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..api.v1beta1 import LlamaModelStatus, LlamaServerStatus
from ..clock import now_rfc3339
from ..errors import RetryPolicy, reason, status_message
from ..kube import LLAMA_SERVERS, ResourceKind
from .conditions import condition, merge_conditions
from .context import Context

log = logging.getLogger(__name__)

RECONCILED = "Reconciled"
"""The condition that says whether the last reconcile of an object ran to the end (reason: why not)."""


@dataclass(frozen=True)
class Verdict:
    """How one reconcile ended, and when to run it again (None: on the next event or spec change)."""

    ok: bool
    retry_in: float | None = None
    """Failed: when to try again (None: at the next generation). Succeeded: when to look again (None: at the
    next event)."""
    reason: str = ""
    message: str = ""


def reconciled(generation: int | None) -> Any:
    """The condition a reconcile that ran to the end reports."""
    return condition(RECONCILED, True, "Succeeded", generation=generation)


def failure_verdict(exc: BaseException, attempt: int, policy: RetryPolicy) -> Verdict:
    return Verdict(False, policy.delay(exc, attempt), reason(exc), status_message(exc))


async def guarded(
    kind: ResourceKind,
    body: Mapping[str, Any],
    ctx: Context,
    reconcile: Callable[[Mapping[str, Any], Context], Awaitable[Any]],
    *,
    attempt: int = 1,
    policy: RetryPolicy | None = None,
    again_after: Callable[[Any], float | None] | None = None,
) -> Verdict:
    """Run one reconcile; never raises (cancellation aside). `again_after(result)`: seconds after which a
    successful reconcile runs again although nothing changed (a download to follow), or None."""
    try:
        result = await reconcile(body, ctx)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - this is the boundary: every failure becomes a status
        verdict = failure_verdict(exc, attempt, policy or RetryPolicy())
        meta = body.get("metadata") or {}
        where = f"{kind.plural} {meta.get('namespace')}/{meta.get('name')}"
        if verdict.reason == "InternalError":
            log.exception("Reconcile of %s failed (attempt %d)", where, attempt)
        else:
            log.warning("Reconcile of %s failed (attempt %d): %s", where, attempt, verdict.message)
        if not getattr(exc, "reported", False):  # RetryLater: the reconcile already said what it waits for
            await _report(kind, body, ctx, verdict, retry=getattr(exc, "retry", "backoff"))
        return verdict
    return Verdict(ok=True, retry_in=again_after(result) if again_after is not None else None)


def _retry_note(verdict: Verdict) -> str:
    if verdict.retry_in is None:
        return "not retried until the spec changes"
    return f"retrying in {verdict.retry_in:.0f}s"


def failure_status(
    kind: ResourceKind, body: Mapping[str, Any], verdict: Verdict, *, permanent: bool, now: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(status to write, status as read) for a failed reconcile. Pure: the status-writing half of `_report`."""
    status_type: type[LlamaServerStatus] | type[LlamaModelStatus] = (
        LlamaServerStatus if kind is LLAMA_SERVERS else LlamaModelStatus
    )
    raw = body.get("status") or {}
    try:
        previous = status_type.model_validate(raw)
    except ValidationError:
        previous = status_type()
    generation = (body.get("metadata") or {}).get("generation")
    failed = condition(RECONCILED, False, verdict.reason, verdict.message, generation=generation)
    merged = merge_conditions(previous.conditions, [failed], now=now)
    others = [c for c in previous.conditions or [] if c.type != RECONCILED]
    status = previous.model_copy(update={
        "phase": "Failed" if permanent else (previous.phase or "Pending"),
        "message": f"{verdict.message}; {_retry_note(verdict)}",
        "observed_generation": generation,
        "conditions": others + merged,
    })
    return status.to_wire(), previous.to_wire()


async def _report(kind: ResourceKind, body: Mapping[str, Any], ctx: Context, verdict: Verdict, *, retry: str) -> None:
    meta = body.get("metadata") or {}
    status, previous = failure_status(kind, body, verdict, permanent=retry == "never", now=now_rfc3339())
    before = next((c for c in previous.get("conditions") or [] if c.get("type") == RECONCILED), {})
    if (before.get("status"), before.get("reason"), before.get("message")) != ("False", verdict.reason,
                                                                               verdict.message):
        ctx.record_event(body, type="Warning", reason=verdict.reason, message=status["message"])
    try:
        await ctx.kube.patch_status(kind, meta["namespace"], meta["name"], status, previous=previous)
    except Exception as exc:  # noqa: BLE001 - the API may be what failed; the retry reports again
        log.warning("Could not write the failure into the status of %s %s/%s: %s", kind.plural,
                    meta.get("namespace"), meta.get("name"), exc)
