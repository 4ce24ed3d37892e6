"""The Runtime: what every trigger of the operator calls, and what schedules the next attempt.

Every trigger (a handler in handlers.py, a scheduled retry, the periodic resync) ends in
`Runtime.reconcile_server` or `Runtime.reconcile_model`: one reconcile of the object as it is when the job runs,
serialised and coalesced per object (serial.py), through the error boundary (boundary.py), and retried by
`errors.RetryPolicy` whatever triggered it, so kopf never retries a handler by itself.

At most `SERVER_CONCURRENCY` LlamaServer reconciles run at once (memory and the API server's load stay bounded
in a burst of thousands of events). Two bounds keep one object from holding up the others:
- every reconcile runs under `RECONCILE_DEADLINE`: one that takes longer (a model source that drips its bytes,
  an API server that stops answering) is stopped and reported like any transient failure (`DeadlineExceeded`,
  retried with backoff);
- the periodic resync reconciles the objects of a round concurrently, at most `RESYNC_CONCURRENCY` at a time
  per kind, so a slow object holds one of those slots for at most the deadline while the rest go on.

The resync takes its objects from what kopf's watches hold (watched.py), never from a LIST.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import RetryPolicy, Transient
from ..kube import LLAMA_MODELS, LLAMA_SERVERS, ResourceKind
from ..metrics import PHASES, RECONCILE_SECONDS, RECONCILES
from .boundary import Verdict, failure_verdict, guarded
from .context import Context
from .download import poll_again
from .model import reconcile_model
from .serial import Coalescer
from .server import reconcile_server

log = logging.getLogger(__name__)

RECONCILE_DEADLINE = 180.0
"""Seconds one reconcile may take, whatever triggered it. A healthy one takes well under a second (API calls);
resolving a model source reads a GGUF header under its own, shorter limits. This is the outer bound."""
SERVER_CONCURRENCY = 32
"""LlamaServer reconciles running at the same time, whatever triggered them. A server's reconcile is API calls
only (well under a second); a burst of thousands of events (an operator start, a namespace of servers applied
at once) then holds 32 reconciles' bodies in memory, not thousands, and queues the rest in order."""
RESYNC_CONCURRENCY = 8
"""Objects of one kind a resync round reconciles at the same time: a few stuck sources cannot starve the rest,
and a round of thousands of objects does not flood the API server."""


class DeadlineExceeded(Transient):
    """A reconcile ran past `RECONCILE_DEADLINE` and was stopped: retried with backoff like any transient error."""

    reason = "DeadlineExceeded"


class Runtime:
    """What the handlers share, created once in the startup handler and kept in kopf's memo.

    It owns the retry policy too: a failed reconcile, whatever triggered it, is scheduled again by
    `errors.RetryPolicy` (never / slow / capped backoff), so kopf never retries a handler by itself.
    """

    def __init__(self, ctx: Context, policy: RetryPolicy | None = None, *, deadline: float = RECONCILE_DEADLINE,
                 resync_concurrency: int = RESYNC_CONCURRENCY, server_concurrency: int = SERVER_CONCURRENCY) -> None:
        self.ctx = ctx
        self.policy = policy or RetryPolicy()
        self.deadline = deadline
        self.resync_concurrency = resync_concurrency
        self._server_slots = asyncio.Semaphore(server_concurrency)
        self.servers: Coalescer[Verdict] = Coalescer()
        self.models: Coalescer[Verdict] = Coalescer()
        self.resync_tasks: list[asyncio.Task[None]] = []
        self._attempts: dict[tuple[str, str, str], int] = {}
        self._retries: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        self._retry_tasks: set[asyncio.Task[Verdict]] = set()

    async def reconcile_server(self, namespace: str, name: str) -> Verdict:
        job = self._job(LLAMA_SERVERS, "LlamaServer", reconcile_server, namespace, name)

        async def bounded() -> Verdict:
            async with self._server_slots:  # a waiting trigger holds no body yet; the coalescer folds repeats
                return await job()

        return await self.servers.run((namespace, name), bounded)

    async def reconcile_model(self, namespace: str, name: str) -> Verdict:
        job = self._job(LLAMA_MODELS, "LlamaModel", reconcile_model, namespace, name)
        return await self.models.run((namespace, name), job)

    def _job(
        self, kind: ResourceKind, kind_name: str, reconcile: Callable[[Any, Context], Awaitable[Any]],
        namespace: str, name: str,
    ) -> Callable[[], Awaitable[Verdict]]:
        """One reconcile of the object as it is when the job runs (not as it was when triggered)."""
        key = (kind.plural, namespace, name)

        async def job() -> Verdict:
            attempt = self._attempts.get(key, 0) + 1
            started = time.monotonic()
            try:
                body = await self.ctx.kube.get(kind, namespace, name)
            except Exception as exc:  # noqa: BLE001 - no object, no status to write: log and retry
                verdict = failure_verdict(exc, attempt, self.policy)
                log.warning("Reading %s %s/%s failed: %s", kind_name, namespace, name, verdict.message)
            else:
                if body is None or body["metadata"].get("deletionTimestamp"):
                    PHASES.forget(kind_name, namespace, name)
                    self._settle(key, Verdict(ok=True), namespace, name)
                    return Verdict(ok=True)  # deleted: garbage collection removes what it owned
                verdict = await guarded(kind, body, self.ctx, self._bounded(reconcile), attempt=attempt,
                                        policy=self.policy, again_after=poll_again if kind is LLAMA_SERVERS else None)
            RECONCILE_SECONDS.labels(kind_name).observe(time.monotonic() - started)
            RECONCILES.labels(kind_name, "ok" if verdict.ok else "error").inc()
            self._settle(key, verdict, namespace, name)
            return verdict

        return job

    def _bounded(self, reconcile: Callable[[Any, Context], Awaitable[Any]]) -> Callable[[Any, Context], Awaitable[Any]]:
        """`reconcile` stopped at the deadline; the boundary turns the overrun into status and a retry."""

        async def run(body: Any, ctx: Context) -> Any:
            scope = asyncio.timeout(self.deadline)
            try:
                async with scope:
                    return await reconcile(body, ctx)
            except TimeoutError:
                if not scope.expired():
                    raise  # a timeout of the reconcile's own, reported as such
                raise DeadlineExceeded(f"the reconcile took longer than {self.deadline:g}s (a model source or the "
                                       "API server answers too slowly) and was stopped") from None

        return run

    def _settle(self, key: tuple[str, str, str], verdict: Verdict, namespace: str, name: str) -> None:
        """Forget the failures of a successful reconcile, or schedule the next attempt of a failed one."""
        pending = self._retries.pop(key, None)
        if pending is not None:
            pending.cancel()
        if verdict.ok:
            self._attempts.pop(key, None)
        else:
            self._attempts[key] = self._attempts.get(key, 0) + 1
        if verdict.retry_in is None:
            return  # settled, or a bad spec: the next generation (or event) reconciles it again
        again = self.reconcile_server if key[0] == LLAMA_SERVERS.plural else self.reconcile_model

        def fire() -> None:
            self._retries.pop(key, None)
            task = asyncio.create_task(again(namespace, name), name=f"retry {key[0]} {namespace}/{name}")
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)

        self._retries[key] = asyncio.get_running_loop().call_later(verdict.retry_in, fire)

    def close(self) -> None:
        """Cancel the resync and every scheduled retry (operator shutdown)."""
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        for task in [*self.resync_tasks, *self._retry_tasks]:
            task.cancel()

    async def resync_forever(self, kind: ResourceKind, interval: float) -> None:
        """Reconcile every object of a kind now and then: a safety net for missed events, and for models
        the slow re-resolution that notices a moved revision. Nothing one object does can end it.

        The objects are those kopf's watch holds (`ctx.watched`, reconcile/indexes.py), not a LIST: a round
        costs the API server only the reconciles themselves, and the operator no list of whole bodies."""
        reconcile = self.reconcile_server if kind is LLAMA_SERVERS else self.reconcile_model
        kind_name = "LlamaServer" if kind is LLAMA_SERVERS else "LlamaModel"
        while True:
            await asyncio.sleep(interval)
            try:
                objects = self.ctx.watched.keys(kind.plural)
            except Exception as exc:  # noqa: BLE001 - the next round reads again
                log.warning("Resync of %s failed, will retry: %s", kind.plural, exc)
                continue
            if self.ctx.watched.attached:
                # Objects deleted while no event reached us leave the phase gauges here.
                PHASES.retain(kind_name, None, objects)
            await self._resync_round(reconcile, objects)

    async def _resync_round(self, reconcile: Callable[[str, str], Awaitable[Verdict]],
                            objects: list[tuple[str, str]]) -> None:
        """Reconcile every object, `resync_concurrency` at a time: workers take the next one as they finish."""
        pending = iter(objects)

        async def worker() -> None:
            for namespace, name in pending:  # one shared iterator: each object goes to exactly one worker
                await best_effort(reconcile(namespace, name), "resync")

        await asyncio.gather(*(worker() for _ in range(min(self.resync_concurrency, len(objects)))))


async def best_effort(coro: Awaitable[Verdict], what: str) -> None:
    """Run a reconcile from an event or the resync; its failures are already in status and scheduled for
    retry by the Runtime, so here only a bug in the plumbing itself is left to log."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a trigger must never take the watch or the resync down with it
        log.exception("Reconcile after %s failed", what)
