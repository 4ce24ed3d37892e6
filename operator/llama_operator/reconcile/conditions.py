"""Condition bookkeeping: keep lastTransitionTime unless the status of a condition really changed."""

from __future__ import annotations

import datetime
from collections.abc import Iterable

from ..api.v1alpha1 import Condition


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


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
