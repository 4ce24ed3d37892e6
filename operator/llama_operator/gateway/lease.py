"""The gateway replicas' coordination through Leases (coordination.k8s.io) in the release namespace.

- `Election`: one Lease (`--lease-name`) whose holder is the one replica that decides and writes spec.replicas
  and status.autoscaling. Client-go's rules: the holder renews every `period`; a replica that has seen the
  Lease unchanged (by its own clock) for `leaseDurationSeconds` takes it over with a compare-and-swap write
  (resourceVersion), so two candidates never both win; a holder that could not renew for `renew_deadline`
  (< the duration) stops deciding before anyone may take over. A replica that stops gracefully gives the Lease
  up, so the next takes over within one period.
- `Publisher`: one Lease per replica (`<lease-name>-<identity>`, label `llamacpp.dev/gateway-load`) whose
  annotation is this replica's report (peers.py), rewritten every `period`, and at once when a request starts
  to be held (a held request on any replica must wake its server). Every replica watches these Leases.
- `Coordination`: both for one replica, with the timings (renewals every 2 s, a report's TTL 6 s, the Lease's
  10 s), the leader's deletion of Leases of replicas long gone, and the graceful stop.

`LeaseApi` calls the API through the client's public ApiClient (the operator's `Kube` has no PUT with a
resourceVersion); a restarted replica keeps its pod name, so it renews its own Lease, as client-go does.

Every write is a PUT with the last resourceVersion seen (a conflict is a lost race, never an overwrite).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from ..clock import now_rfc3339
from ..errors import Conflict, KubeError, NotFound, Unavailable
from ..kube import ResourceKind, translate
from . import metrics
from .peers import LOAD_ANNOTATION, PeerLoads

log = logging.getLogger(__name__)

LEASES = ResourceKind("coordination.k8s.io", "v1", "leases")
PEER_LABEL = "llamacpp.dev/gateway-load"
"""Label of the per-replica Leases; its value is the election Lease's name (one group per release)."""


class LeaseApi:
    """GET, POST, PUT and DELETE of Leases in one namespace, each bounded to `timeout` seconds."""

    def __init__(self, api: ApiClient, namespace: str, *, timeout: float = 5.0) -> None:
        self._api = api
        self.namespace = namespace
        self._timeout = timeout

    def _call_sync(self, method: str, name: str | None, body: Any) -> Any:
        path = LEASES.path(self.namespace, name)
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        _, url, headers, body, _ = self._api.param_serialize(method=method, resource_path=path, query_params=[],
                                                             header_params=headers, body=body,
                                                             auth_settings=["BearerToken"])
        try:
            response = self._api.call_api(method, url, header_params=headers, body=body,
                                          _request_timeout=self._timeout)
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"{method} {path}: {exc}") from exc
        data = response.read()
        if not 200 <= response.status <= 299:
            raise translate(ApiException(status=response.status, reason=response.reason,
                                         body=data.decode("utf-8", "replace")), f"{method} {path}",
                            f"{method.lower()} leases.coordination.k8s.io in namespace {self.namespace}")
        return json.loads(data) if data else None

    async def _call(self, method: str, name: str | None = None, body: Any = None) -> Any:
        return await asyncio.to_thread(self._call_sync, method, name, body)

    async def get(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(await self._call("GET", name))
        except NotFound:
            return None

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("POST", None, body))

    async def replace(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(await self._call("PUT", body["metadata"]["name"], body))

    async def delete(self, name: str) -> None:
        try:
            await self._call("DELETE", name)
        except NotFound:
            pass


def lease_body(name: str, holder: str, duration: int, *, labels: dict[str, str] | None = None,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
    now = now_rfc3339(micro=True)
    metadata: dict[str, Any] = {"name": name, "labels": labels or {}, "annotations": annotations or {}}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "acquireTime": now,
                     "renewTime": now, "leaseTransitions": 0}}


class Election:
    """Whether this replica holds the election Lease (`leading`), kept current by `run`."""

    def __init__(self, api: LeaseApi, name: str, identity: str, *, duration: int = 10, period: float = 2.0,
                 renew_deadline: float = 7.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.name = name
        self.identity = identity
        self.duration = duration
        self.period = period
        self.renew_deadline = renew_deadline
        self._clock = clock
        self.leading = False
        self._renewed = -1e18
        self._observed: tuple[str | None, float] = (None, 0.0)

    async def run(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.period)

    def _set(self, leading: bool) -> None:
        if leading != self.leading:
            log.info("gateway %s %s the autoscaler's Lease %s/%s", self.identity,
                     "now holds" if leading else "no longer holds", self.api.namespace, self.name)
        self.leading = leading
        metrics.LEADER.set(1 if leading else 0)

    async def step(self) -> None:
        now = self._clock()
        try:
            self._set(await self._try(now))
        except Exception as exc:  # whatever failed, the loop goes on: a dead loop would lead without renewing
            if self.leading and now - self._renewed > self.renew_deadline:
                self._set(False)  # could not renew in time: another replica may take over soon
            log.warning("gateway leader election: %s", str(exc)[:300] or type(exc).__name__)

    async def _try(self, now: float) -> bool:
        lease = await self.api.get(self.name)
        if lease is None:
            try:
                await self.api.create(lease_body(self.name, self.identity, self.duration))
            except Conflict:
                return False  # another replica created it first
            self._renewed = now
            return True
        spec = lease.setdefault("spec", {})
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if version != self._observed[0]:
            self._observed = (version, now)
        holder = spec.get("holderIdentity")
        duration = min(max(int(spec.get("leaseDurationSeconds") or self.duration), 1), 300)
        if holder != self.identity and holder and now - self._observed[1] <= duration:
            return False  # held, and renewed lately
        stamp = now_rfc3339(micro=True)
        if holder != self.identity:
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
            spec["acquireTime"] = stamp
            log.info("gateway %s takes the Lease over from %r (unrenewed for %.1fs)", self.identity, holder,
                     now - self._observed[1])
        spec.update(holderIdentity=self.identity, renewTime=stamp, leaseDurationSeconds=self.duration)
        try:
            stored = await self.api.replace(lease)
        except Conflict:
            return False  # someone wrote it in between: look again next period
        self._observed = ((stored.get("metadata") or {}).get("resourceVersion"), now)
        self._renewed = now
        return True

    async def release(self) -> None:
        """Give the Lease up (a graceful stop): the next replica takes over within one period."""
        if not self.leading:
            return
        self._set(False)
        lease = await self.api.get(self.name)
        if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
            lease["spec"]["holderIdentity"] = None
            await self.api.replace(lease)


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

    async def publish(self) -> None:
        body = lease_body(self.name, self.identity, max(1, round(self.ttl)), labels={PEER_LABEL: self.group},
                          annotations={LOAD_ANNOTATION: self.report()})
        if self._stored is None:
            self._stored = await self.api.get(self.name)
        if self._stored is None:
            try:
                self._stored = await self.api.create(body)
            except Conflict:
                self._stored = None
            return
        body["metadata"]["resourceVersion"] = (self._stored.get("metadata") or {}).get("resourceVersion")
        try:
            self._stored = await self.api.replace(body)
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
    LEASE_SECONDS = 10
    """The election Lease's duration: a killed leader is replaced within this plus one PERIOD."""
    FORGET_SECONDS = 300.0
    """A dead replica's Lease is deleted by the leader after this long (pod names do not come back)."""

    def __init__(self, api: LeaseApi, name: str, identity: str, report: Callable[[], str],
                 on_held: Callable[[], None]) -> None:
        self.api = api
        self.name = name
        self.election = Election(api, name, identity, duration=self.LEASE_SECONDS, period=self.PERIOD)
        self.publisher = Publisher(api, name, identity, report, period=self.PERIOD, ttl=self.PEER_TTL)
        self.peers = PeerLoads(identity, ttl=self.PEER_TTL, on_held=on_held)

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
