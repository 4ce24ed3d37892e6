"""The autoscaler's decision (pure): how many replicas a server with spec.scaling should have now, and why.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .routing import Route


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
