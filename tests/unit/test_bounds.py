"""Messages that reach status are bounded (api/bounds.py): one helper, one constant, however status is built."""

from __future__ import annotations

import kopf
import pytest
from pydantic import ValidationError

from llama_operator.admission import _refuse, server_spec_problems
from llama_operator.api.bounds import MESSAGE_MAX_LENGTH, truncate_message
from llama_operator.api.errors import describe
from llama_operator.api.v1beta1 import (
    ARG_MAX_LENGTH,
    ARGS_MAX_ITEMS,
    Condition,
    LlamaModelStatus,
    LlamaServerSpec,
    LlamaServerStatus,
    ServedModelStatus,
)
from llama_operator.config import Settings
from llama_operator.reconcile.conditions import condition

# The most a tenant can write into args: every one an unknown flag, each quoted back in a problem.
HOSTILE_ARGS = [f"--no-such-flag-{i}-" + "x" * (ARG_MAX_LENGTH - 24) for i in range(ARGS_MAX_ITEMS)]


def test_truncate_message() -> None:
    assert truncate_message("short") == "short"
    assert truncate_message("x" * MESSAGE_MAX_LENGTH) == "x" * MESSAGE_MAX_LENGTH
    cut = truncate_message("y" * 5_000_000)
    assert len(cut) <= MESSAGE_MAX_LENGTH and cut.startswith("yyy") and cut.endswith("more characters)")
    assert len(truncate_message("z" * 100, 40)) <= 40


def test_the_biggest_problem_list_fits_in_status() -> None:
    """256 args of 16 KiB put 4.2 MB into status (twice); now the spec is bounded and every message is cut."""
    problems = server_spec_problems({"modelRef": {"name": "m"}, "args": HOSTILE_ARGS}, namespace="default",
                                    settings=Settings())
    message = "; ".join(problems)
    assert len(message) > 100 * MESSAGE_MAX_LENGTH  # what the reconcile joins before it writes status
    status = LlamaServerStatus(phase="Failed", message=message,
                               conditions=[condition("ArgsValid", False, "InvalidSpec", message, generation=1)])
    wire = status.to_wire()
    assert len(wire["message"]) <= MESSAGE_MAX_LENGTH
    assert len(wire["conditions"][0]["message"]) <= MESSAGE_MAX_LENGTH
    assert wire["message"].startswith(problems[0][:100])


def test_messages_are_cut_however_status_was_built() -> None:
    """model_copy(update=...) skips validation; the cut happens when status is serialized."""
    long = "m" * 100_000
    statuses = [
        LlamaModelStatus().model_copy(update={"message": long}),
        LlamaServerStatus(conditions=[Condition(type="Ready", status="False", reason="R")]).model_copy(
            update={"message": long}),
        ServedModelStatus(name="a", model="a", state="Failed").model_copy(update={"message": long}),
    ]
    for status in statuses:
        assert len(status.to_wire()["message"]) <= MESSAGE_MAX_LENGTH
    cond = Condition(type="Ready", status="False", reason="R").model_copy(update={"message": long})
    assert len(cond.to_wire()["message"]) <= MESSAGE_MAX_LENGTH


def test_a_refused_value_is_quoted_short() -> None:
    with pytest.raises(ValidationError) as caught:
        LlamaServerSpec.model_validate({"modelRef": {"name": "m"}, "contextSize": "4k" * 10_000})
    (message,) = describe(caught.value)
    assert len(message) < 300, message


def test_a_webhook_refusal_is_cut() -> None:
    problems = server_spec_problems({"modelRef": {"name": "m"}, "args": HOSTILE_ARGS}, namespace="default",
                                    settings=Settings())
    with pytest.raises(kopf.AdmissionError) as refused:
        _refuse("LlamaServer", problems)
    assert len(str(refused.value)) <= MESSAGE_MAX_LENGTH
