"""The load of every gateway replica, summed: what one replica reports, what the others' reports say, their sum.

Each replica reports, per LlamaServer with spec.scaling it has seen traffic for, its own requests in flight,
held, its load (the mean over that server's `windowSeconds`) and how long it has been idle (`report`). The
reports travel in an annotation of one Lease per replica (lease.py). `PeerLoads` keeps the other replicas'
latest reports, each stamped with when this replica *saw* it change (its own monotonic clock, so clock skew
between nodes does not matter); a report not renewed for `ttl` seconds is a dead replica's and counts no more.
`FleetLoad` is what the autoscaler reads (the interface of `Traffic`): this replica's own counts plus every live
peer's. Means over a window add up, so the sum of the replicas' loads is the load the fleet saw.

Reports are untrusted input (any writer of Leases in the namespace): bounded in size, entries and values.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import metrics
from .routing import RoutingTable
from .scaling import ScalingPolicy
from .traffic import Traffic

log = logging.getLogger(__name__)

LOAD_ANNOTATION = "llamacpp.dev/gateway-load"
"""The annotation of a replica's Lease holding its report (JSON)."""

MAX_REPORT_BYTES = 128 << 10
MAX_ENTRIES = 2000
"""A report names at most this many servers (the busiest first); a larger fleet needs its idle ones no less."""
_MAX_VALUE = 1e6


@dataclass(frozen=True)
class Entry:
    in_flight: int
    held: int
    load: float
    idle_for: float


def report(traffic: Traffic, routes: RoutingTable) -> dict[str, list[float]]:
    """This replica's counts for every scaled server it has seen a request for within idleSeconds (or has now)."""
    entries: list[tuple[str, Entry]] = []
    for route in routes.routes():
        policy = ScalingPolicy.of(route)
        if policy is None or not traffic.seen(route.key):
            continue
        traffic.set_horizon(route.key, policy.window_seconds)  # the decider's step does it only on the decider
        entry = Entry(traffic.in_flight(route.key), traffic.held(route.key),
                      traffic.load(route.key, policy.window_seconds), traffic.idle_for(route.key))
        if entry.in_flight or entry.held or entry.load > 1e-3 or entry.idle_for < policy.idle_seconds:
            entries.append((route.key, entry))
    entries.sort(key=lambda item: (-(item[1].in_flight + item[1].held), -item[1].load, item[1].idle_for))
    return {key: [e.in_flight, e.held, round(e.load, 3), round(e.idle_for, 1)] for key, e in entries[:MAX_ENTRIES]}


def encode(entries: Mapping[str, list[float]]) -> str:
    return json.dumps({"v": 1, "servers": entries}, separators=(",", ":"))


def decode(text: str) -> dict[str, Entry]:
    """A peer's report; raises ValueError with one line saying what is wrong."""
    if len(text) > MAX_REPORT_BYTES:
        raise ValueError(f"report of {len(text)} bytes, over {MAX_REPORT_BYTES}")
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("servers"), dict):
        raise ValueError("not a version 1 report")
    servers: dict[str, Any] = data["servers"]
    if len(servers) > MAX_ENTRIES:
        raise ValueError(f"{len(servers)} servers, over {MAX_ENTRIES}")
    entries = {}
    for key, value in servers.items():
        if not (isinstance(value, list) and len(value) == 4
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
                and all(0 <= v <= _MAX_VALUE and math.isfinite(v) for v in value)):
            raise ValueError(f"server {key[:100]!r}: want [in flight, held, load, idle seconds], non-negative")
        entries[key] = Entry(int(value[0]), int(value[1]), float(value[2]), float(value[3]))
    return entries


@dataclass
class _Peer:
    entries: dict[str, Entry]
    version: str | None
    seen_at: float


class PeerLoads:
    """The other replicas' reports, fed by a watch of their Leases (replace/upsert/remove as in watch.py)."""

    def __init__(self, identity: str, *, ttl: float, clock: Callable[[], float] = time.monotonic,
                 on_held: Callable[[], None] = lambda: None) -> None:
        self.identity = identity
        self.ttl = ttl
        self._clock = clock
        self._on_held = on_held
        self._peers: dict[str, _Peer] = {}
        self._bad: set[str] = set()

    def replace(self, leases: Iterable[Mapping[str, Any]], _namespace: str | None) -> None:
        known = set()
        for lease in leases:
            known.add(self.upsert(lease))
        for name in set(self._peers) - known:
            del self._peers[name]

    def upsert(self, lease: Mapping[str, Any]) -> str:
        meta = lease.get("metadata") or {}
        name = str(meta.get("name") or "")
        holder = (lease.get("spec") or {}).get("holderIdentity")
        if holder == self.identity:
            return name
        version = meta.get("resourceVersion")
        previous = self._peers.get(name)
        if previous is not None and previous.version == version:
            return name  # the same write seen again (a relist): not a renewal
        try:
            entries = decode(str((meta.get("annotations") or {}).get(LOAD_ANNOTATION) or ""))
        except ValueError as exc:
            if name not in self._bad:
                log.warning("gateway replica Lease %s: its load report is ignored: %s", name, str(exc)[:200])
                self._bad.add(name)
            self._peers.pop(name, None)
            return name
        self._bad.discard(name)
        self._peers[name] = _Peer(entries, version, self._clock())
        if any(entry.held for entry in entries.values()):
            self._on_held()  # a request held on another replica: the decider looks at once
        return name

    def remove(self, lease: Mapping[str, Any]) -> None:
        self._peers.pop(str((lease.get("metadata") or {}).get("name") or ""), None)

    def live(self) -> list[tuple[dict[str, Entry], float]]:
        """(entries, seconds since seen) of every peer renewed within ttl."""
        now = self._clock()
        found = [(peer.entries, now - peer.seen_at) for peer in self._peers.values() if now - peer.seen_at <= self.ttl]
        metrics.PEERS.set(len(found))
        return found

    def stale(self, older_than: float) -> list[str]:
        """Names of peer Leases not renewed for `older_than` seconds (dead replicas' leftovers)."""
        now = self._clock()
        return [name for name, peer in self._peers.items() if now - peer.seen_at > older_than]


class FleetLoad:
    """The autoscaler's view: this replica's Traffic plus every live peer's report (Traffic's read interface)."""

    def __init__(self, traffic: Traffic, peers: PeerLoads) -> None:
        self.traffic = traffic
        self.peers = peers

    def _entries(self, key: str) -> list[tuple[Entry, float]]:
        return [(entries[key], age) for entries, age in self.peers.live() if key in entries]

    def set_horizon(self, key: str, seconds: float) -> None:
        self.traffic.set_horizon(key, seconds)

    def touch(self, key: str) -> None:
        self.traffic.touch(key)

    def in_flight(self, key: str) -> int:
        return self.traffic.in_flight(key) + sum(entry.in_flight for entry, _ in self._entries(key))

    def held(self, key: str) -> int:
        return self.traffic.held(key) + sum(entry.held for entry, _ in self._entries(key))

    def active(self, key: str) -> int:
        peers = sum(entry.in_flight + entry.held for entry, _ in self._entries(key))
        metrics.PEER_ACTIVE.labels(key).set(peers)
        active = self.traffic.active(key) + peers
        metrics.FLEET_ACTIVE.labels(key).set(active)
        return active

    def load(self, key: str, window: float) -> float:
        return self.traffic.load(key, window) + sum(entry.load for entry, _ in self._entries(key))

    def idle_for(self, key: str) -> float:
        """The least idle replica's idle time (0 while any has a request), aged by how old its report is."""
        idle = self.traffic.idle_for(key)
        for entry, age in self._entries(key):
            idle = min(idle, 0.0 if entry.in_flight + entry.held else entry.idle_for + age)
        return idle
