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
from .kube import (
    LLAMA_MODELS,
    LLAMA_SERVERS,
    Kube,
    KubeError,
    ResourceKind,
    Unavailable,
    connection_settings,
    load_api_client,
)
from .metrics import RECONCILE_SECONDS, RECONCILES
from .metrics import serve as serve_metrics
from .reconcile.context import Context
from .reconcile.model import RetryLater, reconcile_model
from .reconcile.serial import Coalescer
from .reconcile.server import reconcile_server

log = logging.getLogger(__name__)
OWNED = {"app.kubernetes.io/managed-by": MANAGED_BY, SERVER_LABEL: kopf.PRESENT}
OWNED_BY_MODEL = {"app.kubernetes.io/managed-by": MANAGED_BY, MODEL_LABEL: kopf.PRESENT}


def _post_event(body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
    kopf.event(dict(body), type=type, reason=reason, message=message[:1024])


class Runtime:
    """What the handlers share, created once in the startup handler and kept in kopf's memo."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.servers = Coalescer()
        self.models = Coalescer()
        self.resync_tasks: list[asyncio.Task[None]] = []

    async def reconcile_server(self, namespace: str, name: str) -> None:
        job = self._job(LLAMA_SERVERS, "LlamaServer", reconcile_server, namespace, name)
        await self.servers.run((namespace, name), job)

    async def reconcile_model(self, namespace: str, name: str) -> None:
        job = self._job(LLAMA_MODELS, "LlamaModel", reconcile_model, namespace, name)
        await self.models.run((namespace, name), job)

    def _job(
        self, kind: ResourceKind, kind_name: str, reconcile: Callable[[Any, Context], Awaitable[Any]],
        namespace: str, name: str,
    ) -> Callable[[], Awaitable[None]]:
        """One reconcile of the object as it is when the job runs (not as it was when triggered)."""
        async def job() -> None:
            body = await self.ctx.kube.get(kind, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return  # deleted: garbage collection removes what it owned
            with _measure(kind_name):
                await reconcile(body, self.ctx)
        return job

    async def resync_forever(self, kind: ResourceKind, interval: float) -> None:
        """Reconcile every object of a kind now and then: a safety net for missed events, and for models
        the slow re-resolution that notices a moved revision."""
        reconcile = self.reconcile_server if kind is LLAMA_SERVERS else self.reconcile_model
        namespaces: tuple[str | None, ...] = self.ctx.settings.namespaces or (None,)
        while True:
            await asyncio.sleep(interval)
            for namespace in namespaces:
                try:
                    for body in await self.ctx.kube.list(kind, namespace):
                        meta = body["metadata"]
                        await _best_effort(reconcile(meta["namespace"], meta["name"]), "resync")
                except KubeError as exc:
                    log.warning("Resync of %s failed, will retry: %s", kind.plural, exc)


class _measure:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        RECONCILE_SECONDS.labels(self.kind).observe(time.monotonic() - self.started)
        RECONCILES.labels(self.kind, "error" if exc_type else "ok").inc()


def _runtime(memo: kopf.Memo) -> Runtime:
    return memo["runtime"]  # type: ignore[no-any-return]


def backoff_seconds(retry: int) -> float:
    """10 s, 20 s, 40 s ... capped at 10 minutes."""
    return float(min(600, 10 * 2 ** min(retry, 6)))


async def _guarded(coro: Any, retry: int = 0) -> None:
    """Spec handlers: transient trouble is retried by kopf with a growing delay, never in a hot loop."""
    try:
        await coro
    except RetryLater as exc:
        raise kopf.TemporaryError(str(exc), delay=backoff_seconds(retry)) from exc
    except Unavailable as exc:
        raise kopf.TemporaryError(f"Kubernetes API unavailable: {exc}", delay=15) from exc
    except KubeError as exc:
        raise kopf.TemporaryError(f"Kubernetes API refused a request: {exc}", delay=60) from exc


async def _best_effort(coro: Any, what: str) -> None:
    """Event handlers: a failure is logged; the next event or the resync tries again."""
    try:
        await coro
    except (KubeError, RetryLater) as exc:
        log.warning("Reconcile after %s did not finish, will retry later: %s", what, exc)


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
        # Importing registers the validating handlers; kopf refuses to run them without a server, so
        # they exist only when the webhook is enabled.
        from . import admission

        admission.configure_webhook(settings, config)
    runtime = Runtime(Context(kube=Kube(load_api_client()), settings=config, record_event=_post_event))
    memo["runtime"] = runtime
    if config.metrics_port:
        serve_metrics(config.metrics_port)
    runtime.resync_tasks = [
        asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, config.resync_seconds), name="resync servers"),
        asyncio.create_task(runtime.resync_forever(LLAMA_MODELS, config.model_resync_seconds), name="resync models"),
    ]
    log.info("llama-operator started: namespaces=%s", ",".join(config.namespaces) or "all")


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(**connection_settings(load_api_client()))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get("runtime")
    for task in runtime.resync_tasks if runtime is not None else []:
        task.cancel()


# ------------------------------------------------------------------------------------------------- models


@kopf.on.resume(GROUP, VERSION, "llamamodels")
@kopf.on.create(GROUP, VERSION, "llamamodels")
@kopf.on.update(GROUP, VERSION, "llamamodels", field="spec")
async def model_changed(namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    await _guarded(_runtime(memo).reconcile_model(namespace, name), retry)


@kopf.index(GROUP, VERSION, "llamaservers")
def servers_by_model(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    """Which servers use which model (served or speculative draft)."""
    refs = [spec.get("modelRef") or {}, (spec.get("speculative") or {}).get("draftModelRef") or {}]
    return {(namespace, str(ref["name"])): name for ref in refs if isinstance(ref, dict) and ref.get("name")}


@kopf.on.event(GROUP, VERSION, "llamamodels")
async def model_event(
    namespace: str, name: str, memo: kopf.Memo, servers_by_model: kopf.Index[tuple[str, str], str], **_: Any
) -> None:
    # A model becoming Ready (or vanishing) changes every server that references it: no polling needed.
    for server in set(servers_by_model.get((namespace, name), [])):
        await _best_effort(_runtime(memo).reconcile_server(namespace, server), f"LlamaModel {namespace}/{name}")


@kopf.on.event("", "v1", "persistentvolumeclaims", labels=OWNED_BY_MODEL)
async def cache_pvc_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    await _best_effort(_runtime(memo).reconcile_model(namespace, labels[MODEL_LABEL]), "a cache PVC change")


# ------------------------------------------------------------------------------------------------- servers


@kopf.on.resume(GROUP, VERSION, "llamaservers")
@kopf.on.create(GROUP, VERSION, "llamaservers")
@kopf.on.update(GROUP, VERSION, "llamaservers", field="spec")
async def server_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _guarded(_runtime(memo).reconcile_server(namespace, name))


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
