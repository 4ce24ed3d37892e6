"""Leader election (leader.py) on a fake Lease store and a virtual clock: one leader at a time, a standby takes over
within the documented bound, a leader that cannot renew gives up before anyone else can take over, a release hands
over at once; and the kopf glue (leadership.py): the standby toggle pauses kopf until elected."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

import pytest

from llama_operator.errors import Conflict, NotFound, Unavailable
from llama_operator.leader import ElectionConfig, ElectionSettingsError, LeaderElector, LeaseRecord
from llama_operator.leadership import STANDBY_TOGGLE, Gate, Leadership, install_pause_hook

CONFIG = {"namespace": "ops", "name": "llama-operator-leader", "lease_duration": 15.0, "renew_deadline": 10.0,
          "retry_period": 2.0}


class VirtualClock:
    """Virtual time for several coroutines: `sleep` parks until `run_until` advances the clock past its end."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + seconds, next(self._seq), future))
        await future

    async def run_until(self, until: float, stop: asyncio.Event | None = None) -> None:
        while True:
            for _ in range(20):  # let every woken coroutine reach its next sleep (the fake store never blocks)
                await asyncio.sleep(0)
            if stop is not None and stop.is_set():
                return
            if not self._timers or self._timers[0][0] > until:
                self.now = until
                return
            self.now, _, future = heapq.heappop(self._timers)
            if not future.done():
                future.set_result(None)


@dataclass
class FakeLeaseServer:
    """The API server's side: one Lease, resourceVersion checked on update, every write logged with its time."""

    clock: VirtualClock
    record: LeaseRecord | None = None
    version: int = 0
    writes: list[tuple[float, str]] = field(default_factory=list)

    def view(self) -> FakeStore:
        return FakeStore(self)


@dataclass
class FakeStore:
    """One replica's connection to the server; `down` makes every call fail as an unreachable API would."""

    server: FakeLeaseServer
    down: bool = False

    def _check(self) -> None:
        if self.down:
            raise Unavailable("connection refused")

    async def get(self) -> tuple[LeaseRecord, str]:
        self._check()
        if self.server.record is None:
            raise NotFound("leases ops/llama-operator-leader not found")
        return self.server.record, str(self.server.version)

    async def create(self, record: LeaseRecord) -> str:
        self._check()
        if self.server.record is not None:
            raise Conflict("already exists")
        return self._store(record)

    async def update(self, record: LeaseRecord, version: str) -> str:
        self._check()
        if version != str(self.server.version):
            raise Conflict("the object has been modified")
        return self._store(record)

    def _store(self, record: LeaseRecord) -> str:
        self.server.record, self.server.version = record, self.server.version + 1
        self.server.writes.append((self.server.clock.now, record.holder))
        return str(self.server.version)


@dataclass
class Replica:
    name: str
    store: FakeStore
    clock: VirtualClock
    started_at: float | None = None
    stopped_at: float | None = None
    elector: LeaderElector = field(init=False)

    def __post_init__(self) -> None:
        self.elector = LeaderElector(ElectionConfig(identity=self.name, **CONFIG), self.store,
                                     on_started=self._started, on_stopped=self._stopped,
                                     monotonic=self.clock.monotonic, sleep=self.clock.sleep,
                                     wall_clock=lambda: f"t={self.clock.now}")

    async def _started(self) -> None:
        self.started_at = self.clock.now

    async def _stopped(self) -> None:
        self.stopped_at = self.clock.now


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


async def _two(clock: VirtualClock) -> tuple[FakeLeaseServer, Replica, Replica, list[asyncio.Task[None]]]:
    server = FakeLeaseServer(clock)
    a, b = Replica("op-a", server.view(), clock), Replica("op-b", server.view(), clock)
    tasks = [asyncio.create_task(a.elector.run())]
    await clock.run_until(0.5)
    tasks.append(asyncio.create_task(b.elector.run()))
    return server, a, b, tasks


async def test_one_leader_while_it_renews(clock: VirtualClock) -> None:
    server, a, b, tasks = await _two(clock)
    await clock.run_until(120)
    assert a.started_at == 0 and a.elector.leading and a.stopped_at is None
    assert b.started_at is None and not b.elector.leading and b.elector.holder == "op-a"
    assert {holder for _, holder in server.writes} == {"op-a"}
    # Renewed every retry period: a standby never sees the record unchanged for a lease duration.
    assert len(server.writes) >= 120 / 2.0 - 1
    for task in tasks:
        task.cancel()


async def test_a_standby_takes_over_a_dead_leader_within_the_bound(clock: VirtualClock) -> None:
    server, a, b, tasks = await _two(clock)
    await clock.run_until(30)
    tasks[0].cancel()  # SIGKILL: no release, no more renewals
    died = max(t for t, holder in server.writes if holder == "op-a")
    await clock.run_until(80)
    assert b.started_at is not None
    config = ElectionConfig(identity="x", **CONFIG)
    # Not before the Lease expired as the standby saw it, and within the documented bound.
    assert config.lease_duration <= b.started_at - died <= config.takeover_bound
    assert server.record is not None and server.record.holder == "op-b" and server.record.transitions == 1
    tasks[1].cancel()


async def test_a_leader_that_cannot_renew_stops_before_the_standby_can_start(clock: VirtualClock) -> None:
    server, a, b, tasks = await _two(clock)
    await clock.run_until(30)
    a.store.down = True  # partitioned from the API server: its renewals fail, the standby's reads work
    await clock.run_until(80)
    assert a.stopped_at is not None and b.started_at is not None
    assert not a.elector.leading and b.elector.leading
    # Never two writers: the old leader stopped (and, in the operator, exited) before the new one started.
    assert a.stopped_at < b.started_at
    last_renewal = max(t for t, holder in server.writes if holder == "op-a")
    assert a.stopped_at - last_renewal <= CONFIG["renew_deadline"] + CONFIG["retry_period"]
    assert tasks[0].done()  # run() returned after on_stopped
    tasks[1].cancel()


async def test_a_leader_that_sees_another_holder_stops_at_once(clock: VirtualClock) -> None:
    server, a, b, tasks = await _two(clock)
    await clock.run_until(10)
    # Someone else wrote the Lease (e.g. after a long pause of this process): not ours any more.
    assert server.record is not None
    server.record = LeaseRecord(holder="op-c", lease_duration=15, renew_time="x")
    server.version += 1
    await clock.run_until(12.5)
    assert a.stopped_at is not None and a.stopped_at <= 12.0
    for task in tasks:
        task.cancel()


async def test_racing_candidates_on_a_free_lease_elect_exactly_one(clock: VirtualClock) -> None:
    server = FakeLeaseServer(clock)
    replicas = [Replica(f"op-{i}", server.view(), clock) for i in range(3)]
    tasks = [asyncio.create_task(r.elector.run()) for r in replicas]
    await clock.run_until(60)
    assert [r.started_at is not None for r in replicas].count(True) == 1
    for task in tasks:
        task.cancel()


async def test_a_release_hands_over_at_the_next_try(clock: VirtualClock) -> None:
    server, a, b, tasks = await _two(clock)
    await clock.run_until(20)
    tasks[0].cancel()
    await a.elector.release()
    released = clock.now
    assert server.record is not None and server.record.holder == ""
    await clock.run_until(40)
    assert b.started_at is not None and b.started_at - released <= CONFIG["retry_period"]
    tasks[1].cancel()


async def test_a_standby_behind_an_unreachable_api_never_leads(clock: VirtualClock) -> None:
    server, a, b, tasks = await _two(clock)
    b.store.down = True
    await clock.run_until(60)
    assert b.started_at is None and a.stopped_at is None
    for task in tasks:
        task.cancel()


def test_settings_from_the_environment() -> None:
    assert ElectionConfig.from_env({}) is None
    env = {"LLAMA_OPERATOR_LEADER_ELECTION": "true", "LLAMA_OPERATOR_LEASE_NAMESPACE": "ops",
           "LLAMA_OPERATOR_LEASE_NAME": "lease", "POD_ID": "op-a"}
    config = ElectionConfig.from_env(env)
    assert config is not None and (config.lease_duration, config.renew_deadline, config.retry_period) == (15, 10, 2)
    assert config.takeover_bound == 19
    # One identity per process: a restarted container does not inherit its predecessor's hold.
    other = ElectionConfig.from_env(env)
    assert other is not None and config.identity.startswith("op-a_") and other.identity != config.identity
    with pytest.raises(ElectionSettingsError, match="renew deadline < lease duration"):
        ElectionConfig.from_env({**env, "LLAMA_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS": "20"})
    with pytest.raises(ElectionSettingsError, match="not a number"):
        ElectionConfig.from_env({**env, "LLAMA_OPERATOR_LEASE_DURATION_SECONDS": "soon"})
    with pytest.raises(ElectionSettingsError, match="pod's name"):
        ElectionConfig.from_env({**env, "POD_ID": ""})


async def test_the_gate_pauses_kopf_until_elected_even_when_elected_first() -> None:
    from kopf._cogs.aiokits.aiotoggles import ToggleSet

    paused_set = ToggleSet(any)
    gate = Gate()
    await gate.attach(paused_set)
    assert paused_set.is_on() and [t.name for t in paused_set] == [STANDBY_TOGGLE]
    await gate.set_paused(False)
    assert paused_set.is_off()

    early, late_set = Gate(), ToggleSet(any)
    await early.set_paused(False)  # elected before kopf's orchestrator started
    await early.attach(late_set)
    assert late_set.is_off()


async def test_the_pause_hook_hands_kopfs_pause_set_to_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    from kopf._cogs.aiokits.aiotoggles import ToggleSet
    from kopf._core.reactor import orchestration

    seen: list[bool] = []

    async def orchestrator(*, operator_paused: ToggleSet, settings: object) -> None:
        seen.append(operator_paused.is_on())

    monkeypatch.setattr(orchestration, "orchestrator", orchestrator)
    gate = Gate()
    install_pause_hook(gate)
    await orchestration.orchestrator(operator_paused=ToggleSet(any), settings=None)
    assert seen == [True]  # the watchers start behind the standby toggle


def test_the_pause_hook_refuses_a_kopf_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    from kopf._core.reactor import orchestration

    from llama_operator.leadership import PauseHookError

    async def orchestrator(*, settings: object) -> None: ...

    monkeypatch.setattr(orchestration, "orchestrator", orchestrator)
    with pytest.raises(PauseHookError, match="operator_paused"):
        install_pause_hook(Gate())


def test_the_real_kopf_orchestrator_takes_the_pause_set() -> None:
    import inspect

    from kopf._core.reactor import orchestration

    assert "operator_paused" in inspect.signature(orchestration.orchestrator).parameters


async def test_leadership_starts_the_loops_resumes_kopf_and_exits_on_loss(clock: VirtualClock) -> None:
    server = FakeLeaseServer(clock)
    store = server.view()
    events: list[str] = []
    gate = Gate()
    config = ElectionConfig(identity="op-a", **CONFIG)
    leadership = Leadership(config, store, gate=gate, on_elected=lambda: events.append("loops"),
                            on_lost=lambda: events.append("exit"))
    leadership.elector = LeaderElector(config, store, on_started=leadership._started,
                                       on_stopped=leadership._stopped, monotonic=clock.monotonic,
                                       sleep=clock.sleep)
    leadership.start()
    await clock.run_until(1)
    assert events == ["loops"] and not gate.paused and leadership.probe()["leading"] is True
    store.down = True
    await clock.run_until(30)
    assert events == ["loops", "exit"] and gate.paused and leadership.probe()["leading"] is False


def test_lease_spec_round_trip_and_hostile_values() -> None:
    from llama_operator.kube.lease import record_from_spec, spec_from_record

    record = LeaseRecord(holder="op-a_1a2b", lease_duration=15.0, acquire_time="2026-12-04T01:00:00.000001Z",
                         renew_time="2026-12-04T01:00:02.000001Z", transitions=3)
    assert record_from_spec(spec_from_record(record)) == record
    # The API takes whole seconds: a fraction is rounded up, never down, and never below 1.
    assert spec_from_record(LeaseRecord(lease_duration=0.2))["leaseDurationSeconds"] == 1
    assert spec_from_record(LeaseRecord(lease_duration=14.1))["leaseDurationSeconds"] == 15
    # A Lease someone else wrote badly reads as free, not as a crash.
    garbage = record_from_spec({"holderIdentity": "x" * 1000, "leaseDurationSeconds": "soon", "leaseTransitions": []})
    assert len(garbage.holder) == 253 and garbage.lease_duration == 0 and garbage.transitions == 0
    assert record_from_spec(None) == LeaseRecord()


async def test_a_clean_stop_releases_the_lease_after_the_election_ended(clock: VirtualClock) -> None:
    server = FakeLeaseServer(clock)
    store = server.view()
    config = ElectionConfig(identity="op-a", **CONFIG)
    leadership = Leadership(config, store, gate=Gate(), on_elected=lambda: None, on_lost=lambda: None)
    leadership.elector = LeaderElector(config, store, on_started=leadership._started,
                                       on_stopped=leadership._stopped, monotonic=clock.monotonic,
                                       sleep=clock.sleep)
    leadership.start()
    await clock.run_until(5)
    assert server.record is not None and server.record.holder == "op-a"
    writes = len(server.writes)
    await leadership.stop()
    assert server.record.holder == "" and len(server.writes) == writes + 1
    await clock.run_until(20)
    assert len(server.writes) == writes + 1  # no renewal after the release
