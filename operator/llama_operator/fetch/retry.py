"""The fetcher's one retry loop: every request (a probe, a piece) is retried here and nowhere else.

Only `errors.Transient` failures are retried (connection errors, timeouts, 5xx, 429, 408, a response that
ended early), with capped exponential backoff and jitter (`errors.backoff`, the operator's too) that honours
Retry-After. The count of consecutive failures resets whenever the request made progress, so a flaky link that
keeps moving never gives up; `FetchOptions.retries` failures in a row without progress do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..errors import SourceUnreachable, Transient, backoff
from .plan import FetchOptions

log = logging.getLogger(__name__)


def _backoff(attempt: int, options: FetchOptions, retry_after: float | None) -> float:
    """The delay before retry `attempt` (1-based) with the fetcher's base and cap."""
    return backoff(attempt, base=options.backoff_base, cap=options.backoff_cap, retry_after=retry_after)


def retrying(
    attempt: Callable[[], None],
    what: str,
    options: FetchOptions,
    *,
    progress: Callable[[], int] = lambda: 0,
    wait: Callable[[float], None],
) -> None:
    """Run `attempt` until it returns. A `Transient` failure waits `wait(delay)` and tries again; `wait` raises
    to stop (SIGTERM, another worker's failure). Giving up raises `SourceUnreachable` naming `what`."""
    failures = 0
    last = progress()
    while True:
        try:
            attempt()
            return
        except Transient as exc:
            if progress() != last:
                failures, last = 0, progress()
            failures += 1
            if failures > options.retries:
                raise SourceUnreachable(f"{what}: giving up after {options.retries} retries: {exc}") from exc
            delay = _backoff(failures, options, exc.retry_after)
            log.warning("%s: %s; retry %d/%d in %.1fs", what, exc, failures, options.retries, delay)
            wait(delay)
