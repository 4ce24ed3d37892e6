"""errors.py: one taxonomy (reason, exit code, retry class by inheritance) and the retry policy."""

from __future__ import annotations

import random

import pytest

from llama_operator import contract, errors
from llama_operator.errors import RetryPolicy, backoff
from llama_operator.kube import Conflict, Forbidden, Invalid, NotFound, Unavailable

TAXONOMY = [
    # error, reason, retry, transient, exit code
    (errors.InvalidSpec("x"), "InvalidSpec", "never", False, contract.EXIT_ERROR),
    (Invalid("x", status=422), "Rejected", "never", False, contract.EXIT_ERROR),
    (Forbidden("x", status=403), "Forbidden", "slow", False, contract.EXIT_ERROR),
    (Unavailable("x", status=503), "Unavailable", "backoff", True, contract.EXIT_ERROR),
    (Conflict("x", status=409), "Conflict", "backoff", True, contract.EXIT_ERROR),
    (NotFound("x", status=404), "NotFound", "backoff", False, contract.EXIT_ERROR),
    (errors.SourceNotFound("x"), "NotFound", "never", False, contract.EXIT_NOT_FOUND),
    (errors.SourceUnauthorized("x"), "Unauthorized", "never", False, contract.EXIT_UNAUTHORIZED),
    (errors.SourceForbidden("x"), "Forbidden", "never", False, contract.EXIT_FORBIDDEN),
    (errors.ChecksumMismatch("x"), "ChecksumMismatch", "never", False, contract.EXIT_CHECKSUM),
    (errors.NotAGguf("x"), "NotAGguf", "never", False, contract.EXIT_NOT_GGUF),
    (errors.DiskFull("x"), "DiskFull", "never", False, contract.EXIT_DISK_FULL),
    (errors.SourceUnreachable("x"), "Unreachable", "backoff", True, contract.EXIT_UNREACHABLE),
    (errors.InterruptedFetch("x"), "Interrupted", "backoff", False, contract.EXIT_INTERRUPTED),
    (errors.InvalidArguments("x"), "InvalidArguments", "never", False, contract.EXIT_USAGE),
]


@pytest.mark.parametrize(("exc", "reason", "retry", "transient", "exit_code"), TAXONOMY,
                         ids=[type(row[0]).__name__ for row in TAXONOMY])
def test_taxonomy(exc: errors.OperatorError, reason: str, retry: str, transient: bool, exit_code: int) -> None:
    assert isinstance(exc, errors.OperatorError)
    assert (exc.reason, exc.retry, exc.transient, exc.exit_code) == (reason, retry, transient, exit_code)


def test_categories_are_inherited() -> None:
    assert isinstance(Unavailable("x"), errors.Transient) and isinstance(Unavailable("x"), errors.KubeError)
    assert isinstance(Forbidden("x"), errors.PermissionDenied)
    assert isinstance(Invalid("x"), errors.InvalidSpec)
    assert isinstance(errors.SourceUnreachable("x"), errors.Transient)
    assert isinstance(errors.SourceForbidden("x"), errors.SourceUnauthorized)
    assert Unavailable("m", status=503).status == 503
    assert errors.SourceUnreachable("m", retry_after=3.0).retry_after == 3.0
    assert Forbidden("m", status=403, permission="get pods").permission == "get pods"


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (50, 300)])
def test_backoff_is_capped_exponential_with_equal_jitter(attempt: int, ceiling: float) -> None:
    rng = random.Random(1)
    delays = [backoff(attempt, base=5, cap=300, rng=rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 100


def test_retry_after_wins_when_longer_but_is_bounded() -> None:
    assert backoff(1, base=1, cap=8, retry_after=30) == 30
    assert backoff(1, base=1, cap=8, retry_after=10_000) == 80
    assert backoff(4, base=1, cap=8, retry_after=0.1) >= 4


POLICY = [
    (errors.InvalidSpec("bad"), 1, None, None),
    (Invalid("bad"), 3, None, None),
    (Forbidden("no"), 1, 270, 330),
    (Forbidden("no"), 9, 270, 330),
    (Unavailable("down"), 1, 2.5, 5),
    (Unavailable("down"), 4, 20, 40),
    (Unavailable("down"), 20, 150, 300),
    (errors.SourceUnreachable("429", retry_after=120), 1, 120, 120),
    (RuntimeError("a bug"), 2, 5, 10),
]


@pytest.mark.parametrize(("exc", "attempt", "low", "high"), POLICY)
def test_policy_by_error_class(exc: BaseException, attempt: int, low: float | None, high: float | None) -> None:
    delay = RetryPolicy().delay(exc, attempt)
    if low is None:
        assert delay is None
    else:
        assert delay is not None and low <= delay <= high  # type: ignore[operator]


def test_status_message_names_the_missing_permission_and_unexpected_types() -> None:
    text = errors.status_message(Forbidden("PATCH x: forbidden", permission="patch deployments.apps in namespace ml"))
    assert text.startswith("the operator is not allowed to patch deployments.apps in namespace ml")
    assert errors.status_message(KeyError("spec")) == "internal error: KeyError: 'spec'"
    assert errors.reason(KeyError("spec")) == "InternalError"
