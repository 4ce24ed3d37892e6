"""The gateway's autoscaler: the pure decision (tables), the load window, and the controller's rules for
manual scales, its own writes and the status view (with a fake clock and a recording API)."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.gateway.autoscaler import Autoscaler
from llama_operator.gateway.routing import RoutingTable
from llama_operator.gateway.scaling import Decision, ScalingPolicy, Signals, decide
from llama_operator.gateway.traffic import LoadWindow, Traffic
from tests.conftest import server_body

P = ScalingPolicy(min_replicas=0, max_replicas=4, target_in_flight=2, idle_seconds=300, scale_down_delay_seconds=60,
                  window_seconds=30)
P1 = ScalingPolicy(min_replicas=1, max_replicas=3, target_in_flight=4, idle_seconds=300, scale_down_delay_seconds=0,
                   window_seconds=30)


@pytest.mark.parametrize(("policy", "signals", "replicas", "reason"), [
    # scale from zero: a held request wakes the server at once, with enough replicas for what waits
    (P, Signals(replicas=0, load=0.0, active=1, idle_for=0), 1, "ScaleFromZero"),
    (P, Signals(replicas=0, load=0.1, active=3, idle_for=0), 2, "ScaleFromZero"),
    (P, Signals(replicas=0, load=0.1, active=7, idle_for=0), 4, "ScaleFromZero"),
    (P, Signals(replicas=0, load=6.5, active=7, idle_for=0), 4, "ScaleFromZero"),
    # at zero, nothing waiting: stays
    (P, Signals(replicas=0, load=0.0, active=0, idle_for=5), 0, "ScaledToZero"),
    (P, Signals(replicas=0, load=0.0, active=0, idle_for=9999), 0, "ScaledToZero"),
    # load over target: up at once; capped by maxReplicas
    (P, Signals(replicas=1, load=3.0, active=3, idle_for=0), 2, "LoadAboveTarget"),
    (P, Signals(replicas=1, load=4.01, active=5, idle_for=0), 3, "LoadAboveTarget"),
    (P, Signals(replicas=2, load=100.0, active=50, idle_for=0), 4, "LoadAboveTarget"),
    (P, Signals(replicas=4, load=100.0, active=50, idle_for=0), 4, "AtTarget"),
    (P, Signals(replicas=2, load=4.0, active=4, idle_for=0), 2, "AtTarget"),
    # load under target: down only to the highest count wanted within the delay
    (P, Signals(replicas=3, load=1.0, active=1, idle_for=0, recent_peak=3), 3, "ScaleDownDelay"),
    (P, Signals(replicas=3, load=1.0, active=1, idle_for=0, recent_peak=2), 2, "LoadBelowTarget"),
    (P, Signals(replicas=3, load=1.0, active=1, idle_for=0, recent_peak=0), 1, "LoadBelowTarget"),
    # minReplicas 0: in use lately means at least 1; zero only after idleSeconds without a request
    (P, Signals(replicas=1, load=0.0, active=0, idle_for=299, recent_peak=1), 1, "AtTarget"),
    (P, Signals(replicas=2, load=0.0, active=0, idle_for=100, recent_peak=0), 1, "LoadBelowTarget"),
    (P, Signals(replicas=1, load=0.0, active=0, idle_for=300, recent_peak=1), 0, "Idle"),
    (P, Signals(replicas=1, load=0.4, active=0, idle_for=300, recent_peak=1), 0, "Idle"),  # stale window load
    (P, Signals(replicas=3, load=0.0, active=0, idle_for=301, recent_peak=3), 0, "Idle"),  # idle beats the delay
    (P, Signals(replicas=1, load=0.0, active=1, idle_for=0, recent_peak=1), 1, "AtTarget"),  # active: never idle
    # bounds: back to the nearest one at once
    (P, Signals(replicas=9, load=0.0, active=0, idle_for=0, recent_peak=9), 4, "AboveMaximum"),
    (P1, Signals(replicas=0, load=0.0, active=0, idle_for=9999), 1, "BelowMinimum"),
    (P1, Signals(replicas=0, load=9.0, active=9, idle_for=0), 3, "BelowMinimum"),
    # minReplicas 1 never idles to zero; no delay: straight down to what the load wants
    (P1, Signals(replicas=3, load=0.0, active=0, idle_for=9999), 1, "LoadBelowTarget"),
    (P1, Signals(replicas=1, load=0.0, active=0, idle_for=9999), 1, "AtTarget"),
    (P1, Signals(replicas=1, load=4.5, active=4, idle_for=0), 2, "LoadAboveTarget"),
])
def test_decide(policy: ScalingPolicy, signals: Signals, replicas: int, reason: str) -> None:
    decision = decide(policy, signals)
    assert (decision.replicas, decision.reason) == (replicas, reason), decision.message
    assert decision.message


def test_decision_messages_say_why() -> None:
    up = decide(P, Signals(replicas=1, load=3.0, active=3, idle_for=0))
    assert up.message == "load 3.00 in flight over 30s, target 2 per replica: 2 replicas"
    assert decide(P, Signals(replicas=1, load=0, active=0, idle_for=300)).message == (
        "no request for 300s (idleSeconds 300): scaling to zero")
    assert decide(P, Signals(replicas=0, load=0, active=3, idle_for=0)).message == (
        "3 request(s) waiting for a replica: scaling from zero to 2")


@pytest.mark.parametrize(("points", "now", "window", "mean"), [
    ([], 10, 10, 0.0),
    ([(0, 2)], 10, 10, 2.0),
    ([(5, 2)], 10, 10, 1.0),                  # 0 before the first point
    ([(0, 4), (5, 0)], 10, 10, 2.0),
    ([(0, 1), (2, 3), (8, 1)], 10, 10, 2.2),  # (2*1 + 6*3 + 2*1) / 10
    ([(0, 10), (95, 0)], 100, 10, 5.0),       # only the last 10 s count
    ([(0, 1), (50, 2)], 100, 10, 2.0),
])
def test_load_window_time_weighted_mean(points: list[tuple[float, float]], now: float, window: float,
                                        mean: float) -> None:
    load = LoadWindow()
    for t, value in points:
        load.set(t, value, horizon=window)
    assert load.mean(now, window) == pytest.approx(mean)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class RecordingApi:
    """The two writes the autoscaler makes: the scale subresource and a merge patch of status.autoscaling."""

    def __init__(self) -> None:
        self.scales: list[int] = []
        self.views: list[dict[str, Any]] = []

    async def scale(self, kind: Any, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        self.scales.append(replicas)
        return {"metadata": {"resourceVersion": f"w{len(self.scales)}"}, "spec": {"replicas": replicas}}

    async def patch_status(self, kind: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.views.append(status["autoscaling"])


def _setup(replicas: int, **scaling: Any) -> tuple[Autoscaler, RoutingTable, Traffic, RecordingApi, Clock]:
    clock = Clock()
    routes = RoutingTable()
    routes.upsert(server_body(replicas=replicas, scaling=scaling))
    traffic = Traffic(clock=clock)
    api = RecordingApi()
    autoscaler = Autoscaler(api, routes, traffic, clock=clock, wall=lambda: f"t{clock.t:.0f}")  # type: ignore[arg-type]
    return autoscaler, routes, traffic, api, clock


def _watch_echo(routes: RoutingTable, replicas: int, rv: str | None = None, **scaling: Any) -> None:
    """What the LlamaServer watch delivers: the echo of our write `w<n>` when rv says so, else someone else's."""
    body = server_body(replicas=replicas, scaling=scaling)
    body["metadata"]["resourceVersion"] = rv or f"other-{replicas}"
    routes.upsert(body)


async def _step(autoscaler: Autoscaler, routes: RoutingTable) -> Decision:
    route = routes.get("default/chat")
    assert route is not None
    decision = await autoscaler.step_one(route)
    assert decision is not None
    return decision


async def test_scale_from_zero_then_idle_back_to_zero() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 3, "idleSeconds": 60, "scaleDownDelaySeconds": 10}
    autoscaler, routes, traffic, api, clock = _setup(0, **scaling)
    assert (await _step(autoscaler, routes)).reason == "ScaledToZero"
    traffic.hold("default/chat")  # a request arrives: held, the autoscaler kicked
    assert (await _step(autoscaler, routes)).reason == "ScaleFromZero"
    assert api.scales == [1]
    # the watch has not echoed the write yet: it is not mistaken for someone else's scale
    clock.t += 1
    assert (await _step(autoscaler, routes)).replicas == 1 and api.scales == [1]
    _watch_echo(routes, 1, rv="w1", **scaling)
    traffic.release("default/chat")
    traffic.start("default/chat")
    clock.t += 2
    traffic.finish("default/chat")
    for _ in range(59):
        clock.t += 1
        await _step(autoscaler, routes)
    assert api.scales == [1]
    clock.t += 1
    decision = await _step(autoscaler, routes)
    assert (decision.replicas, decision.reason) == (0, "Idle") and api.scales == [1, 0]
    assert api.views[-1]["reason"] == "Idle" and api.views[-1]["desiredReplicas"] == 0
    assert api.views[-1]["lastScaleTime"] == f"t{clock.t:.0f}"


async def test_load_scales_up_and_down_after_the_delay() -> None:
    scaling = {"minReplicas": 1, "maxReplicas": 4, "targetInFlight": 2, "scaleDownDelaySeconds": 20,
               "windowSeconds": 10}
    autoscaler, routes, traffic, api, clock = _setup(1, **scaling)
    for _ in range(6):
        traffic.start("default/chat")
    for _ in range(10):
        clock.t += 1
        await _step(autoscaler, routes)
        if api.scales:
            _watch_echo(routes, api.scales[-1], rv=f"w{len(api.scales)}", **scaling)
    assert api.scales[-1] == 3  # 6 in flight / 2 per replica
    for _ in range(6):
        traffic.finish("default/chat")
    clock.t += 15
    assert (await _step(autoscaler, routes)).reason == "ScaleDownDelay"
    clock.t += 21
    decision = await _step(autoscaler, routes)
    assert (decision.replicas, decision.reason) == (1, "LoadBelowTarget")


async def test_kubectl_scale_inside_the_bounds_is_kept_for_the_delay() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 4, "idleSeconds": 120, "scaleDownDelaySeconds": 60}
    autoscaler, routes, traffic, api, clock = _setup(1, **scaling)
    assert (await _step(autoscaler, routes)).reason == "AtTarget"  # a fresh gateway counts as activity
    clock.t += 120
    assert (await _step(autoscaler, routes)).reason == "Idle"
    _watch_echo(routes, 0, rv="w1", **scaling)
    await _step(autoscaler, routes)
    _watch_echo(routes, 3, **scaling)  # kubectl scale lserver chat --replicas 3: pre-warming, no request yet
    decision = await _step(autoscaler, routes)
    assert (decision.replicas, decision.reason) == (3, "ManualScale")
    for _ in range(59):
        clock.t += 1
        assert (await _step(autoscaler, routes)).replicas == 3  # held for scaleDownDelaySeconds
    assert api.scales == [0]
    clock.t += 2
    decision = await _step(autoscaler, routes)
    assert (decision.replicas, decision.reason) == (1, "LoadBelowTarget")  # in use lately: not to zero yet
    _watch_echo(routes, 1, rv="w2", **scaling)
    clock.t += 60
    decision = await _step(autoscaler, routes)
    assert (decision.replicas, decision.reason) == (0, "Idle")  # idleSeconds counted from the manual scale
    assert api.scales == [0, 1, 0]


async def test_kubectl_scale_outside_the_bounds_is_put_back_once() -> None:
    scaling = {"minReplicas": 1, "maxReplicas": 2}
    autoscaler, routes, traffic, api, clock = _setup(1, **scaling)
    await _step(autoscaler, routes)
    _watch_echo(routes, 9, **scaling)
    decision = await _step(autoscaler, routes)
    assert (decision.replicas, decision.reason) == (2, "AboveMaximum")
    _watch_echo(routes, 2, rv="w1", **scaling)
    for _ in range(5):
        clock.t += 1
        await _step(autoscaler, routes)
    assert api.scales == [2]


async def test_a_restarted_gateway_scales_nothing_down_at_once() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 4, "idleSeconds": 30, "scaleDownDelaySeconds": 30}
    autoscaler, routes, traffic, api, clock = _setup(3, **scaling)
    for _ in range(29):
        await _step(autoscaler, routes)
        clock.t += 1
    assert api.scales == []


async def test_the_status_view_is_written_on_change_and_throttled_otherwise() -> None:
    scaling = {"minReplicas": 1, "maxReplicas": 2, "targetInFlight": 100}
    autoscaler, routes, traffic, api, clock = _setup(1, **scaling)
    await _step(autoscaler, routes)
    assert len(api.views) == 1
    view = api.views[0]
    assert set(view) == {"load", "inFlight", "queued", "desiredReplicas", "reason", "message", "updatedTime"}
    await _step(autoscaler, routes)
    assert len(api.views) == 1  # nothing changed
    traffic.start("default/chat")
    clock.t += 1
    await _step(autoscaler, routes)
    assert len(api.views) == 2 and api.views[-1]["inFlight"] == 1  # from idle to busy: at once
    traffic.start("default/chat")
    clock.t += 1
    await _step(autoscaler, routes)
    assert len(api.views) == 2  # only the load changed: at most every STATUS_INTERVAL
    clock.t += autoscaler.STATUS_INTERVAL
    await _step(autoscaler, routes)
    assert len(api.views) == 3 and api.views[-1]["inFlight"] == 2


async def test_servers_without_scaling_are_left_alone() -> None:
    clock = Clock()
    routes = RoutingTable()
    routes.upsert(server_body(replicas=0))
    api = RecordingApi()
    autoscaler = Autoscaler(api, routes, Traffic(clock=clock), clock=clock)  # type: ignore[arg-type]
    await autoscaler.step()
    assert api.scales == [] and api.views == []


async def test_someone_elses_scale_right_after_our_echo_is_seen_and_stale_events_are_not() -> None:
    scaling = {"minReplicas": 1, "maxReplicas": 3, "targetInFlight": 1, "scaleDownDelaySeconds": 0}
    autoscaler, routes, traffic, api, clock = _setup(1, **scaling)
    await _step(autoscaler, routes)
    traffic.start("default/chat")
    traffic.start("default/chat")
    clock.t += 30
    assert (await _step(autoscaler, routes)).replicas == 2 and api.scales == [2]
    # An event from before our write arrives late (the operator's status write, spec.replicas still 1): not a
    # manual scale, and nothing is written again.
    _watch_echo(routes, 1, rv="before-w1", **scaling)
    clock.t += 1
    assert (await _step(autoscaler, routes)).replicas == 2 and api.scales == [2]
    # Between two steps: the echo of our write, then kubectl scale --replicas 9.
    _watch_echo(routes, 2, rv="w1", **scaling)
    _watch_echo(routes, 9, rv="kubectl", **scaling)
    clock.t += 1
    decision = await _step(autoscaler, routes)
    assert (decision.replicas, decision.reason) == (3, "AboveMaximum") and api.scales == [2, 3]
