"""Runs at most one reconcile per object at a time and folds bursts of triggers into one run.

Pod and Deployment events arrive in bursts (probes flip, replicas start); each only needs "reconcile this
server once more, with what is current". A trigger that arrives while a run is in progress causes exactly
one more run after it; any number of triggers that queue up behind it share that run, and every one of them
is told that run's outcome — its result, or its exception re-raised — as if it had run the job itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: int = 0
    started: int = 0
    waiters: int = 0
    result: T | None = None
    error: BaseException | None = None
    """Outcome of the last finished run. A caller that finds its ticket covered takes the lock only after
    that run ended, and the lock is fair (FIFO), so the last finished run is always the one that covered it."""


class Coalescer(Generic[T]):
    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry[T]] = {}

    async def run(self, key: Hashable, job: Callable[[], Awaitable[T]]) -> T:
        """Run `job` for `key` unless a run that started after this call covers it; either way, its outcome."""
        entry = self._entries.setdefault(key, _Entry())
        entry.requested += 1
        ticket = entry.requested
        entry.waiters += 1
        try:
            async with entry.lock:
                if entry.started < ticket:
                    # Everything requested so far is served by this run: the job reads the current state.
                    entry.started = entry.requested
                    entry.result, entry.error = None, None
                    try:
                        entry.result = await job()
                    except asyncio.CancelledError:
                        # Not an outcome: the callers it covered run the job themselves.
                        entry.started = ticket - 1
                        raise
                    except BaseException as exc:  # noqa: BLE001 - handed to every caller this run covered
                        entry.error = exc
                if entry.error is not None:
                    raise entry.error
                return entry.result  # type: ignore[return-value]
        finally:
            entry.waiters -= 1
            if entry.waiters == 0:
                self._entries.pop(key, None)
