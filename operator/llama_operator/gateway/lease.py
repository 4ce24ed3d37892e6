"""The gateway replicas' coordination through Leases (coordination.k8s.io) in the release namespace, on the one
Lease client (kube/lease.py) and the operator's election algorithm (leader.py).

- `Decider`: one Lease (`--lease-name`) whose holder is the one replica that decides and writes spec.replicas
  and status.autoscaling, elected by leader.py's `LeaderElector` (client-go's rules: renewals every period, a
  takeover only after the Lease went unchanged for its duration on the candidate's own clock, compare-and-swap
  writes, a holder that could not renew within the renew deadline stops before anyone may take over). Unlike the
  operator, which exits when it loses its Lease (a kopf handler cannot be stopped from outside), a replica that
  lost it only stops deciding (the autoscaler reads `leading` at the start of each decision step) and runs for
  the Lease again. A replica that stops gracefully gives the Lease up, so the next takes over within one period.
- `Publisher`: one Lease per replica (`<lease-name>-<identity>`, label `llamacpp.dev/gateway-load`) whose
  annotation is this replica's report (peers.py), rewritten every `period`, and at once when a request starts
  to be held (a held request on any replica must wake its server). Every replica watches these Leases.
- `Coordination`: both for one replica, with the timings (renewals every 2 s, a report's TTL 6 s, the Lease's
  10 s and its renew deadline 7 s), the leader's deletion of Leases of replicas long gone, and the graceful stop.

A restarted replica keeps its pod name (its identity), so it renews its own election Lease at once, as client-go
does. Every write is a PUT with the last resourceVersion seen (a conflict is a lost race, never an overwrite).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..clock import now_rfc3339
from ..errors import Conflict, KubeError, NotFound
from ..kube.lease import KubeLeaseStore, LeaseApi, lease_body, spec_from_record
from ..leader import ElectionConfig, LeaderElector, LeaseRecord, LeaseStore
from . import metrics
from .peers import LOAD_ANNOTATION, PeerLoads

log = logging.getLogger(__name__)

PEER_LABEL = "llamacpp.dev/gateway-load"
"""Label of the per-replica Leases; its value is the election Lease's name (one group per release)."""


class Decider:
    """Whether this replica holds the autoscaler's Lease (`leading`): `run` elects again after every loss."""

    def __init__(self, config: ElectionConfig, store: LeaseStore, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.config = config
        self.leading = False
        self.elector = LeaderElector(config, store, on_started=self._started, on_stopped=self._stopped,
                                     monotonic=monotonic, sleep=sleep)
        self._sleep = sleep
        self._task: asyncio.Task[Any] | None = None

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            log.info("gateway %s %s the autoscaler's Lease %s/%s", self.config.identity,
                     "now holds" if leading else "no longer holds", self.config.namespace, self.config.name)
        self.leading = leading
        metrics.LEADER.set(1 if leading else 0)

    async def _started(self) -> None:
        self._set(True)

    async def _stopped(self) -> None:
        self._set(False)

    async def run(self) -> None:
        """Elect, lead until the Lease is lost, and elect again; until `release` (or cancelled)."""
        self._task = asyncio.current_task()
        while True:
            try:
                await self.elector.run()  # returns once leadership is lost, after _stopped
            except Exception as exc:  # noqa: BLE001 - a dead loop would never decide again on this replica
                self._set(False)
                log.warning("gateway leader election: %s", str(exc)[:300] or type(exc).__name__)
                await self._sleep(self.config.retry_period)

    async def release(self) -> None:
        """A graceful stop: end the election first (no renewal may follow the release), then give the Lease up."""
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})
        self._set(False)
        await self.elector.release()


class Publisher:
    """This replica's report in its own Lease: every `period`, and at once on `kick` (a request held)."""

    def __init__(self, api: LeaseApi, group: str, identity: str, report: Callable[[], str], *,
                 period: float = 2.0, ttl: float = 6.0) -> None:
        self.api = api
        self.name = f"{group}-{identity}"[:253]
        self.group = group
        self.identity = identity
        self.report = report
        self.period = period
        self.ttl = ttl
        self._kick = asyncio.Event()
        self._stored: dict[str, Any] | None = None

    def kick(self) -> None:
        self._kick.set()

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:  # the loop goes on whatever failed
                self._stored = None  # read it again next time
                log.warning("gateway: cannot publish this replica's load: %s", str(exc)[:300] or type(exc).__name__)
            try:
                await asyncio.wait_for(self._kick.wait(), self.period)
            except TimeoutError:
                pass
            self._kick.clear()

    def _body(self, version: str | None) -> dict[str, Any]:
        now = now_rfc3339(micro=True)
        spec = spec_from_record(LeaseRecord(holder=self.identity, lease_duration=self.ttl, acquire_time=now,
                                            renew_time=now))
        return lease_body(self.name, spec, labels={PEER_LABEL: self.group},
                          annotations={LOAD_ANNOTATION: self.report()}, resource_version=version)

    async def publish(self) -> None:
        if self._stored is None:
            self._stored = await self.api.get(self.name)
        if self._stored is None:
            try:
                self._stored = await self.api.create(self._body(None))
            except Conflict:
                self._stored = None
            return
        version = (self._stored.get("metadata") or {}).get("resourceVersion")
        try:
            self._stored = await self.api.replace(self._body(version))
        except (Conflict, NotFound):
            self._stored = None

    async def withdraw(self) -> None:
        """Delete this replica's Lease (a graceful stop): its load is gone from the leader's view at once."""
        await self.api.delete(self.name)


class Coordination:
    """The three parts together for one replica: its election, its report, and the watch of the others'."""

    PERIOD = 2.0
    """Seconds between renewals of the election Lease and of this replica's report."""
    PEER_TTL = 6.0
    """A report unrenewed this long is a dead replica's: its load leaves the sum (three missed renewals)."""
    LEASE_SECONDS = 10.0
    """The election Lease's duration: a killed leader is replaced within this plus one PERIOD."""
    RENEW_DEADLINE = 7.0
    """A decider that could not renew for this long stops deciding, before anyone may take over (< LEASE_SECONDS)."""
    FORGET_SECONDS = 300.0
    """A dead replica's Lease is deleted by the leader after this long (pod names do not come back)."""

    def __init__(self, api: LeaseApi, name: str, identity: str, report: Callable[[], str],
                 on_held: Callable[[], None], *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.api = api
        self.name = name
        config = ElectionConfig(namespace=api.namespace, name=name, identity=identity,
                                lease_duration=self.LEASE_SECONDS, renew_deadline=self.RENEW_DEADLINE,
                                retry_period=self.PERIOD)
        self.election = Decider(config, KubeLeaseStore(api, name), monotonic=clock, sleep=sleep)
        self.publisher = Publisher(api, name, identity, report, period=self.PERIOD, ttl=self.PEER_TTL)
        self.peers = PeerLoads(identity, ttl=self.PEER_TTL, clock=clock, on_held=on_held)

    @property
    def selector(self) -> str:
        return f"{PEER_LABEL}={self.name}"

    async def forget_dead(self) -> None:
        """The leader deletes Leases of replicas gone for FORGET_SECONDS (a SIGKILLed pod never withdraws)."""
        while True:
            await asyncio.sleep(60)
            if not self.election.leading:
                continue
            for name in self.peers.stale(self.FORGET_SECONDS):
                try:
                    await self.api.delete(name)
                    log.info("deleted the Lease %s of a gateway replica gone for %.0fs", name, self.FORGET_SECONDS)
                except KubeError as exc:
                    log.warning("cannot delete the Lease %s of a gone gateway replica: %s", name, exc)

    async def stop(self) -> None:
        """Give up the election and withdraw the report, within a few seconds whatever the API server does."""
        for step in (self.election.release, self.publisher.withdraw):
            try:
                await asyncio.wait_for(step(), 3.0)
            except Exception as exc:  # stopping goes on: the Lease then expires, the report ages out
                log.warning("gateway stopping: %s", str(exc)[:300] or type(exc).__name__)
