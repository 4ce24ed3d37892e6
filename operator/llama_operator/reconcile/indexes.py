"""The kopf indexes the periodic loops read instead of LISTing (their read side is watched.py).

kopf keeps each index current from the watch streams the operator runs anyway (LlamaServers, LlamaModels, and
the managed pods, filtered by label at the API server). Each value is only what a loop reads — a name, a spec
and a few status fields, a pod's IP — never the whole body, so the memory they take is a small fraction of what
one LIST of the same objects parsed. handlers.py imports this module, which registers the handlers.

kopf hands its indexes to handlers as keyword arguments (by id); the first index handler that runs gives them
to the Runtime's `Watched` (`_attach`), which the resync and the poller share through the Context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kopf

from ..api.v1beta1 import GROUP, VERSION
from ..builders.distributed import worker_selector
from ..builders.objects import selector_labels
from ..contract import MANAGED_BY, MANAGED_BY_LABEL, SERVER_LABEL
from .server import MODEL_STATUS_FIELDS
from .watched import (
    INDEXES,
    MODEL_KEYS,
    MODELS,
    OWNED,
    OWNED_METADATA,
    READY_PODS,
    ROUTERS,
    SERVER_KEYS,
    SERVER_PODS,
    WORKER_PODS,
    owned_view,
    pod_view,
    ready_pod_ip,
    small_body,
)

OWNED_LABELS = {MANAGED_BY_LABEL: MANAGED_BY, SERVER_LABEL: kopf.PRESENT}
"""The Deployments and Services a LlamaServer owns (builders/objects.py labels them so)."""


def _attach(memo: Any, indexes: dict[str, Any]) -> None:
    """Give kopf's indexes to the Runtime's `Watched` (once: kopf's index objects live as long as the operator)."""
    runtime = memo.get("runtime") if hasattr(memo, "get") else None
    watched = getattr(getattr(runtime, "ctx", None), "watched", None)
    if watched is not None and not watched.attached:
        watched.attach({name: indexes[name] for name in INDEXES if name in indexes})


@kopf.index(GROUP, VERSION, "llamaservers", id=SERVER_KEYS)
def llama_server_keys(namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> dict[str, str]:
    _attach(memo, kwargs)
    return {namespace: name}


@kopf.index(GROUP, VERSION, "llamamodels", id=MODEL_KEYS)
def llama_model_keys(namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> dict[str, str]:
    _attach(memo, kwargs)
    return {namespace: name}


@kopf.index(GROUP, VERSION, "llamaservers", id=ROUTERS)
def llama_router_servers(namespace: str, name: str, spec: kopf.Spec, status: kopf.Status,
                         memo: kopf.Memo, **kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Router-mode servers, and servers whose status still shows models (the poller clears those)."""
    _attach(memo, kwargs)
    if not spec.get("models") and status.get("models") is None:
        return {}
    return {(namespace, name): small_body("LlamaServer", namespace, name, spec, status, MODEL_STATUS_FIELDS)}


@kopf.index(GROUP, VERSION, "llamamodels", id=MODELS)
def llama_models(namespace: str, name: str, meta: kopf.Meta, spec: kopf.Spec, status: kopf.Status,
                 memo: kopf.Memo, **kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Each LlamaModel as a server's reconcile resolves it and a memory estimate reads it: all but its
    conditions and its server-side bookkeeping (managedFields)."""
    _attach(memo, kwargs)
    body = small_body("LlamaModel", namespace, name, spec, status,
                      [key for key in status if key != "conditions"])
    body["apiVersion"] = f"{GROUP}/{VERSION}"
    body["metadata"] = {key: meta[key] for key in OWNED_METADATA if key in meta}
    return {(namespace, name): body}


@kopf.index("", "v1", "pods", labels={SERVER_LABEL: kopf.PRESENT}, id=READY_PODS)
def llama_ready_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo,
                     **kwargs: Any) -> dict[tuple[str, str], tuple[str, str]]:
    """A server's pods (those its Deployment selects), when ready: the poller asks them for their models."""
    _attach(memo, kwargs)
    server = labels[SERVER_LABEL]
    if any(labels.get(key) != value for key, value in selector_labels(server).items()):
        return {}
    ready = ready_pod_ip(body)
    return {(namespace, server): ready} if ready else {}


@kopf.index("apps", "v1", "deployments", labels=OWNED_LABELS, id=OWNED)
@kopf.index("", "v1", "services", labels=OWNED_LABELS, id=OWNED)
def llama_owned_objects(namespace: str, name: str, body: kopf.Body, resource: kopf.Resource, memo: kopf.Memo,
                        **kwargs: Any) -> dict[tuple[str, str, str], dict[str, Any]]:
    """A server's Deployment and Service, as its reconcile compares and reports them (watched.owned_view)."""
    _attach(memo, kwargs)
    return {(resource.plural, namespace, name): owned_view(body)}


def _pod_of(selector: Callable[[str], dict[str, str]], namespace: str, labels: kopf.Labels,
            body: kopf.Body) -> dict[tuple[str, str], dict[str, Any]]:
    """The pod under its server's key when `selector(server)` selects it (a server's pods: its llama-server pods,
    or its RPC workers), else nothing."""
    server = labels[SERVER_LABEL]
    if any(labels.get(key) != value for key, value in selector(server).items()):
        return {}
    return {(namespace, server): pod_view(body)}


@kopf.index("", "v1", "pods", labels={SERVER_LABEL: kopf.PRESENT}, id=SERVER_PODS)
def llama_server_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo,
                      **kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every pod a server's Deployment selects, as its status reads them (watched.pod_view)."""
    _attach(memo, kwargs)
    return _pod_of(selector_labels, namespace, labels, body)


@kopf.index("", "v1", "pods", labels={SERVER_LABEL: kopf.PRESENT}, id=WORKER_PODS)
def llama_worker_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, memo: kopf.Memo,
                      **kwargs: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Every RPC worker pod of a distributed server, as its status reads them (watched.pod_view)."""
    _attach(memo, kwargs)
    return _pod_of(worker_selector, namespace, labels, body)
