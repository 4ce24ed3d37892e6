"""kopf handlers: thin glue from watch events to the reconcile functions, and nothing else.

Every trigger for a LlamaServer — its own spec change, its model becoming ready, a Deployment or pod of
its changing or vanishing, the periodic resync — ends in the same `Runtime.reconcile_server` run
(reconcile/runtime.py), serialised and coalesced per server. No handler here decides anything itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from .api.v1beta1 import GROUP, VERSION, LlamaServerSpec
from .config import Settings
from .contract import MANAGED_BY, MANAGED_BY_LABEL, MANAGED_SELECTOR, MODEL_LABEL, SERVER_LABEL
from .kube import LLAMA_MODELS, LLAMA_SERVERS, Kube, connection_settings, load_api_client
from .kube.lease import KubeLeaseStore, LeaseApi
from .leader import ElectionConfig
from .leadership import Leadership
from .metrics import serve as serve_metrics
from .reconcile import indexes  # registers the watch caches the periodic loops and the reconciles read
from .reconcile.context import Context
from .reconcile.discovery import with_served_apis
from .reconcile.router_status import ModelStatusPoller
from .reconcile.runtime import Runtime, best_effort

log = logging.getLogger(__name__)
OWNED = indexes.OWNED_LABELS
OWNED_BY_MODEL = {MANAGED_BY_LABEL: MANAGED_BY, MODEL_LABEL: kopf.PRESENT}


def _post_event(body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
    kopf.event(dict(body), type=type, reason=reason, message=message[:1024])


def _runtime(memo: kopf.Memo) -> Runtime:
    return memo["runtime"]  # type: ignore[no-any-return]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = await with_served_apis(Kube(load_api_client()), Settings.from_env())
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
        settings.watching.label_selectors[owned] = MANAGED_SELECTOR
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.queueing.error_delays = (1, 2, 5, 10, 30, 60)
    if config.webhook_port:
        # kopf refuses validating handlers without a webhook server: they exist only when it is enabled.
        from . import admission

        admission.register(kopf.get_default_registry(), config)
        admission.configure_webhook(settings, config)
    runtime = Runtime(Context(kube=Kube(load_api_client()), settings=config, record_event=_post_event))
    memo["runtime"] = runtime
    if config.metrics_port:
        serve_metrics(config.metrics_port)
    election = ElectionConfig.from_env()
    if election is None:
        _start_loops(runtime, config)
    else:
        # Two replicas: only the Lease holder's kopf watches and reconciles (leadership.py); both serve the webhook.
        store = KubeLeaseStore(LeaseApi(load_api_client(), election.namespace), election.name)
        leadership = Leadership(election, store, on_elected=lambda: _start_loops(runtime, config))
        memo["leadership"] = leadership
        leadership.start()
    log.info("llama-operator started: namespaces=%s", ",".join(config.namespaces) or "all")


def _start_loops(runtime: Runtime, config: Settings) -> None:
    """The periodic loops, on the leader only (at start without an election, else once elected)."""
    runtime.resync_tasks = [
        asyncio.create_task(runtime.resync_forever(LLAMA_SERVERS, config.resync_seconds), name="resync servers"),
        asyncio.create_task(runtime.resync_forever(LLAMA_MODELS, config.model_resync_seconds), name="resync models"),
        # Router-mode servers' loaded models change without any Kubernetes event: ask their pods (status.models).
        asyncio.create_task(ModelStatusPoller(runtime.ctx).run_forever(config.model_status_seconds),
                            name="router model status"),
    ]


@kopf.on.probe(id="leader")
def leader_probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """In /healthz: whether this replica holds the leader Lease (both replicas are live and ready)."""
    leadership = memo.get("leadership")
    return {"leading": True, "election": False} if leadership is None else leadership.probe()


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(**connection_settings(load_api_client()))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    runtime = memo.get("runtime")
    if runtime is not None:
        runtime.close()
    leadership = memo.get("leadership")
    if leadership is not None:  # after the writes stopped: the standby takes over at its next try
        await leadership.stop()


# ------------------------------------------------------------------------------------------------- models


@kopf.on.resume(GROUP, VERSION, "llamamodels")
@kopf.on.create(GROUP, VERSION, "llamamodels")
@kopf.on.update(GROUP, VERSION, "llamamodels", field="spec")
async def model_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await best_effort(_runtime(memo).reconcile_model(namespace, name), f"a change of LlamaModel {namespace}/{name}")


@kopf.index(GROUP, VERSION, "llamaservers")
def servers_by_model(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> dict[tuple[str, str], str]:
    """Which servers use which model (served, speculative draft, or one of spec.models)."""
    try:
        refs = LlamaServerSpec.model_validate(dict(spec)).model_refs()
    except ValidationError:
        return {}  # a spec that does not parse is Failed whatever its models do: only a new spec changes it
    return {(namespace, ref.name): name for _, ref in refs}


@kopf.on.event(GROUP, VERSION, "llamamodels")
async def model_event(
    namespace: str, name: str, memo: kopf.Memo, servers_by_model: kopf.Index[tuple[str, str], str], **_: Any
) -> None:
    # A model becoming Ready (or vanishing) changes every server that references it: no polling needed.
    for server in set(servers_by_model.get((namespace, name), [])):
        await best_effort(_runtime(memo).reconcile_server(namespace, server), f"LlamaModel {namespace}/{name}")


@kopf.on.event("", "v1", "persistentvolumeclaims", labels=OWNED_BY_MODEL)
async def cache_pvc_event(
    type: str, name: str, namespace: str, labels: kopf.Labels, meta: kopf.Meta, memo: kopf.Memo, **_: Any
) -> None:
    runtime = _runtime(memo)
    if type != "DELETED" and runtime.ctx.kube.is_own_write("persistentvolumeclaims", namespace, name,
                                                           meta.get("resourceVersion")):
        return  # the echo of our own apply: the operator's own writes do not wake it
    await best_effort(runtime.reconcile_model(namespace, labels[MODEL_LABEL]), "a cache PVC change")


# ------------------------------------------------------------------------------------------------- servers


@kopf.on.resume(GROUP, VERSION, "llamaservers")
@kopf.on.create(GROUP, VERSION, "llamaservers")
@kopf.on.update(GROUP, VERSION, "llamaservers", field="spec")
async def server_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await best_effort(_runtime(memo).reconcile_server(namespace, name), f"a change of LlamaServer {namespace}/{name}")


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
    await best_effort(runtime.reconcile_server(namespace, server), f"a {resource.singular} change")
