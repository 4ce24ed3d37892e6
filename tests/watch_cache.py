"""kopf's indexes over a FakeKube, for unit tests of the loops that read them (reconcile/watched.py).

Each index is recomputed on every read by the real index handler (reconcile/indexes.py) over the objects the
FakeKube holds, as kopf would have from the watch events: a test changes the objects (put, edit, a status
patch) and the loops see the change, with no LIST sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from llama_operator.contract import MANAGED_BY, MANAGED_BY_LABEL, SERVER_LABEL
from llama_operator.reconcile import indexes
from llama_operator.reconcile.watched import (
    MODEL_KEYS,
    MODELS,
    OWNED,
    READY_PODS,
    ROUTERS,
    SERVER_KEYS,
    SERVER_PODS,
    WORKER_PODS,
    Watched,
)
from tests.fakekube import FakeKube


def _serves(labels: Mapping[str, str]) -> bool:
    return SERVER_LABEL in labels


def _owned(labels: Mapping[str, str]) -> bool:
    return SERVER_LABEL in labels and labels.get(MANAGED_BY_LABEL) == MANAGED_BY


def _any(labels: Mapping[str, str]) -> bool:
    return True


HANDLERS: dict[str, tuple[tuple[str, ...], Callable[..., Mapping[Any, Any]], Callable[[Mapping[str, str]], bool]]] = {
    SERVER_KEYS: (("llamaservers",), indexes.llama_server_keys, _any),
    MODEL_KEYS: (("llamamodels",), indexes.llama_model_keys, _any),
    ROUTERS: (("llamaservers",), indexes.llama_router_servers, _any),
    MODELS: (("llamamodels",), indexes.llama_models, _any),
    READY_PODS: (("pods",), indexes.llama_ready_pods, _serves),
    OWNED: (("deployments", "services"), indexes.llama_owned_objects, _owned),
    SERVER_PODS: (("pods",), indexes.llama_server_pods, _serves),
    WORKER_PODS: (("pods",), indexes.llama_worker_pods, _serves),
}
"""Each index: the kinds kopf watches for it, its handler, and the handler's label filter."""


class _Resource:
    def __init__(self, plural: str) -> None:
        self.plural = plural


def index_of(plurals: tuple[str, ...], handler: Callable[..., Mapping[Any, Any]],
             accepts: Callable[[Mapping[str, str]], bool],
             bodies: Mapping[tuple[str, str, str], Mapping[str, Any]]) -> dict[Any, list[Any]]:
    """What kopf's index of `handler` holds for these objects: key -> the values of every object with it."""
    out: dict[Any, list[Any]] = {}
    for (kind, namespace, name), body in sorted(bodies.items()):
        meta = body.get("metadata") or {}
        labels = meta.get("labels") or {}
        if kind not in plurals or not accepts(labels):
            continue
        result = handler(namespace=namespace, name=name, spec=body.get("spec") or {},
                         status=body.get("status") or {}, labels=labels, meta=meta, body=body,
                         resource=_Resource(kind), memo={})
        for key, value in result.items():
            out.setdefault(key, []).append(value)
    return out


class KubeIndex(Mapping[Any, list[Any]]):
    def __init__(self, kube: FakeKube, index: str) -> None:
        self.kube = kube
        self.plurals, self.handler, self.accepts = HANDLERS[index]

    def _now(self) -> dict[Any, list[Any]]:
        return index_of(self.plurals, self.handler, self.accepts, self.kube.objects)

    def __getitem__(self, key: Any) -> list[Any]:
        return self._now()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


def watched_over(kube: FakeKube) -> Watched:
    """A `Watched` whose indexes follow what `kube` holds."""
    return Watched({name: KubeIndex(kube, name) for name in HANDLERS})
