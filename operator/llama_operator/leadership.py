"""The operator's two replicas under one Lease: kopf paused on the standby, the leader's loops, losing it = exit.

How a standby writes nothing: kopf pauses every watch stream while any toggle of its `operator_paused` set is on
(the same switch its own peering uses). `install_pause_hook` adds one toggle, "standby", to that set before the first
watcher starts, on until this replica is elected. A paused kopf neither lists nor watches, so no handler runs and
kopf writes none of its progress or last-handled-configuration annotations; its admission webhook server is a
separate task and keeps answering on both replicas. When elected, the toggle goes off: kopf lists everything it
watches, and every object it has not seen in this process runs its resume (or create/update) handler, so the new
leader reconciles all servers and models at once; then the periodic loops start.

Losing the Lease ends the process (`exit_process`, exit code LOST_LEASE_EXIT): a handler already running cannot
be stopped from outside, and only an exit stops its writes for certain before a standby can take over
(leader.py: renew deadline < lease duration). The kubelet restarts the container as a standby.

kopf keeps `operator_paused` to itself; the hook wraps kopf 1.45's orchestrator, which receives it, and refuses to
start (one clear error) if a kopf release changes that.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import kopf

from .leader import ElectionConfig, LeaderElector, LeaseStore

log = logging.getLogger(__name__)
LOST_LEASE_EXIT = 75
"""The exit code of a leader that lost its Lease (EX_TEMPFAIL: the kubelet restarts it as a standby)."""
STANDBY_TOGGLE = "standby: another replica holds the leader Lease"


class PauseHookError(RuntimeError):
    """kopf no longer looks as the hook expects: leader election cannot pause it."""


class Gate:
    """The "standby" toggle in kopf's pause set; paused until `resume`. Safe to resume before kopf attaches."""

    def __init__(self) -> None:
        self.paused = True
        self._toggle: Any = None

    async def attach(self, operator_paused: Any) -> None:
        toggle = await operator_paused.make_toggle(self.paused, name=STANDBY_TOGGLE)
        self._toggle = toggle
        if toggle.is_on() != self.paused:  # resumed while the toggle was being made
            await toggle.turn_to(self.paused)

    async def set_paused(self, paused: bool) -> None:
        self.paused = paused
        if self._toggle is not None:
            await self._toggle.turn_to(paused)


GATE = Gate()


def install_pause_hook(gate: Gate = GATE) -> None:
    """Make kopf start paused behind `gate` (call before kopf.run). Raises PauseHookError on an unknown kopf."""
    try:
        from kopf._core.reactor import orchestration
    except ImportError as exc:
        raise PauseHookError(f"kopf {_kopf_version()} has no orchestrator module: {exc}") from None
    original = getattr(orchestration, "orchestrator", None)
    if getattr(original, "_llama_gated", False):
        return
    if original is None or "operator_paused" not in inspect.signature(original).parameters:
        raise PauseHookError(f"kopf {_kopf_version()}'s orchestrator takes no operator_paused: leader election "
                             "cannot pause a standby (the operator supports kopf 1.45)")

    async def gated_orchestrator(*, operator_paused: Any, **kwargs: Any) -> None:
        await gate.attach(operator_paused)
        await original(operator_paused=operator_paused, **kwargs)

    gated_orchestrator._llama_gated = True  # type: ignore[attr-defined]
    orchestration.orchestrator = gated_orchestrator


def _kopf_version() -> str:
    return str(getattr(kopf, "__version__", "") or "(unknown version)")


def exit_process() -> None:
    """Stop every write now: no cleanup, no pending thread, no handler gets to run again."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LOST_LEASE_EXIT)


class Leadership:
    """Runs the election for this replica: on election resume kopf and call `on_elected`; on loss `on_lost`."""

    def __init__(self, config: ElectionConfig, store: LeaseStore, *, on_elected: Callable[[], None],
                 gate: Gate = GATE, on_lost: Callable[[], None] = exit_process,
                 elector: LeaderElector | None = None) -> None:
        self.config = config
        self._gate = gate
        self._on_elected = on_elected
        self._on_lost = on_lost
        self.elector = elector or LeaderElector(config, store, on_started=self._started, on_stopped=self._stopped)
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self.elector.leading

    def start(self) -> None:
        log.info("Leader election: %s is a standby until it holds Lease %s/%s (takeover within %.0f s)",
                 self.config.identity, self.config.namespace, self.config.name, self.config.takeover_bound)
        self._task = asyncio.create_task(self.elector.run(), name="leader election")

    async def _started(self) -> None:
        self._on_elected()
        await self._gate.set_paused(False)

    async def _stopped(self) -> None:
        await self._gate.set_paused(True)
        self._on_lost()

    async def stop(self) -> None:
        """A clean shutdown: stop the election, then release the Lease so the standby takes over at once."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down either way
                pass
        await self.elector.release()

    def probe(self) -> dict[str, Any]:
        """What /healthz says about the election (both replicas are alive and ready: both serve the webhook)."""
        return {"leading": self.leading, "holder": self.elector.holder, "identity": self.config.identity}
