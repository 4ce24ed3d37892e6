"""Replicas that follow the load, and scale to zero: the gateway is the one writer of spec.replicas.

The decision (`decide`) is a pure function of the policy (`spec.scaling`) and what the gateway measured:

- load = time-weighted mean of requests in flight plus requests held for a replica, over `windowSeconds`
  (Little's law: 10 requests/s of 0.3 s each is a load of 3); no Prometheus involved;
- wanted = ceil(load / targetInFlight), at least 1 while any request is in flight or held (from zero: enough
  for the requests held, ceil(held / targetInFlight)), clamped to
  [minReplicas, maxReplicas]; with minReplicas 0 a server with replicas stays at >= 1 until nothing was asked
  of it for `idleSeconds`, and a server at zero stays there until a request arrives;
- up at once (a held request wakes a server at zero on the spot); down only to the highest count wanted during
  the last `scaleDownDelaySeconds`, so a short lull never drops a warm replica; to zero as soon as
  `idleSeconds` passed without a request;
- outside the bounds (someone set replicas above max or below min): back to the nearest bound at once.

`kubectl scale` and spec.scaling do not fight: the `Autoscaler` remembers the replicas it last saw or wrote; a
different value it did not write (kubectl scale, an apply, another tool) is adopted as a manual scale. That
value is then the floor for `scaleDownDelaySeconds` and counts as activity for `idleSeconds` (so a pre-warmed
server is not dropped to zero at once), the load may still scale it up, and a value outside the bounds is put
back to the bound once. To take replicas over entirely, remove spec.scaling.

The Autoscaler writes spec.replicas through the scale subresource (`llamaservers/scale`) and its view into
`status.autoscaling` (load, in flight, held, desired, last scale time, reason, message); the operator turns
spec.replicas into the Deployment as it always does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ..errors import KubeError
from ..kube import LLAMA_SERVERS, Kube
from . import metrics
from .routing import Route, RoutingTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScalingPolicy:
    min_replicas: int
    max_replicas: int
    target_in_flight: int
    idle_seconds: float
    scale_down_delay_seconds: float
    window_seconds: float

    @classmethod
    def of(cls, route: Route) -> ScalingPolicy | None:
        scaling = route.scaling
        if scaling is None:
            return None
        return cls(scaling.min_replicas, scaling.max_replicas, route.target_in_flight, scaling.idle_seconds,
                   scaling.scale_down_delay_seconds, scaling.window_seconds)


@dataclass(frozen=True)
class Signals:
    """What the gateway measured for one server."""

    replicas: int
    """spec.replicas now."""
    load: float
    """Mean in flight + held over the window."""
    active: int
    """In flight + held right now."""
    idle_for: float
    """Seconds since a request last started or ended (0 while one is active)."""
    recent_peak: int = 0
    """The most replicas wanted during the last scaleDownDelaySeconds (0: nothing recorded)."""


@dataclass(frozen=True)
class Decision:
    replicas: int
    """What spec.replicas should be; equal to Signals.replicas when nothing changes."""
    wanted: int
    """What the load asks for now (the autoscaler's history keeps it for the scale-down delay)."""
    reason: str
    message: str


def wanted_replicas(policy: ScalingPolicy, signals: Signals) -> int:
    idle = signals.active == 0 and signals.idle_for >= policy.idle_seconds
    # Idle: the window may still hold the last request's load, but nothing was asked for idleSeconds.
    by_load = math.ceil(signals.load / policy.target_in_flight - 1e-9) if signals.load > 0 and not idle else 0
    if signals.active > 0:
        by_load = max(by_load, 1)
        if signals.replicas == 0:  # waking up: enough replicas for what waits (they start in parallel)
            by_load = max(by_load, math.ceil(signals.active / policy.target_in_flight))
    floor = policy.min_replicas
    if policy.min_replicas == 0 and not idle and signals.replicas > 0:
        floor = 1  # in use lately: not to zero before idleSeconds
    return min(max(by_load, floor), policy.max_replicas)


def decide(policy: ScalingPolicy, signals: Signals) -> Decision:
    """The replicas a server should have now, and why."""
    current = signals.replicas
    wanted = wanted_replicas(policy, signals)
    load = (f"load {signals.load:.2f} in flight over {policy.window_seconds:g}s, target {policy.target_in_flight} "
            f"per replica")
    if current > policy.max_replicas:
        return Decision(policy.max_replicas, wanted, "AboveMaximum",
                        f"{current} replicas is above maxReplicas {policy.max_replicas}")
    if current < policy.min_replicas:
        target = max(wanted, policy.min_replicas)
        return Decision(target, wanted, "BelowMinimum", f"{current} replicas is below minReplicas "
                        f"{policy.min_replicas}")
    if wanted > current:
        if current == 0:
            return Decision(wanted, wanted, "ScaleFromZero",
                            f"{signals.active} request(s) waiting for a replica: scaling from zero to {wanted}")
        return Decision(wanted, wanted, "LoadAboveTarget", f"{load}: {wanted} replicas")
    if wanted < current:
        if wanted == 0:
            return Decision(0, 0, "Idle", f"no request for {signals.idle_for:.0f}s (idleSeconds "
                            f"{policy.idle_seconds:g}): scaling to zero")
        allowed = max(wanted, signals.recent_peak)
        if allowed < current:
            return Decision(allowed, wanted, "LoadBelowTarget", f"{load}: {allowed} replicas")
        return Decision(current, wanted, "ScaleDownDelay",
                        f"{load} wants {wanted}; {current} kept: {signals.recent_peak} were wanted within "
                        f"scaleDownDelaySeconds {policy.scale_down_delay_seconds:g}")
    if current == 0:
        return Decision(0, 0, "ScaledToZero", "no request in flight or waiting")
    return Decision(current, wanted, "AtTarget", f"{load}: {current} replicas")


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

    def _changed(self, key: str, item: _Traffic) -> None:
        now = self._clock()
        item.last_activity = now
        item.window.set(now, item.in_flight + item.held, item.horizon)
        metrics.IN_FLIGHT.labels(key).set(item.in_flight)
        metrics.QUEUE_LENGTH.labels(key).set(item.held)

    def start(self, key: str) -> None:
        item = self._get(key)
        item.in_flight += 1
        self._changed(key, item)

    def finish(self, key: str) -> None:
        item = self._get(key)
        item.in_flight -= 1
        self._changed(key, item)

    def hold(self, key: str) -> None:
        item = self._get(key)
        item.held += 1
        self._changed(key, item)

    def release(self, key: str) -> None:
        item = self._get(key)
        item.held -= 1
        self._changed(key, item)

    def touch(self, key: str) -> None:
        """Count now as activity (a manual scale): not idle before idleSeconds from now."""
        self._get(key).last_activity = self._clock()

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


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _State:
    seen: int
    """spec.replicas as the watch last showed it (or as this autoscaler wrote it)."""
    history: deque[tuple[float, int]]
    cursor: int = 0
    """The last routing-table replica event looked at."""
    awaiting: int | None = None
    """A value we wrote whose echo the watch has not delivered yet."""
    awaiting_rv: str | None = None
    awaiting_since: float = 0.0
    last_scale_time: str | None = None
    reported: tuple[object, ...] | None = None
    reported_at: float = -math.inf


class Autoscaler:
    """Every `interval` (and at once when kicked by a held request), decide and write, for each scaled server."""

    AWAIT_ECHO_SECONDS = 30.0
    STATUS_INTERVAL = 10.0
    """The status view is rewritten at most this often when only the load changed."""

    def __init__(self, kube: Kube | None, routes: RoutingTable, traffic: Traffic, *, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], str] = now_rfc3339) -> None:
        self.kube = kube
        self.routes = routes
        self.traffic = traffic
        self.interval = interval
        self._clock = clock
        self._wall = wall
        self._states: dict[str, _State] = {}
        self._kick = asyncio.Event()

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), self.interval)
            except TimeoutError:
                pass
            self._kick.clear()
            await self.step()

    async def step(self) -> None:
        routes = {route.key: route for route in self.routes.routes() if route.scaling is not None}
        for key in [k for k in self._states if k not in routes]:
            del self._states[key]
        for route in routes.values():
            try:
                await self.step_one(route)
            except Exception:  # one server's trouble never stops the others
                log.exception("autoscaler: LlamaServer %s", route.key)

    async def step_one(self, route: Route) -> Decision | None:
        policy = ScalingPolicy.of(route)
        if policy is None:
            return None
        now = self._clock()
        key = route.key
        self.traffic.set_horizon(key, policy.window_seconds)
        state = self._states.get(key)
        events, cursor, dropped = self.routes.replica_events(key, state.cursor if state else 0)
        if state is None:
            # A (re)started gateway: the current count is where it starts, nothing is scaled down before the
            # delay, and nothing goes to zero before idleSeconds.
            state = self._states[key] = _State(seen=route.replicas, history=deque([(now, route.replicas)]),
                                               cursor=cursor, last_scale_time=route.last_scale_time)
            events = []
        state.cursor = cursor
        manual = self._changed_by_others(state, events, dropped, route.replicas, now)
        current = state.awaiting if state.awaiting is not None else state.seen
        if manual:
            state.history = deque([(now, current)])
            state.last_scale_time = self._wall()
            self.traffic.touch(key)
            log.info("LlamaServer %s was scaled to %d by someone else: kept for at least %gs", key, current,
                     policy.scale_down_delay_seconds)
        while state.history and state.history[0][0] < now - policy.scale_down_delay_seconds:
            state.history.popleft()
        signals = Signals(
            replicas=current, load=self.traffic.load(key, policy.window_seconds), active=self.traffic.active(key),
            idle_for=self.traffic.idle_for(key), recent_peak=max((n for _, n in state.history), default=0))
        decision = decide(policy, signals)
        if manual and decision.replicas == current:
            decision = Decision(current, decision.wanted, "ManualScale",
                                f"spec.replicas was set to {current} outside the gateway: kept for at least "
                                f"{policy.scale_down_delay_seconds:g}s; {decision.message}")
        state.history.append((now, decision.wanted))
        if decision.replicas != current:
            await self._scale(route, current, decision, state, now)
        await self._report(route, state, signals, decision, now)
        return decision

    def _changed_by_others(self, state: _State, events: list[tuple[str | None, int]], dropped: bool,
                           latest: int, now: float) -> bool:
        """Walk the watch's spec.replicas values in order: skip those up to the echo of our own write; a later
        value that differs from what we know is someone else's scale (kubectl scale, an apply)."""
        manual = False
        for rv, replicas in events:
            if state.awaiting is not None:
                if rv == state.awaiting_rv or (state.awaiting_rv is None and replicas == state.awaiting):
                    state.awaiting, state.seen = None, replicas
                continue  # an older event delivered after our write
            if replicas != state.seen:
                manual, state.seen = True, replicas
        if state.awaiting is not None and (dropped or now - state.awaiting_since > self.AWAIT_ECHO_SECONDS):
            state.awaiting = None  # the echo is lost (a relist): trust the latest value
            manual, state.seen = latest != state.seen, latest
        return manual

    async def _scale(self, route: Route, current: int, decision: Decision, state: _State, now: float) -> None:
        version: str | None = None
        if self.kube is not None:
            try:
                result = await self.kube.scale(LLAMA_SERVERS, route.namespace, route.name, decision.replicas)
            except KubeError as exc:
                log.warning("autoscaler: cannot scale LlamaServer %s to %d: %s", route.key, decision.replicas, exc)
                metrics.SCALE_ERRORS.labels(route.key).inc()
                return
            if result is None:
                return
            version = (result.get("metadata") or {}).get("resourceVersion")
        state.awaiting, state.awaiting_rv, state.awaiting_since = decision.replicas, version, now
        state.seen = decision.replicas
        state.last_scale_time = self._wall()
        metrics.SCALES.labels(route.key, "up" if decision.replicas > current else "down").inc()
        if current == 0:
            metrics.SCALE_FROM_ZERO.labels(route.key).inc()
        metrics.DESIRED_REPLICAS.labels(route.key).set(decision.replicas)
        log.info("Scaled LlamaServer %s from %d to %d replicas (%s: %s)", route.key, current, decision.replicas,
                 decision.reason, decision.message)

    async def _report(self, route: Route, state: _State, signals: Signals, decision: Decision, now: float) -> None:
        metrics.DESIRED_REPLICAS.labels(route.key).set(decision.replicas)
        measured = (round(signals.load, 1), self.traffic.in_flight(route.key), self.traffic.held(route.key))
        # Requests starting to wait (or all waiting ones served) is news at once; other load changes can wait.
        decided = (decision.replicas, decision.reason, state.last_scale_time, measured[1] > 0, measured[2] > 0)
        if state.reported is not None and state.reported[0] == decided and (
                state.reported[1] == measured or now - state.reported_at < self.STATUS_INTERVAL):
            return
        view = {"load": round(signals.load, 2), "inFlight": measured[1], "queued": measured[2],
                "desiredReplicas": decision.replicas, "reason": decision.reason, "message": decision.message,
                "updatedTime": self._wall()}
        if state.last_scale_time:
            view["lastScaleTime"] = state.last_scale_time
        if self.kube is not None:
            try:
                await self.kube.patch_status(LLAMA_SERVERS, route.namespace, route.name, {"autoscaling": view})
            except KubeError as exc:
                log.warning("autoscaler: cannot write the status of LlamaServer %s: %s", route.key, exc)
                return
        state.reported, state.reported_at = (decided, measured), now
