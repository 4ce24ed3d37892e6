"""The load the gateway sees (requests in flight and held per LlamaServer), with its time-weighted mean.

The request path counts (`Traffic.start/finish/hold/release`), the autoscaler reads (`load`, `active`,
`idle_for`); `LoadWindow` is the step function behind the mean over a server's `windowSeconds`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import metrics


class LoadWindow:
    """A step function of time (requests active), with its time-weighted mean over a trailing window."""

    def __init__(self) -> None:
        self._points: deque[tuple[float, float]] = deque()

    def set(self, now: float, value: float, horizon: float) -> None:
        self._points.append((now, value))
        # Keep the last point before the horizon: it is the value at the window's start.
        while len(self._points) > 1 and self._points[1][0] <= now - horizon:
            self._points.popleft()

    def value_at(self, t: float) -> float:
        value = 0.0
        for when, v in self._points:
            if when > t:
                break
            value = v
        return value

    def mean(self, now: float, window: float) -> float:
        start = now - window
        previous_t, previous_v = start, self.value_at(start)
        total = 0.0
        for when, value in self._points:
            if when <= start:
                continue
            if when > now:
                break
            total += previous_v * (when - previous_t)
            previous_t, previous_v = when, value
        total += previous_v * (now - previous_t)
        return total / window if window > 0 else previous_v


@dataclass
class _Traffic:
    in_flight: int = 0
    held: int = 0
    last_activity: float = 0.0
    window: LoadWindow = field(default_factory=LoadWindow)
    horizon: float = 60.0
    gauges: tuple[Any, Any] | None = None
    """This key's in-flight and queue-length series (labels() costs a lock and a lookup per call)."""


class Traffic:
    """Requests in flight and held, per server key: the load the autoscaler and the balancer see."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_key: dict[str, _Traffic] = {}

    def _get(self, key: str) -> _Traffic:
        found = self._by_key.get(key)
        if found is None:
            found = self._by_key[key] = _Traffic(last_activity=self._clock())
        return found

    def set_horizon(self, key: str, seconds: float) -> None:
        self._get(key).horizon = seconds

    def _changed(self, key: str, item: _Traffic, which: int) -> None:
        """After `which` changed: 0 requests in flight, 1 requests held."""
        now = self._clock()
        item.last_activity = now
        item.window.set(now, item.in_flight + item.held, item.horizon)
        if item.gauges is None:
            item.gauges = (metrics.IN_FLIGHT.labels(key), metrics.QUEUE_LENGTH.labels(key))
        item.gauges[which].set(item.held if which else item.in_flight)

    def start(self, key: str) -> None:
        item = self._get(key)
        item.in_flight += 1
        self._changed(key, item, 0)

    def finish(self, key: str) -> None:
        item = self._get(key)
        item.in_flight -= 1
        self._changed(key, item, 0)

    def hold(self, key: str) -> None:
        item = self._get(key)
        item.held += 1
        self._changed(key, item, 1)

    def release(self, key: str) -> None:
        item = self._get(key)
        item.held -= 1
        self._changed(key, item, 1)

    def touch(self, key: str) -> None:
        """Count now as activity (a manual scale): not idle before idleSeconds from now."""
        self._get(key).last_activity = self._clock()

    def seen(self, key: str) -> bool:
        """Whether this replica has counted anything for the server (since it started or forgot it)."""
        return key in self._by_key

    def in_flight(self, key: str) -> int:
        return self._get(key).in_flight

    def held(self, key: str) -> int:
        return self._get(key).held

    def active(self, key: str) -> int:
        item = self._get(key)
        return item.in_flight + item.held

    def load(self, key: str, window: float) -> float:
        return self._get(key).window.mean(self._clock(), window)

    def idle_for(self, key: str) -> float:
        item = self._get(key)
        return 0.0 if item.in_flight + item.held else max(0.0, self._clock() - item.last_activity)

    def forget(self, key: str) -> None:
        self._by_key.pop(key, None)
