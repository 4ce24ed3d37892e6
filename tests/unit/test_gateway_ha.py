"""Several gateway replicas: one decider elected through a Lease (leader.py's elector, run again after a loss, on
kube/lease.py's `KubeLeaseStore`), the load summed over live replicas' reports, a dead replica's report aging out, a
request held on a non-deciding replica waking its server (virtual time, an in-memory Lease API with the API server's
compare-and-swap)."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from llama_operator.errors import Conflict, NotFound, Unavailable
from llama_operator.gateway.autoscaler import Autoscaler
from llama_operator.gateway.lease import PEER_LABEL, Coordination
from llama_operator.gateway.peers import LOAD_ANNOTATION, FleetLoad, PeerLoads, decode, encode, report
from llama_operator.gateway.routing import RoutingTable
from llama_operator.gateway.traffic import Traffic
from llama_operator.kube.lease import lease_body
from tests.conftest import server_body
from tests.unit.test_gateway_autoscaler import RecordingApi
from tests.unit.test_leader import VirtualClock

KEY = "default/chat"
PERIOD, LEASE, DEADLINE = Coordination.PERIOD, Coordination.LEASE_SECONDS, Coordination.RENEW_DEADLINE


class Clock(VirtualClock):
    """test_leader's virtual time (the elections sleep on it), also the clock Traffic, peers and autoscalers read."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeLeases:
    """Leases as the API server keeps them: a resourceVersion per write, 409 on a stale one; `watchers` get every
    write of a replica's Lease (the watch of the reports), `writes` logs the election Lease's (time, holder)."""

    namespace = "llama-system"

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.store: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.watchers: list[Callable[[dict[str, Any]], object]] = []
        self.writes: list[tuple[float, str]] = []
        self.conflicts = 0
        self.down = False
        self.slow_reads = False

    def _stored(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise Unavailable("the API server is down")
        self.version += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.version)
        self.store[body["metadata"]["name"]] = body
        if PEER_LABEL in body["metadata"].get("labels", {}):
            for watcher in self.watchers:  # the watch's label selector: the replicas' Leases, not the election's
                watcher(copy.deepcopy(body))
        else:
            self.writes.append((self.clock.now, body["spec"]["holderIdentity"] or ""))
        return copy.deepcopy(body)

    async def get(self, name: str) -> dict[str, Any] | None:
        if self.down:
            raise Unavailable("the API server is down")
        body = copy.deepcopy(self.store.get(name))
        if self.slow_reads:
            await asyncio.sleep(0)  # the answer is on its way while another candidate reads too
        return body

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["metadata"]["name"] in self.store:
            raise Conflict("already exists")
        return self._stored(body)

    async def replace(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if name not in self.store:
            raise NotFound("gone")
        if body["metadata"].get("resourceVersion") != self.store[name]["metadata"]["resourceVersion"]:
            self.conflicts += 1
            raise Conflict("the object has been modified")
        return self._stored(body)

    async def delete(self, name: str) -> None:
        self.store.pop(name, None)

    def last_write(self, holder: str) -> float:
        return max(t for t, who in self.writes if who == holder)

    def first_write(self, holder: str, after: float = 0.0) -> float:
        return min(t for t, who in self.writes if who == holder and t > after)


class Replica:
    """One gateway replica's process: its traffic, its `Coordination` (the production one, on the fake API and the
    virtual clock), its autoscaler; `kill` is a SIGKILL (nothing more written), `restart` a new process under
    the same pod name."""

    def __init__(self, name: str, leases: FakeLeases, clock: Clock, routes: RoutingTable) -> None:
        self.name, self.leases, self.clock, self.routes = name, leases, clock, routes
        self.traffic = Traffic(clock=clock)
        self.api = RecordingApi()
        self.kicked = 0
        self.alive = False
        self.task: asyncio.Task[None] | None = None
        self._boot()

    def _boot(self) -> None:
        self.coordination = Coordination(self.leases, "gw", self.name,  # type: ignore[arg-type]
                                         lambda: encode(report(self.traffic, self.routes)), on_held=self._kick,
                                         clock=self.clock, sleep=self.clock.sleep)
        self.election, self.publisher, self.peers = (self.coordination.election, self.coordination.publisher,
                                                     self.coordination.peers)
        self.leases.watchers.append(self.peers.upsert)
        self.autoscaler = Autoscaler(self.api, self.routes, FleetLoad(self.traffic, self.peers),  # type: ignore[arg-type]
                                     leading=lambda: self.election.leading, clock=self.clock, wall=lambda: "t")

    def _kick(self) -> None:
        self.kicked += 1

    def start(self) -> None:
        self.alive = True
        self.task = asyncio.create_task(self.election.run())

    def kill(self) -> None:
        assert self.task is not None
        self.task.cancel()
        self.alive = False
        self.leases.watchers.remove(self.peers.upsert)

    def restart(self) -> None:
        self._boot()
        self.start()


async def _fleet(replicas: int, *, start: bool = True,
                 **scaling: Any) -> tuple[list[Replica], RoutingTable, FakeLeases, Clock]:
    clock, routes = Clock(), RoutingTable()
    leases = FakeLeases(clock)
    routes.upsert(server_body(replicas=replicas, scaling=scaling))
    fleet = [Replica(name, leases, clock, routes) for name in ("gw-a", "gw-b")]
    if start:  # gw-a first: it creates the Lease, gw-b finds it held half a second later
        fleet[0].start()
        await clock.run_until(clock.now + 0.5)
        fleet[1].start()
        await clock.run_until(clock.now)
    return fleet, routes, leases, clock


async def _round(fleet: list[Replica], clock: Clock, seconds: float = 2.0) -> None:
    await clock.run_until(clock.now + seconds)
    for replica in fleet:
        if replica.alive:
            await replica.publisher.publish()
    for replica in fleet:
        if replica.alive:
            await replica.autoscaler.step()


def _stop(fleet: list[Replica]) -> None:
    for replica in fleet:
        if replica.task is not None:
            replica.task.cancel()


async def test_one_replica_decides_and_the_load_is_summed_over_both() -> None:
    fleet, routes, _, clock = await _fleet(1, minReplicas=1, maxReplicas=4, targetInFlight=2, windowSeconds=4)
    a, b = fleet
    for _ in range(2):
        a.traffic.start(KEY)
        b.traffic.start(KEY)
    await _round(fleet, clock)
    assert [r.election.leading for r in fleet] == [True, False]
    # Alone each replica sees 2 in flight (1 replica at target 2); the decider sees the 4 of both.
    for _ in range(3):
        await _round(fleet, clock)
    assert a.api.scales == [2] and b.api.scales == [] and b.api.views == []
    assert [v["reason"] for v in a.api.views][:2] == ["AtTarget", "LoadAboveTarget"]
    assert a.api.views[-1]["inFlight"] == 4
    fleet_load = FleetLoad(a.traffic, a.peers)
    assert fleet_load.in_flight(KEY) == 4 and fleet_load.load(KEY, 4) == pytest.approx(4.0)
    _stop(fleet)


async def test_a_held_request_on_the_other_replica_wakes_the_server_from_zero() -> None:
    fleet, routes, leases, clock = await _fleet(0, minReplicas=0, maxReplicas=3, idleSeconds=60)
    a, b = fleet
    await _round(fleet, clock)
    assert a.election.leading and not b.election.leading and a.api.scales == []
    b.traffic.hold(KEY)  # held on the replica that does not decide; its publisher is kicked at once
    await b.publisher.publish()
    assert a.kicked == 1, "the decider is woken by the report, not at its next period"
    await a.autoscaler.step()
    assert a.api.scales == [1] and a.api.views[-1]["reason"] == "ScaleFromZero"
    assert a.api.views[-1]["queued"] == 1 and b.api.scales == []
    assert json.loads(leases.store["gw-gw-b"]["metadata"]["annotations"][LOAD_ANNOTATION])["servers"][KEY][1] == 1
    _stop(fleet)


async def test_a_dead_replicas_load_ages_out_and_a_dead_leader_is_replaced() -> None:
    fleet, routes, leases, clock = await _fleet(1, minReplicas=1, maxReplicas=4, targetInFlight=1, windowSeconds=2)
    a, b = fleet
    b.traffic.start(KEY)
    b.traffic.start(KEY)
    await _round(fleet, clock)
    await _round(fleet, clock)
    assert FleetLoad(a.traffic, a.peers).in_flight(KEY) == 2
    # b is SIGKILLed: it renews nothing more; its 2 requests count for at most the TTL (6 s) after its last report
    b.kill()
    for _ in range(3):
        await _round(fleet, clock)
        assert FleetLoad(a.traffic, a.peers).in_flight(KEY) == 2
    await clock.run_until(clock.now + 0.5)
    assert FleetLoad(a.traffic, a.peers).in_flight(KEY) == 0 and a.peers.live() == []
    # b restarts under its pod name: while the decider renews, it never takes the Lease.
    b.restart()
    await clock.run_until(clock.now + 30)
    assert a.election.leading and not b.election.leading and {who for _, who in leases.writes} == {"gw-a"}
    # Now the decider dies: b takes over only once the Lease went unrenewed for its duration (10 s) on b's own
    # clock, and within the duration and two periods (b saw the last renewal up to one period late).
    a.kill()
    last_renewal = leases.last_write("gw-a")
    await clock.run_until(clock.now + 30)
    took = leases.first_write("gw-b")
    assert LEASE <= took - last_renewal <= LEASE + 2 * PERIOD
    assert b.election.leading and b.api is not None
    lease = leases.store["gw"]
    assert lease["spec"]["holderIdentity"] == "gw-b" and lease["spec"]["leaseTransitions"] == 1
    # The old leader, back under its pod name, sees the Lease held and renewed: it does not decide.
    a.restart()
    await clock.run_until(clock.now + 30)
    assert not a.election.leading and b.election.leading
    _stop(fleet)


async def test_a_leader_that_cannot_renew_stops_deciding_before_anyone_may_take_over() -> None:
    fleet, routes, leases, clock = await _fleet(1, minReplicas=1, maxReplicas=4)
    a, b = fleet
    await _round(fleet, clock)
    assert a.election.leading
    last_renewal = leases.last_write("gw-a")
    leases.down = True
    await clock.run_until(last_renewal + 6)
    assert a.election.leading, "within the renew deadline (7 s) it still decides"
    await clock.run_until(last_renewal + DEADLINE + 1)
    assert not a.election.leading, "past it (at its next try), it stops: a standby may take over only after 10 s"
    assert DEADLINE + 1 < LEASE
    written = len(a.api.views)
    a.traffic.start(KEY)
    await a.autoscaler.step()
    assert a.api.scales == [] and len(a.api.views) == written, "a replica that does not lead writes nothing"
    _stop(fleet)


async def test_a_replica_that_lost_the_lease_runs_for_it_again() -> None:
    fleet, routes, leases, clock = await _fleet(1, minReplicas=1, maxReplicas=4)
    a, b = fleet
    b.kill()
    await _round(fleet, clock)
    leases.down = True
    await clock.run_until(clock.now + 20)
    assert not a.election.leading and a.task is not None and not a.task.done()
    leases.down = False
    back = clock.now
    await clock.run_until(back + PERIOD)
    assert a.election.leading and leases.first_write("gw-a", after=back) - back <= PERIOD
    _stop(fleet)


async def test_a_graceful_stop_releases_the_lease_and_the_other_takes_over_at_its_next_try() -> None:
    fleet, routes, leases, clock = await _fleet(1, minReplicas=1, maxReplicas=4)
    a, b = fleet
    await _round(fleet, clock)
    assert a.election.leading and "gw-gw-a" in leases.store
    await a.coordination.stop()
    released = clock.now
    assert leases.store["gw"]["spec"]["holderIdentity"] is None and not a.election.leading
    assert "gw-gw-a" not in leases.store, "its report is withdrawn"
    await clock.run_until(released + 20)
    assert b.election.leading and leases.first_write("gw-b") - released <= PERIOD
    assert {who for t, who in leases.writes if t > released} == {"gw-b"}, "no renewal after the release"
    _stop(fleet)


async def test_two_candidates_racing_for_a_free_lease_one_wins() -> None:
    fleet, routes, leases, clock = await _fleet(1, start=False)
    await leases.create(lease_body("gw", {"holderIdentity": None, "leaseDurationSeconds": 10}))
    leases.slow_reads = True  # both read the free Lease, then both write: the second carries a stale version
    won = await asyncio.gather(*(r.election.elector.try_acquire_or_renew() for r in fleet))
    assert sorted(won) == [False, True] and leases.conflicts == 1
    winner = fleet[won.index(True)].name
    assert leases.store["gw"]["spec"]["holderIdentity"] == winner and leases.writes[-1][1] == winner


def test_reports_are_bounded_and_checked() -> None:
    assert decode(encode({KEY: [1, 2, 0.5, 3.0]}))[KEY].held == 2
    for bad in ('{"v": 2, "servers": {}}', '[]', '{"v": 1, "servers": {"a": [1, 2, 3]}}',
                '{"v": 1, "servers": {"a": [-1, 0, 0, 0]}}', '{"v": 1, "servers": {"a": [true, 0, 0, 0]}}',
                '{"v": 1, "servers": {"a": [1e9, 0, 0, 0]}}', "x" * (200 << 10)):
        with pytest.raises(ValueError):
            decode(bad)
    peers = PeerLoads("me", ttl=6, clock=Clock())
    lease = {"metadata": {"name": "gw-x", "resourceVersion": "1", "annotations": {LOAD_ANNOTATION: "{"}},
             "spec": {"holderIdentity": "x"}}
    peers.upsert(lease)  # a malformed report: that peer counts nothing (logged once), never a traceback
    assert peers.live() == []


def test_a_report_names_only_scaled_servers_with_recent_traffic() -> None:
    clock, routes = Clock(), RoutingTable()
    routes.upsert(server_body(replicas=1, scaling={"idleSeconds": 60, "windowSeconds": 10}))
    routes.upsert(server_body(name="fixed", replicas=1))
    traffic = Traffic(clock=clock)
    assert report(traffic, routes) == {}
    traffic.start(KEY)
    traffic.start("default/fixed")
    clock.now += 5
    assert report(traffic, routes) == {KEY: [1, 0, 0.5, 0.0]}
    traffic.finish(KEY)
    clock.now += 61
    assert report(traffic, routes) == {}, "idle for longer than idleSeconds, nothing in the window: left out"


async def test_a_stopping_replica_finishes_its_streams_and_takes_no_new_request() -> None:
    """SIGTERM (Gateway.stop): the listener closes at once, the stream in flight ends whole."""
    import aiohttp

    from llama_operator.gateway.app import Gateway, GatewayConfig
    from tests.unit.test_gateway_proxy import Upstream

    upstream = Upstream(mode="sse")
    await upstream.start()
    gateway = Gateway(GatewayConfig(listen="127.0.0.1:0", admin="127.0.0.1:0", static={"qwen": [upstream.url]},
                                    autoscale=False, drain_delay=0.1, drain_timeout=10), None)
    await gateway.start()
    url = f"http://127.0.0.1:{gateway.api_port}/v1/completions"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{gateway.admin_port}/drain") as response:
                assert (response.status, await response.text()) == (200, "drained")
            async with session.post(url, json={"model": "qwen", "stream": True}) as response:
                assert await response.content.readline() == b'data: {"n": 1}\n'
                stopping = asyncio.create_task(gateway.stop())
                await asyncio.sleep(0.2)
                with pytest.raises(aiohttp.ClientConnectionError):  # no new connection is accepted
                    async with aiohttp.ClientSession() as other:
                        await other.post(url, json={"model": "qwen"})
                assert not stopping.done(), "it waits for the stream in flight"
                upstream.go.set()
                assert (await response.read()).endswith(b"data: [DONE]\n\n")
            await asyncio.wait_for(stopping, 5)
    finally:
        upstream.go.set()
        assert upstream.runner is not None
        await upstream.runner.cleanup()


async def test_an_answer_that_is_not_json_keeps_the_election_going() -> None:
    fleet, routes, leases, clock = await _fleet(1, minReplicas=1, maxReplicas=4)
    a, b = fleet
    b.kill()
    await _round(fleet, clock)
    assert a.election.leading

    async def garbage(name: str) -> dict[str, Any] | None:
        raise ValueError("Expecting value: line 1 column 1 (char 0)")

    leases.get = garbage  # type: ignore[method-assign]
    await clock.run_until(leases.last_write("gw-a") + DEADLINE + 1)
    assert not a.election.leading, "past the renew deadline it stops deciding"
    assert a.task is not None and not a.task.done(), "no exception escapes the loop"
    del leases.get
    await clock.run_until(clock.now + PERIOD)
    assert a.election.leading
    _stop(fleet)
