"""Condition bookkeeping: keep lastTransitionTime unless the status of a condition really changed, and warn once
per new problem."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..api.v1beta1 import Condition

if TYPE_CHECKING:
    from .context import Context


def condition(type_: str, ok: bool | None, reason: str, message: str = "", *, generation: int | None) -> Condition:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return Condition(type=type_, status=status, reason=reason, message=message, observed_generation=generation)


def merge_conditions(
    previous: Iterable[Condition] | None, current: Iterable[Condition], *, now: str
) -> list[Condition]:
    """The new conditions, stamped with a transition time that moves only when `status` flips."""
    before = {c.type: c for c in previous or []}
    merged = []
    for cond in current:
        old = before.get(cond.type)
        stamp = old.last_transition_time if old is not None and old.status == cond.status else now
        merged.append(cond.model_copy(update={"last_transition_time": stamp or now}))
    return merged


def problem_event(ctx: Context, body: Mapping[str, Any], before: Sequence[Condition] | None,
                  after: Sequence[Condition] | None, type_: str, *, quiet: Sequence[str]) -> None:
    """A Warning Event when condition `type_` turns to a reason outside `quiet` (or from one such reason to
    another): once per new problem, not once per reconcile."""
    old = next((c for c in before or [] if c.type == type_), None)
    new = next((c for c in after or [] if c.type == type_), None)
    if new is None or new.reason in quiet:
        return
    if old is not None and (old.status, old.reason) == (new.status, new.reason):
        return
    ctx.record_event(body, type="Warning", reason=new.reason, message=new.message)
