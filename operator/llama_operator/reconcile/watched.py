"""What the operator's watches already hold, read by the periodic loops instead of LISTing the API server.

kopf watches LlamaServers, LlamaModels and the managed pods anyway (handlers.py); reconcile/indexes.py keeps a
few kopf indexes over those watch streams, each value only what a loop reads, and `Watched` is the read side:

- `keys(kind)`: every (namespace, name) of LlamaServers or LlamaModels, for the resync (runtime.py);
- `owned(plural, namespace, name)`: the operator's Deployment or Service of a server, and `server_pods(namespace,
  server)` the pods its Deployment selects, each reduced to what a server's reconcile reads of it (server.py
  compares its apply with the first and reports the fleet from both): a pod or Deployment event costs the
  reconcile it triggers no read of its own;
- `model(namespace, name)`: a LlamaModel without its conditions, as a server's reconcile resolves it;
- `routers()`: the router-mode LlamaServers (spec plus the poller's own status fields) for the model status
  poller (router_status.py), `models()` the LlamaModels' spec and the status fields it estimates memory from, and
  `ready_pods(namespace, server)` the (pod, IP) of that server's ready pods.

The indexes are kopf's (`kopf.Index`: a mapping of key to a collection of values, updated in place by the
watch); `attach` hands them over once the operator runs. Before that, or with no object of any kind yet, every
read is empty: what an empty watch would say.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

SERVER_KEYS = "llama_server_keys"
"""Index: namespace -> names of the LlamaServers in it."""
MODEL_KEYS = "llama_model_keys"
"""Index: namespace -> names of the LlamaModels in it."""
ROUTERS = "llama_router_servers"
"""Index: (namespace, name) -> the router-mode LlamaServer as the poller reads it (a small dict, no metadata
beyond its name)."""
MODELS = "llama_models"
"""Index: (namespace, name) -> the LlamaModel without its conditions and server-side bookkeeping."""
READY_PODS = "llama_ready_pods"
"""Index: (namespace, server) -> (pod name, pod IP) of each ready, not terminating pod of that server."""
OWNED = "llama_owned_objects"
"""Index: (plural, namespace, name) -> a Deployment or Service the operator made, reduced by `owned_view`."""
SERVER_PODS = "llama_server_pods"
WORKER_PODS = "llama_worker_pods"
"""Index: (namespace, server) -> each pod that server's Deployment selects, reduced by `pod_view`."""
INDEXES = (SERVER_KEYS, MODEL_KEYS, ROUTERS, MODELS, READY_PODS, OWNED, SERVER_PODS, WORKER_PODS)

OWNED_METADATA = ("name", "namespace", "uid", "generation", "resourceVersion", "labels", "annotations",
                  "ownerReferences", "deletionTimestamp")
"""What `kube.Applied.covers` compares of a live object before it skips an apply, and what identifies it."""

Index = Mapping[Any, Collection[Any]]


def ready_pod_ip(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(pod name, pod IP) when the pod is Ready and not terminating, else None."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in conditions if isinstance(conditions, list))
    if ready and status.get("podIP") and not meta.get("deletionTimestamp"):
        return str(meta.get("name")), str(status["podIP"])
    return None


def _pick(source: Any, keys: Iterable[str]) -> dict[str, Any]:
    source = source if isinstance(source, Mapping) else {}
    return {key: _plain(source[key]) for key in keys if key in source}


def _plain(value: Any) -> Any:
    """A deep copy as plain dicts and lists (kopf hands views over its own body)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def owned_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Deployment or Service as a server's reconcile reads it: its metadata that an apply compares, and of a
    Deployment the strategy, its pod template's container names and images (the helper image a pod keeps:
    builders/helper_image.py) and the status the fleet's status is computed from (server_status.py)."""
    spec = body.get("spec") if isinstance(body.get("spec"), Mapping) else {}
    view = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": _pick(body.get("metadata"), OWNED_METADATA)}
    if body.get("kind") == "Deployment":
        view["spec"] = _pick(spec, ("replicas", "strategy"))
        template = spec.get("template") if isinstance(spec.get("template"), Mapping) else {}
        pod = template.get("spec") if isinstance(template.get("spec"), Mapping) else {}
        view["spec"]["template"] = {"spec": {key: [_pick(c, ("name", "image")) for c in pod.get(key) or []
                                                   if isinstance(c, Mapping)]
                                             for key in ("initContainers", "containers")}}
        view["status"] = _plain(body.get("status") or {})
    return view


def pod_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """A pod as a server's status reads it (server_status.py, download.py, trust.py): its name, whether it is
    terminating, each container's name and memory limit, each init container's arguments, and its status."""
    spec = body.get("spec") if isinstance(body.get("spec"), Mapping) else {}
    containers = [{"name": c.get("name"), "resources": {"limits": _pick(
        (c.get("resources") or {}).get("limits"), ("memory",))}} for c in spec.get("containers") or []
        if isinstance(c, Mapping)]
    inits = [_pick(c, ("name", "args")) for c in spec.get("initContainers") or [] if isinstance(c, Mapping)]
    return {"metadata": _pick(body.get("metadata"), ("name", "namespace", "uid", "deletionTimestamp")),
            "spec": {"containers": containers, "initContainers": inits, **_pick(spec, ("nodeName",))},
            "status": _plain(body.get("status") or {})}


class Watched:
    """The read side of the watch caches (see the module docstring). Every read copies what it returns out of
    the live index first, so a watch event that lands while a loop awaits changes nothing under its feet."""

    def __init__(self, indexes: Mapping[str, Index] | None = None) -> None:
        self._indexes: dict[str, Index] = {}
        if indexes is not None:
            self.attach(indexes)

    @property
    def attached(self) -> bool:
        return bool(self._indexes)

    def attach(self, indexes: Mapping[str, Index]) -> None:
        """Read from these indexes (kopf's, by their id) from now on; ids missing there stay empty."""
        self._indexes = {name: indexes[name] for name in INDEXES if name in indexes}

    def _index(self, name: str) -> Index:
        return self._indexes.get(name) or {}

    def keys(self, kind_plural: str) -> list[tuple[str, str]]:
        """(namespace, name) of every watched LlamaServer ("llamaservers") or LlamaModel ("llamamodels")."""
        index = self._index(SERVER_KEYS if kind_plural == "llamaservers" else MODEL_KEYS)
        return sorted((namespace, name) for namespace, names in list(index.items()) for name in list(names))

    def routers(self) -> list[dict[str, Any]]:
        """The router-mode LlamaServers (and those whose status still shows models), as the poller reads them."""
        return [body for _, bodies in sorted(list(self._index(ROUTERS).items())) for body in list(bodies)]

    def models(self, namespace: str) -> list[dict[str, Any]]:
        """The LlamaModels of a namespace, each as a small body (metadata name/namespace, spec, status subset)."""
        return [body for (ns, _), bodies in list(self._index(MODELS).items()) if ns == namespace
                for body in list(bodies)]

    def owned(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The operator's Deployment or Service ("deployments", "services") by name, or None when the watch has
        none (a copy: the caller may change it)."""
        found = list(self._index(OWNED).get((plural, namespace, name)) or ())
        return _plain(found[0]) if found else None

    def server_pods(self, namespace: str, server: str) -> list[dict[str, Any]]:
        """The pods the server's Deployment selects, by name (copies)."""
        pods = [_plain(pod) for pod in list(self._index(SERVER_PODS).get((namespace, server)) or ())]
        return sorted(pods, key=lambda pod: str(pod["metadata"].get("name")))

    def worker_pods(self, namespace: str, server: str) -> list[dict[str, Any]]:
        """The RPC workers of a distributed server (builders/distributed.py), by name (copies)."""
        pods = [_plain(pod) for pod in list(self._index(WORKER_PODS).get((namespace, server)) or ())]
        return sorted(pods, key=lambda pod: str(pod["metadata"].get("name")))

    def model(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The LlamaModel as `models()` holds it, or None when the watch has none."""
        found = list(self._index(MODELS).get((namespace, name)) or ())
        return _plain(found[0]) if found else None

    def ready_pods(self, namespace: str, server: str) -> list[tuple[str, str]]:
        """(pod name, pod IP) of the server's ready pods, by pod name."""
        return sorted(self._index(READY_PODS).get((namespace, server)) or ())


def small_body(kind: str, namespace: str, name: str, spec: Mapping[str, Any],
               status: Mapping[str, Any], keep: Iterable[str]) -> dict[str, Any]:
    """An object reduced to what a loop reads: its name, spec, and the `keep` fields of its status."""
    return {"kind": kind, "metadata": {"namespace": namespace, "name": name}, "spec": dict(spec),
            "status": {key: status[key] for key in keep if key in status}}
