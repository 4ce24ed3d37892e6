"""The memory budget of a router-mode replica: which loaded models to unload before another one loads. Pure.

Given the models one llama-server router has in memory (each with the operator's estimate, when the gateway last
sent it a request and how many of its requests are in flight), the budget and the model a request names,
`make_room` answers which idle models to unload, least recently used first, so that the estimates of what stays
plus the new model fit; or that the model cannot fit even alone (refused, with the numbers); or that the idle
models are not enough because busy ones hold the memory (the caller waits for them or answers busy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..fit import format_bytes


@dataclass(frozen=True)
class Resident:
    """One model the router has loaded (or is loading)."""

    name: str
    estimate: int
    """Bytes, the operator's estimate for this model's instance."""
    last_used: float = 0.0
    """When the gateway last sent it a request (monotonic seconds; 0: never through this gateway)."""
    in_flight: int = 0
    """Requests for it in flight through this gateway: a busy model is never unloaded under its requests."""


@dataclass(frozen=True)
class Room:
    """`make_room`'s answer."""

    unload: tuple[str, ...] = ()
    """Idle models to unload, in order, before the new one loads."""
    refused: str | None = None
    """Set when the model cannot fit even alone: one line with the numbers, for the client."""
    busy: tuple[str, ...] = ()
    """Set when unloading every idle model is not enough: the busy models that hold the rest."""

    @property
    def fits(self) -> bool:
        return self.refused is None and not self.busy


def make_room(resident: Sequence[Resident], budget: int, name: str, estimate: int) -> Room:
    """Which of the `resident` models to unload so that `name` (needing `estimate` bytes) fits in `budget`."""
    if estimate > budget:
        return Room(refused=f"model {name} needs an estimated {format_bytes(estimate)}, more than the server's "
                            f"memory budget of {format_bytes(budget)} even with no other model loaded")
    others = [r for r in resident if r.name != name]
    if len(others) < len(resident):
        return Room()  # already loaded (or loading): it takes no more memory than it does now
    over = sum(r.estimate for r in others) + estimate - budget
    unload: list[str] = []
    for candidate in sorted((r for r in others if r.in_flight == 0), key=lambda r: (r.last_used, r.name)):
        if over <= 0:
            break
        unload.append(candidate.name)
        over -= candidate.estimate
    if over > 0:
        return Room(unload=tuple(unload), busy=tuple(sorted(r.name for r in others if r.in_flight > 0)))
    return Room(unload=tuple(unload))
