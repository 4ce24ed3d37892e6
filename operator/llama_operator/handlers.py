"""kopf handlers: thin glue from watch events to the reconcile functions.

Every trigger for a LlamaServer — its own spec change, its model becoming ready, a Deployment or pod of
its changing or vanishing, the periodic resync — ends in the same `reconcile_server` run, serialised and
coalesced per server. No handler here decides anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from .api.v1alpha1 import GROUP, VERSION
from .builders.objects import MANAGED_BY, MODEL_LABEL, SERVER_LABEL
from .config import Settings
from .errors import RetryPolicy
from .kube import (
    LLAMA_MODELS,
    LLAMA_SERVERS,
    Kube,
    ResourceKind,
    connection_settings,
    load_api_client,
)
from .metrics import PHASES, RECONCILE_SECONDS, RECONCILES
from .metrics import serve as serve_metrics
from .reconcile.boundary import Verdict, failure_verdict, guarded
from .reconcile.context import Context
from .reconcile.download import poll_again
from .reconcile.model import reconcile_model
from .reconcile.router_status import ModelStatusPoller
from .reconcile.serial import Coalescer
from .reconcile.server import reconcile_server

log = logging.getLogger(__name__)
OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY, SERVER_LABEL: kopf.PRESENT}
OWNED_BY_MODEL = {"app.kubernetes.io/managed-by": MANAGED_BY, MODEL_LABEL: kopf.PRESENT}


def _post_event(body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
    kopf.event(dict(body), type=type, reason=reason, message=message[:1024])


class Runtime:
    """What the handlers share, created once in the startup handler and kept in kopf's memo.

    It owns the retry policy too: a failed reconcile, whatever triggered it, is scheduled again by
    `errors.RetryPolicy` (never / slow / capped backoff), so kopf never retries a handler by itself.
    """

    def __init__(self, ctx: Context, policy: RetryPolicy | None = None) -> None:
        self.ctx = ctx
        self.policy = policy or RetryPolicy()
        self.servers: Coalescer[Verdict] = Coalescer()
        self.models: Coalescer[Verdict] = Coalescer()
        self.resync_tasks: list[asyncio.Task[None]] = []
        self._attempts: dict[tuple[str, str, str], int] = {}
        self._retries: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        self._retry_tasks: set[asyncio.Task[Verdict]] = set()

    async def reconcile_server(self, namespace: str, name: str) -> Verdict:
        job = self._job(LLAMA_SERVERS, "LlamaServer", reconcile_server, namespace, name)
        return await self.servers.run((namespace, name), job)

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
                verdict = await guarded(kind, body, self.ctx, reconcile, attempt=attempt, policy=self.policy,
                                        again_after=poll_again if kind is LLAMA_SERVERS else None)
            RECONCILE_SECONDS.labels(kind_name).observe(time.monotonic() - started)
            RECONCILES.labels(kind_name, "ok" if verdict.ok else "error").inc()
            self._settle(key, verdict, namespace, name)
            return verdict

        return job

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
        the slow re-resolution that notices a moved revision. Nothing one object does can end it."""
        reconcile = self.reconcile_server if kind is LLAMA_SERVERS else self.reconcile_model
        namespaces: tuple[str | None, ...] = self.ctx.settings.namespaces or (None,)
        while True:
            await asyncio.sleep(interval)
            for namespace in namespaces:
                try:
                    bodies = await self.ctx.kube.list(kind, namespace)
                except Exception as exc:  # noqa: BLE001 - the next round lists again
                    log.warning("Resync of %s failed, will retry: %s", kind.plural, exc)
                    continue
                # Objects deleted while no event reached us leave the phase gauges here.
                metas = [b.get("metadata") or {} for b in bodies]
                PHASES.retain("LlamaServer" if kind is LLAMA_SERVERS else "LlamaModel", namespace,
                              [(m.get("namespace", ""), m.get("name", "")) for m in metas])
                for body in bodies:
                    meta = body.get("metadata") or {}
                    await _best_effort(reconcile(meta.get("namespace", ""), meta.get("name", "")), "resync")


def _runtime(memo: kopf.Memo) -> Runtime:
    return memo["runtime"]  # type: ignore[no-any-return]


async def _best_effort(coro: Awaitable[Verdict], what: str) -> None:
    """Run a reconcile from an event or the resync; its failures are already in status and scheduled for
    retry by the Runtime, so here only a bug in the plumbing itself is left to log."""
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a trigger must never take the watch or the resync down with it
        log.exception("Reconcile after %s failed", what)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = Settings.from_env()
    # kopf's bookkeeping lives in our own annotations, keeping status for what users read.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    # In namespaced mode the chart grants nothing cluster-wide: no CRD or namespace scanning.
    settings.scanning.disabled = bool(config.namespaces)
    # Only our own children are watched, filtered by the API server: a big cluster's pods never reach us.
    for owned in ("deployments", "services", "pods", "persistentvolumeclaims"):
        settings.watching.label_selectors[owned] = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.queueing.error_delays = (1, 2, 5, 10, 30, 60)
    if config.webhook_port:
        # kopf refuses validating handlers without a webhook server: they exist only when it is enabled.
        from . import admission

        admission.register(kopf.get_default_registry())
        admission.configure_webhook(settings, config)
    runtime = Runtime(Context(kube=Kube(load_api_client()), settings=config, record_event=_post_event))
    memo["runtime"] = runtime
    if config.metrics_port:
        serve_metrics(config.metrics_port)
    runtime.resync_tasks = [
        asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, config.resync_seconds), name="resync servers"),
        asyncio.create_task(runtime.resync_forever(LLAMA_MODELS, config.model_resync_seconds), name="resync models"),
        # Router-mode servers' loaded models change without any Kubernetes event: ask their pods (status.models).
        asyncio.create_task(ModelStatusPoller(runtime.ctx).run_forever(config.model_status_seconds),
                            name="router model status"),
    ]
    log.info("llama-operator started: namespaces=%s", ",".join(config.namespaces) or "all")


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(**connection_settings(load_api_client()))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get("runtime")
    if runtime is not None:
        runtime.close()


# ------------------------------------------------------------------------------------------------- models


@kopf.on.resume(GROUP, VERSION, "llamamodels")
@kopf.on.create(GROUP, VERSION, "llamamodels")
@kopf.on.update(GROUP, VERSION, "llamamodels", field="spec")
async def model_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _best_effort(_runtime(memo).reconcile_model(namespace, name), f"a change of LlamaModel {namespace}/{name}")


@kopf.index(GROUP, VERSION, "llamaservers")
def servers_by_model(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    """Which servers use which model (served, speculative draft, or one of spec.models)."""
    refs = [spec.get("modelRef") or {}, (spec.get("speculative") or {}).get("draftModelRef") or {}]
    refs += [entry.get("modelRef") or {} for entry in spec.get("models") or [] if isinstance(entry, dict)]
    return {(namespace, str(ref["name"])): name for ref in refs if isinstance(ref, dict) and ref.get("name")}


@kopf.on.event(GROUP, VERSION, "llamamodels")
async def model_event(
    namespace: str, name: str, memo: kopf.Memo, servers_by_model: kopf.Index[tuple[str, str], str], **_: Any
) -> None:
    # A model becoming Ready (or vanishing) changes every server that references it: no polling needed.
    for server in set(servers_by_model.get((namespace, name), [])):
        await _best_effort(_runtime(memo).reconcile_server(namespace, server), f"LlamaModel {namespace}/{name}")


@kopf.on.event("", "v1", "persistentvolumeclaims", labels=OWNED_BY_MODEL)
async def cache_pvc_event(
    type: str, name: str, namespace: str, labels: kopf.Labels, meta: kopf.Meta, memo: kopf.Memo, **_: Any
) -> None:
    runtime = _runtime(memo)
    if type != "DELETED" and runtime.ctx.kube.is_own_write("persistentvolumeclaims", namespace, name,
                                                           meta.get("resourceVersion")):
        return  # the echo of our own apply: the operator's own writes do not wake it
    await _best_effort(runtime.reconcile_model(namespace, labels[MODEL_LABEL]), "a cache PVC change")


# ------------------------------------------------------------------------------------------------- servers


@kopf.on.resume(GROUP, VERSION, "llamaservers")
@kopf.on.create(GROUP, VERSION, "llamaservers")
@kopf.on.update(GROUP, VERSION, "llamaservers", field="spec")
async def server_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _best_effort(_runtime(memo).reconcile_server(namespace, name), f"a change of LlamaServer {namespace}/{name}")


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
@kopf.on.event("", "v1", "services", labels=OWNED)
@kopf.on.event("", "v1", "pods", labels=OWNED)
async def owned_object_event(
    type: str, name: str, namespace: str, labels: kopf.Labels, meta: kopf.Meta, memo: kopf.Memo,
    resource: kopf.Resource, **_: Any
) -> None:
    # Covers drift too: an edited or deleted Deployment/Service is put back by the reconcile it triggers.
    runtime = _runtime(memo)
    version = meta.get("resourceVersion")
    if type != "DELETED" and runtime.ctx.kube.is_own_write(resource.plural, namespace, name, version):
        return  # the echo of our own apply: reconciling again would change nothing
    server = labels[SERVER_LABEL]
    await _best_effort(runtime.reconcile_server(namespace, server), f"a {resource.singular} change")
