"""The autoscaler loop: the gateway is the one writer of spec.replicas (decision in scaling.py, load in traffic.py).

With several gateway replicas only the one holding the election Lease decides (`leading`, lease.py), from the
load summed over every live replica (`FleetLoad`, peers.py).

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
from dataclasses import dataclass

from ..clock import now_rfc3339
from ..errors import KubeError
from ..kube import LLAMA_SERVERS, Kube
from . import metrics
from .peers import FleetLoad
from .routing import Route, RoutingTable
from .scaling import Decision, ScalingPolicy, Signals, decide
from .traffic import Traffic

log = logging.getLogger(__name__)


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

    def __init__(self, kube: Kube | None, routes: RoutingTable, traffic: Traffic | FleetLoad, *,
                 interval: float = 1.0, leading: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], str] = now_rfc3339) -> None:
        self.kube = kube
        self.routes = routes
        self.traffic = traffic
        self.leading = leading
        """Whether this replica decides (it holds the election Lease); a lone gateway always does."""
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
        if not self.leading():
            # Not the decider: forget, so that on taking over it starts as a fresh gateway does (nothing scaled
            # down before scaleDownDelaySeconds, nothing to zero before idleSeconds).
            self._states.clear()
            return
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
