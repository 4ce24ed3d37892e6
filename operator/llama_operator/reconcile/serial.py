"""Runs at most one reconcile per object at a time and folds bursts of triggers into one run.

Pod and Deployment events arrive in bursts (probes flip, replicas start); each only needs "reconcile this
server once more, with what is current". A trigger that arrives while a run is in progress causes exactly
one more run after it; any number of triggers that queue up behind it share that run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable


class Coalescer:
    def __init__(self) -> None:
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self._requested: dict[Hashable, int] = {}
        self._started: dict[Hashable, int] = {}

    async def run(self, key: Hashable, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` for `key` unless a run that started after this call already covers it."""
        ticket = self._requested[key] = self._requested.get(key, 0) + 1
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if self._started.get(key, 0) >= ticket:
                return
            # Everything requested so far is served by this run: it reads the current state.
            self._started[key] = self._requested[key]
            await job()
        if not lock.locked() and self._started.get(key) == self._requested.get(key):
            self._locks.pop(key, None)
            self._requested.pop(key, None)
            self._started.pop(key, None)
