"""Requests held while their model has no ready replica (scaling from zero, or every replica restarting).

Bounded twice, both configurable: a request waits at most `timeout` seconds, and at most `limit` requests wait
per model; past either the client gets 503 with Retry-After (never 404: the model exists, it is not up yet).
Waiters wake when the model's endpoints change (`notify`), not by polling.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class QueueFull(Exception):
    """`limit` requests already wait for this model."""


class HoldQueue:
    def __init__(self, *, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}

    def waiting(self, key: str) -> int:
        return self._waiting.get(key, 0)

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    async def hold(self, key: str, ready: Callable[[], bool]) -> bool:
        """Wait until `ready()`; False after the timeout. Raises QueueFull when `limit` already wait."""
        if ready():
            return True
        if self.waiting(key) >= self.limit:
            raise QueueFull(key)
        deadline = time.monotonic() + self.timeout
        self._waiting[key] = self.waiting(key) + 1
        try:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                event = self._events.setdefault(key, asyncio.Event())
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except TimeoutError:
                    return ready()
            return True
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
