"""kopf's indexes over a FakeKube, for unit tests of the loops that read them (reconcile/watched.py).

Each index is recomputed on every read by the real index handler (reconcile/indexes.py) over the objects the
FakeKube holds, as kopf would have from the watch events: a test changes the objects (put, edit, a status
patch) and the loops see the change, with no LIST sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from llama_operator.contract import SERVER_LABEL
from llama_operator.reconcile import indexes
from llama_operator.reconcile.watched import MODEL_KEYS, MODELS, READY_PODS, ROUTERS, SERVER_KEYS, Watched
from tests.fakekube import FakeKube

HANDLERS: dict[str, tuple[str, Callable[..., Mapping[Any, Any]]]] = {
    SERVER_KEYS: ("llamaservers", indexes.llama_server_keys),
    MODEL_KEYS: ("llamamodels", indexes.llama_model_keys),
    ROUTERS: ("llamaservers", indexes.llama_router_servers),
    MODELS: ("llamamodels", indexes.llama_models_for_estimates),
    READY_PODS: ("pods", indexes.llama_ready_pods),
}


def index_of(plural: str, handler: Callable[..., Mapping[Any, Any]],
             bodies: Mapping[tuple[str, str, str], Mapping[str, Any]]) -> dict[Any, list[Any]]:
    """What kopf's index of `handler` holds for these objects: key -> the values of every object with it."""
    out: dict[Any, list[Any]] = {}
    for (kind, namespace, name), body in sorted(bodies.items()):
        labels = (body.get("metadata") or {}).get("labels") or {}
        if kind != plural or (plural == "pods" and SERVER_LABEL not in labels):  # the handler's label filter
            continue
        result = handler(namespace=namespace, name=name, spec=body.get("spec") or {},
                         status=body.get("status") or {}, labels=labels, body=body, memo={})
        for key, value in result.items():
            out.setdefault(key, []).append(value)
    return out


class KubeIndex(Mapping[Any, list[Any]]):
    def __init__(self, kube: FakeKube, index: str) -> None:
        self.kube = kube
        self.plural, self.handler = HANDLERS[index]

    def _now(self) -> dict[Any, list[Any]]:
        return index_of(self.plural, self.handler, self.kube.objects)

    def __getitem__(self, key: Any) -> list[Any]:
        return self._now()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


def watched_over(kube: FakeKube) -> Watched:
    """A `Watched` whose indexes follow what `kube` holds."""
    return Watched({name: KubeIndex(kube, name) for name in HANDLERS})
