"""reconcile/conditions.py: lastTransitionTime moves only when a condition's status flips."""

from __future__ import annotations

import re

import pytest

from llama_operator.api.v1beta1 import Condition
from llama_operator.clock import now_rfc3339
from llama_operator.reconcile.conditions import condition, merge_conditions

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"


def cond(status: str, reason: str = "R", message: str = "", time: str | None = T0) -> Condition:
    return Condition(type="Ready", status=status, reason=reason, message=message,  # type: ignore[arg-type]
                     last_transition_time=time, observed_generation=1)


@pytest.mark.parametrize(("before", "now", "stamp"), [
    (None, cond("True", time=None), T1),                                          # new condition
    (cond("True"), cond("True", time=None), T0),                                  # unchanged
    (cond("True"), cond("True", reason="Other", message="m", time=None), T0),     # reason/message only
    (cond("True"), cond("False", time=None), T1),                                 # flipped
    (cond("False"), cond("Unknown", time=None), T1),                              # to Unknown is a flip too
    (cond("True", time=None), cond("True", time=None), T1),                       # an old one without a stamp
])
def test_transition_time(before: Condition | None, now: Condition, stamp: str) -> None:
    merged = merge_conditions([before] if before else None, [now], now=T1)
    assert [c.last_transition_time for c in merged] == [stamp]
    assert merged[0].reason == now.reason and merged[0].status == now.status


def test_merge_keeps_order_and_only_reported_types() -> None:
    other = Condition(type="Other", status="True", reason="R", last_transition_time=T0)
    merged = merge_conditions([cond("True"), other], [cond("True", time=None)], now=T1)
    assert [c.type for c in merged] == ["Ready"]


@pytest.mark.parametrize(("ok", "status"), [(True, "True"), (False, "False"), (None, "Unknown")])
def test_condition_status(ok: bool | None, status: str) -> None:
    made = condition("Ready", ok, "Why", "what", generation=7)
    assert (made.status, made.reason, made.message, made.observed_generation) == (status, "Why", "what", 7)


def test_now_is_rfc3339_utc_seconds() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", now_rfc3339())
