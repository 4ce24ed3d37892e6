"""Runs at most one reconcile per object at a time and folds bursts of triggers into one run.

Pod and Deployment events arrive in bursts (probes flip, replicas start); each only needs "reconcile this
server once more, with what is current". A trigger that arrives while a run is in progress causes exactly
one more run after it; any number of triggers that queue up behind it share that run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requested: int = 0
    started: int = 0
    waiters: int = 0


class Coalescer:
    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}

    async def run(self, key: Hashable, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` for `key` unless a run that started after this call already covers it."""
        entry = self._entries.setdefault(key, _Entry())
        entry.requested += 1
        ticket = entry.requested
        entry.waiters += 1
        try:
            async with entry.lock:
                if entry.started >= ticket:
                    return
                # Everything requested so far is served by this run: the job reads the current state.
                entry.started = entry.requested
                await job()
        finally:
            entry.waiters -= 1
            if entry.waiters == 0:
                self._entries.pop(key, None)
