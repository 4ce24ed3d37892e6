"""Several gateway replicas: one decider elected through a Lease, the load summed over live replicas' reports,
a dead replica's report aging out, a request held on a non-deciding replica waking its server (fake clock, an
in-memory Lease store with the API server's compare-and-swap)."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from llama_operator.errors import Conflict, NotFound, Unavailable
from llama_operator.gateway.autoscaler import Autoscaler
from llama_operator.gateway.lease import PEER_LABEL, Election, Publisher
from llama_operator.gateway.peers import LOAD_ANNOTATION, FleetLoad, PeerLoads, decode, encode, report
from llama_operator.gateway.routing import RoutingTable
from llama_operator.gateway.traffic import Traffic
from tests.conftest import server_body
from tests.unit.test_gateway_autoscaler import Clock, RecordingApi

KEY = "default/chat"


class FakeLeases:
    """Leases as the API server keeps them: a resourceVersion per write, 409 on a stale one; `watchers` get every
    write (the watch of the per-replica Leases)."""

    namespace = "llama-system"

    def __init__(self) -> None:
        self.store: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.watchers: list[Callable[[dict[str, Any]], object]] = []
        self.down = False

    def _stored(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise Unavailable("the API server is down")
        self.version += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.version)
        self.store[body["metadata"]["name"]] = body
        for watcher in self.watchers if PEER_LABEL in body["metadata"].get("labels", {}) else ():
            watcher(copy.deepcopy(body))  # the watch's label selector: the replicas' Leases, not the election's
        return copy.deepcopy(body)

    async def get(self, name: str) -> dict[str, Any] | None:
        if self.down:
            raise Unavailable("the API server is down")
        return copy.deepcopy(self.store.get(name))

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        if body["metadata"]["name"] in self.store:
            raise Conflict("already exists")
        return self._stored(body)

    async def replace(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if name not in self.store:
            raise NotFound("gone")
        if body["metadata"].get("resourceVersion") != self.store[name]["metadata"]["resourceVersion"]:
            raise Conflict("the object has been modified")
        return self._stored(body)

    async def delete(self, name: str) -> None:
        self.store.pop(name, None)


class Replica:
    """One gateway replica's coordination: its traffic, its report, its view of the others, its autoscaler."""

    def __init__(self, name: str, leases: FakeLeases, clock: Clock, routes: RoutingTable) -> None:
        self.traffic = Traffic(clock=clock)
        self.api = RecordingApi()
        self.election = Election(leases, "gw", name, duration=10, period=2, renew_deadline=7,  # type: ignore[arg-type]
                                 clock=clock)
        self.publisher = Publisher(leases, "gw", name, lambda: encode(report(self.traffic, routes)),  # type: ignore[arg-type]
                                   period=2, ttl=6)
        self.kicked = 0
        self.peers = PeerLoads(name, ttl=6, clock=clock, on_held=self._kick)
        leases.watchers.append(self.peers.upsert)
        self.autoscaler = Autoscaler(self.api, routes, FleetLoad(self.traffic, self.peers),  # type: ignore[arg-type]
                                     leading=lambda: self.election.leading, clock=clock, wall=lambda: "t")

    def _kick(self) -> None:
        self.kicked += 1

    async def tick(self) -> None:
        await self.election.step()
        await self.publisher.publish()


def _fleet(replicas: int, **scaling: Any) -> tuple[list[Replica], RoutingTable, FakeLeases, Clock]:
    clock, routes, leases = Clock(), RoutingTable(), FakeLeases()
    routes.upsert(server_body(replicas=replicas, scaling=scaling))
    return [Replica(name, leases, clock, routes) for name in ("gw-a", "gw-b")], routes, leases, clock


async def _round(fleet: list[Replica], clock: Clock, seconds: float = 2.0) -> None:
    clock.t += seconds
    for replica in fleet:
        await replica.tick()
    for replica in fleet:
        await replica.autoscaler.step()


async def test_one_replica_decides_and_the_load_is_summed_over_both() -> None:
    fleet, routes, _, clock = _fleet(1, minReplicas=1, maxReplicas=4, targetInFlight=2, windowSeconds=4)
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


async def test_a_held_request_on_the_other_replica_wakes_the_server_from_zero() -> None:
    fleet, routes, leases, clock = _fleet(0, minReplicas=0, maxReplicas=3, idleSeconds=60)
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


async def test_a_dead_replicas_load_ages_out_and_a_dead_leader_is_replaced() -> None:
    fleet, routes, leases, clock = _fleet(1, minReplicas=1, maxReplicas=4, targetInFlight=1, windowSeconds=2)
    a, b = fleet
    b.traffic.start(KEY)
    b.traffic.start(KEY)
    await _round(fleet, clock)
    await _round(fleet, clock)
    assert FleetLoad(a.traffic, a.peers).in_flight(KEY) == 2
    # b is SIGKILLed: it renews nothing more; its 2 requests count for at most the TTL (6 s) after its last report
    for _ in range(3):
        clock.t += 2
        await a.tick()
        assert FleetLoad(a.traffic, a.peers).in_flight(KEY) == 2
    clock.t += 0.5
    assert FleetLoad(a.traffic, a.peers).in_flight(KEY) == 0 and a.peers.live() == []
    # Now the decider dies: b (restarted under the same name) takes over only once the Lease went unrenewed
    # for its duration (10 s), never while it is being renewed.
    last_renewal = clock.t - 0.5
    await b.tick()  # b sees the last renewal
    while not b.election.leading:
        clock.t += 2
        await b.tick()
        assert clock.t - last_renewal <= 10 + 2 * 2, "taken over within the duration and two periods"
    assert clock.t - last_renewal > 10, "never while the Lease was renewed within its duration"
    lease = leases.store["gw"]
    assert lease["spec"]["holderIdentity"] == "gw-b" and lease["spec"]["leaseTransitions"] == 1
    # The old leader, back, sees the Lease held and renewed: it does not decide.
    await a.tick()
    assert not a.election.leading


async def test_a_leader_that_cannot_renew_stops_deciding_before_anyone_may_take_over() -> None:
    fleet, routes, leases, clock = _fleet(1, minReplicas=1, maxReplicas=4)
    a, b = fleet
    await _round(fleet, clock)
    assert a.election.leading
    leases.down = True
    clock.t += 6
    await a.election.step()
    assert a.election.leading, "within the renew deadline (7 s) it still decides"
    clock.t += 2
    await a.election.step()
    assert not a.election.leading, "past it, it stops: a standby may take over after 10 s"
    written = len(a.api.views)
    a.traffic.start(KEY)
    await a.autoscaler.step()
    assert a.api.scales == [] and len(a.api.views) == written, "a replica that does not lead writes nothing"


async def test_two_candidates_racing_for_an_expired_lease_one_wins() -> None:
    fleet, routes, leases, clock = _fleet(1, minReplicas=1, maxReplicas=4)
    a, b = fleet
    await a.election.step()
    await b.election.step()
    await a.election.release()
    assert leases.store["gw"]["spec"]["holderIdentity"] is None
    # Both read the released Lease, then both write: the second write carries a stale resourceVersion.
    await b.election.step()
    await a.election.step()
    assert [b.election.leading, a.election.leading] == [True, False]


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
    clock.t += 5
    assert report(traffic, routes) == {KEY: [1, 0, 0.5, 0.0]}
    traffic.finish(KEY)
    clock.t += 61
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
    fleet, routes, leases, clock = _fleet(1, minReplicas=1, maxReplicas=4)
    a, _ = fleet
    await a.election.step()
    assert a.election.leading

    async def garbage(name: str) -> dict[str, Any] | None:
        raise ValueError("Expecting value: line 1 column 1 (char 0)")

    leases.get = garbage  # type: ignore[method-assign]
    clock.t += 8
    await a.election.step()  # no exception escapes the loop; past the renew deadline it stops deciding
    assert not a.election.leading
