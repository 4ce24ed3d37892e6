"""Leader election over one coordination.k8s.io Lease: who of the operator's replicas reconciles.

The algorithm is client-go's (k8s.io/client-go/tools/leaderelection), on any `LeaseStore` and clock:

- A candidate takes the Lease when nobody holds it, or when the record it last saw has not changed for
  `lease_duration` seconds *on its own clock* (it never compares its clock with the holder's: `renewTime` is for
  people). Every write carries the resourceVersion read just before, so two candidates racing for an expired
  Lease cannot both win: the API server refuses the second (409).
- The leader renews every `retry_period`. When no renewal succeeded for `renew_deadline` seconds (measured from
  when the last successful renewal was *sent*), or the Lease names someone else, leadership is lost. Since
  `renew_deadline` < `lease_duration`, the old leader gives up before any standby can take over: never two writers.
- A leader that stops on purpose releases the Lease (holder cleared) so a standby takes over at its next try.

No Kubernetes client and no kopf here: kube/lease.py is the store; two callers elect with it: leadership.py (the
operator, which exits when it loses the Lease) and gateway/lease.py's `Decider` (the gateway's autoscaler, which
stops deciding and runs `run` again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from .clock import now_rfc3339
from .errors import Conflict, NotFound

log = logging.getLogger(__name__)


class ElectionSettingsError(ValueError):
    """A leader-election setting from the environment that is not usable; the message names it."""


@dataclass(frozen=True)
class ElectionConfig:
    """Where the Lease lives, who we are, and the three times (seconds; client-go's defaults)."""

    namespace: str
    name: str
    identity: str
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not (self.namespace and self.name and self.identity):
            raise ElectionSettingsError("leader election needs the Lease namespace, its name and the pod's name")
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ElectionSettingsError(
                "leader election needs 0 < retry period < renew deadline < lease duration, got "
                f"{self.retry_period} < {self.renew_deadline} < {self.lease_duration}")

    @property
    def takeover_bound(self) -> float:
        """The longest a standby can take to hold the Lease after the leader died without releasing it: the last
        renewal it saw (up to one retry period late), the lease duration, and its next try."""
        return self.lease_duration + 2 * self.retry_period

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ElectionConfig | None:
        """The election the chart asks for (LLAMA_OPERATOR_LEADER_ELECTION=true), else None (one replica)."""
        env = os.environ if environ is None else environ
        if env.get("LLAMA_OPERATOR_LEADER_ELECTION", "false").strip().lower() not in ("true", "1", "yes"):
            return None
        times = {}
        for field, variable in (("lease_duration", "LLAMA_OPERATOR_LEASE_DURATION_SECONDS"),
                                ("renew_deadline", "LLAMA_OPERATOR_LEASE_RENEW_DEADLINE_SECONDS"),
                                ("retry_period", "LLAMA_OPERATOR_LEASE_RETRY_PERIOD_SECONDS")):
            raw = env.get(variable, "").strip()
            if not raw:
                continue
            try:
                times[field] = float(raw)
            except ValueError:
                raise ElectionSettingsError(f"{variable}={raw[:40]!r} is not a number of seconds") from None
            if not 0 < times[field] <= 3600:
                raise ElectionSettingsError(f"{variable}={raw[:40]!r} must be between 0 and 3600 seconds")
        pod = env.get("POD_ID", "").strip()
        # One identity per process, not per pod: a leader's container restarted by the kubelet is a new candidate
        # and waits for the Lease to expire like any standby (client-go does the same with hostname_uuid).
        return cls(namespace=env.get("LLAMA_OPERATOR_LEASE_NAMESPACE", "").strip(),
                   name=env.get("LLAMA_OPERATOR_LEASE_NAME", "").strip(),
                   identity=f"{pod}_{secrets.token_hex(4)}" if pod else "", **times)


@dataclass(frozen=True)
class LeaseRecord:
    """The Lease's spec as the election reads and writes it."""

    holder: str = ""
    lease_duration: float = 0.0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0


class LeaseStore(Protocol):
    """The Lease on the API server. `get` raises NotFound; `create` and `update` raise Conflict when someone else
    wrote first (update: `version` is no longer the object's resourceVersion). Others raise on any failure."""

    async def get(self) -> tuple[LeaseRecord, str]: ...

    async def create(self, record: LeaseRecord) -> str: ...

    async def update(self, record: LeaseRecord, version: str) -> str: ...


class LeaderElector:
    """One replica's side of the election. `run` returns only when leadership is lost (after `on_stopped`)."""

    def __init__(self, config: ElectionConfig, store: LeaseStore, *,
                 on_started: Callable[[], Awaitable[None]], on_stopped: Callable[[], Awaitable[None]],
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 wall_clock: Callable[[], str] = lambda: now_rfc3339(micro=True)) -> None:
        self.config = config
        self._store = store
        self._on_started = on_started
        self._on_stopped = on_stopped
        self._monotonic = monotonic
        self._sleep = sleep
        self._wall = wall_clock
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._version: str | None = None
        self.leading = False
        self.holder = ""
        """Who held the Lease when we last read it (for /healthz and logs)."""

    async def try_acquire_or_renew(self) -> bool:
        """One attempt: True when we hold the Lease afterwards. API failures count as False."""
        cfg, now = self.config, self._monotonic()
        mine = LeaseRecord(holder=cfg.identity, lease_duration=cfg.lease_duration, acquire_time=self._wall(),
                           renew_time=self._wall())
        try:
            current, version = await self._store.get()
        except NotFound:
            try:
                self._remember(mine, await self._store.create(mine), now)
            except Exception as exc:  # noqa: BLE001 - Conflict (someone created it first) or the API: next try
                log.debug("Creating Lease %s/%s failed: %s", cfg.namespace, cfg.name, exc)
                return False
            return True
        except Exception as exc:  # noqa: BLE001 - the API is unreachable: the caller's deadline decides
            log.warning("Reading Lease %s/%s failed: %s", cfg.namespace, cfg.name, exc)
            return False
        if current != self._observed:
            self._observed, self._observed_at, self._version = current, now, version
        self.holder = current.holder
        held_by_other = current.holder not in ("", cfg.identity)
        if held_by_other and now < self._observed_at + max(current.lease_duration, 1.0):
            return False
        if current.holder == cfg.identity:
            mine = replace(mine, acquire_time=current.acquire_time, transitions=current.transitions)
        else:
            mine = replace(mine, transitions=current.transitions + 1)
        try:
            self._remember(mine, await self._store.update(mine, version), now)
        except Conflict:
            return False
        except Exception as exc:  # noqa: BLE001 - the API: the caller's deadline decides
            log.warning("Writing Lease %s/%s failed: %s", cfg.namespace, cfg.name, exc)
            return False
        return True

    def _remember(self, record: LeaseRecord, version: str, now: float) -> None:
        self._observed, self._observed_at, self._version, self.holder = record, now, version, record.holder

    async def run(self) -> None:
        """Wait to be elected, lead (`on_started`), renew; on a lost Lease call `on_stopped` and return."""
        cfg = self.config
        while not await self._attempt_within(cfg.retry_period):
            await self._sleep(cfg.retry_period)
        self.leading = True
        log.info("Leader election: %s now holds Lease %s/%s", cfg.identity, cfg.namespace, cfg.name)
        await self._on_started()
        last_renewed = self._monotonic()
        while True:
            await self._sleep(cfg.retry_period)
            sent = self._monotonic()
            remaining = last_renewed + cfg.renew_deadline - sent
            if remaining > 0 and await self._attempt_within(remaining):
                last_renewed = sent
                continue
            if self.holder not in ("", cfg.identity) or self._monotonic() >= last_renewed + cfg.renew_deadline:
                break
        self.leading = False
        log.error("Leader election: %s lost Lease %s/%s (holder now %r)", cfg.identity, cfg.namespace, cfg.name,
                  self.holder)
        await self._on_stopped()

    async def _attempt_within(self, seconds: float) -> bool:
        try:
            return await asyncio.wait_for(self.try_acquire_or_renew(), timeout=max(seconds, 0.001))
        except TimeoutError:
            return False

    async def release(self) -> None:
        """Give the Lease up (a clean shutdown): the standby takes it at its next try instead of after it expires."""
        if not self.leading or self._observed is None or self._version is None:
            return
        self.leading = False
        cleared = replace(self._observed, holder="", lease_duration=1.0, renew_time=self._wall())
        try:
            await asyncio.wait_for(self._store.update(cleared, self._version), timeout=self.config.retry_period)
        except Exception as exc:  # noqa: BLE001 - it then expires after lease_duration
            log.warning("Releasing Lease %s/%s failed (it expires by itself): %s", self.config.namespace,
                        self.config.name, exc)
