"""The routing table: which LlamaServer a request's `model` names, built from the watched LlamaServers.

Each LlamaServer is reachable under three names: the model name it serves (`status.modelName`, which is
`spec.alias` or the LlamaModel's name), its `spec.alias`, and `<namespace>/<name>`. The last one is always
unique; a bare name that several LlamaServers serve (two namespaces, each with a `qwen`) is ambiguous and the
request is refused with the qualified names to choose from. A server whose spec does not parse is left out
(the operator reports why in its status).

A server with LoRA adapters (spec.adapters) also answers to `<name>:<adapter>` for each of those names and each
adapter: the same route, and `Route.adapter` says which adapter the name selects (adapters.py writes it into the
body). A model name (a static upstream's, say) may contain ':' itself; adapter names (LlamaModel names) never do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ..api.v1beta1 import AutoscalingStatus, LlamaServer, RoutingSpec, ScalingSpec
from ..builders.naming import model_name, served_names
from ..builders.quantity import parse_quantity
from ..builders.router_memory import memory_budget

log = logging.getLogger(__name__)

DEFAULT_PARALLEL = 4
ROUTER_MAX_LOADED = 4
"""llama-server's --models-max when spec.maxLoaded is unset."""
"""llama-server's slots when spec.parallel is unset (b11312: --parallel auto gives 4)."""


@dataclass(frozen=True)
class Route:
    """One LlamaServer as the gateway sees it."""

    namespace: str
    name: str
    model_name: str
    alias: str | None
    replicas: int
    ready_replicas: int
    scaling: ScalingSpec | None
    routing: RoutingSpec
    api_key_required: bool
    created: int
    """metadata.creationTimestamp, epoch seconds (OpenAI's `created`)."""
    parallel: int
    models: tuple[str, ...] = ()
    """Router mode (spec.models): every served model name; requests naming one go to this server."""
    memory_budget: int | None = None
    """Router mode with resources.limits.memory: the bytes the loaded models' estimates may add up to."""
    estimates: tuple[tuple[str, int], ...] = ()
    """Router mode: (served name, bytes) of each model whose estimate status.models shows."""
    keeps_slots: bool = False
    """Router mode with spec.promptCache.persist: the gateway loads a model a request names itself, saves a
    model's slots before it unloads it and restores them after it loads it (room.py)."""
    max_loaded: int | None = None
    """Router mode: llama-server's --models-max (spec.maxLoaded, else its default 4; 0: no limit)."""
    adapters: tuple[tuple[str, float], ...] = ()
    """spec.adapters: (adapter name, scale), in order: the index is the adapter's id in llama-server."""
    last_scale_time: str | None = None
    """status.autoscaling.lastScaleTime: the autoscaler's memory across gateway restarts."""
    resource_version: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def service(self) -> tuple[str, str]:
        """(namespace, name) of its Service: the operator names it after the LlamaServer."""
        return self.namespace, self.name

    @property
    def base_names(self) -> tuple[str, ...]:
        """The names of the server itself, no adapter applied."""
        return tuple(dict.fromkeys(n for n in (self.model_name, self.alias, *self.models, self.key) if n))

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that routes here: the base names, then `<base>:<adapter>` for each adapter."""
        base = self.base_names
        return tuple(dict.fromkeys((*base, *(f"{n}:{a}" for a, _ in self.adapters for n in base))))

    def adapter(self, requested: str) -> tuple[int, float] | None:
        """(llama-server's adapter id, scale) of the adapter `requested` (one of `names`) selects; None for none."""
        base = self.base_names
        if requested in base:  # a base name that looks like `<other base>:<adapter>` is still the base name
            return None
        prefix, _, name = requested.rpartition(":")
        if prefix not in base:
            return None
        return next(((index, scale) for index, (adapter, scale) in enumerate(self.adapters) if adapter == name),
                    None)

    def makes_room(self, model: str) -> bool:
        """Whether the gateway loads `model` on the replica itself before a request for it (a memory budget, or
        kept prompt caches: room.py)."""
        return (self.memory_budget is not None or self.keeps_slots) and model in self.models

    @property
    def target_in_flight(self) -> int:
        if self.scaling is not None and self.scaling.target_in_flight is not None:
            return self.scaling.target_in_flight
        return self.parallel


def _epoch(timestamp: str | None) -> int:
    if not timestamp:
        return 0
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def route_from(body: Mapping[str, Any]) -> Route | None:
    """The Route of a LlamaServer object, or None when its spec does not parse."""
    meta = body.get("metadata") or {}
    try:
        server = LlamaServer.model_validate({**body, "status": {}})
    except ValidationError as exc:
        log.warning("LlamaServer %s/%s is not routed: its spec is invalid (%d problems; see its status)",
                    meta.get("namespace"), meta.get("name"), exc.error_count())
        return None
    status = body.get("status") or {}
    autoscaling = None
    try:
        autoscaling = AutoscalingStatus.model_validate(status.get("autoscaling") or {})
    except ValidationError:
        pass
    spec = server.spec
    return Route(
        namespace=server.metadata.namespace,
        name=server.metadata.name,
        # A router-mode server (spec.models) answers to each of its models' names; the request's `model` is
        # passed on unchanged and llama-server's router picks (and, if needed, loads) that model.
        model_name=served_names(server)[0] if spec.models else status.get("modelName") or model_name(server),
        alias=spec.alias,
        models=tuple(served_names(server)) if spec.models else (),
        replicas=spec.replicas,
        ready_replicas=int(status.get("readyReplicas") or 0),
        scaling=spec.scaling,
        routing=spec.routing or RoutingSpec(),
        api_key_required=spec.api_key_secret_ref is not None,
        created=_epoch(meta.get("creationTimestamp")),
        parallel=spec.parallel or DEFAULT_PARALLEL,
        memory_budget=memory_budget(server),
        estimates=_estimates(status),
        # With an API key the gateway's /slots calls carry the requester's own key (room.py).
        keeps_slots=spec.models is not None and spec.keeps_prompt_cache(),
        max_loaded=(spec.max_loaded if spec.max_loaded is not None else ROUTER_MAX_LOADED) if spec.models else None,
        # Router mode loads no adapter (the CRD refuses spec.adapters with spec.models).
        adapters=() if spec.models else tuple((a.name, a.scale) for a in spec.adapters or ()),
        last_scale_time=autoscaling.last_scale_time if autoscaling else None,
        resource_version=meta.get("resourceVersion"),
    )


def _estimates(status: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """(name, bytes) of status.models' estimates; an entry that does not read as one has none."""
    out = []
    models = status.get("models")
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        try:
            size = parse_quantity(entry["estimate"])
        except (KeyError, TypeError, ValueError, ArithmeticError):
            continue
        if 0 < size < 2**62:  # compared before int(): a quantity like 1e999999999 never becomes an integer
            out.append((entry["name"], int(size)))
    return tuple(out)


@dataclass(frozen=True)
class Resolution:
    """What a requested model name resolves to: one route, several (ambiguous), or none."""

    route: Route | None
    candidates: tuple[Route, ...] = ()


class RoutingTable:
    """LlamaServers by key, and the name index over them."""

    REPLICA_LOG = 64

    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._by_name: dict[str, list[Route]] = {}
        self._replicas_seen: dict[str, list[tuple[int, str | None, int]]] = {}
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._routes)

    def get(self, key: str) -> Route | None:
        return self._routes.get(key)

    def routes(self) -> list[Route]:
        return sorted(self._routes.values(), key=lambda r: r.key)

    def upsert(self, body: Mapping[str, Any]) -> Route | None:
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        route = route_from(body)
        if route is None:
            self._routes.pop(key, None)
        else:
            self._routes[key] = route
            self._observed(route)
        self._reindex()
        return route

    def remove(self, namespace: str, name: str) -> None:
        self._routes.pop(f"{namespace}/{name}", None)
        self._reindex()

    def replace(self, bodies: Iterable[Mapping[str, Any]], namespace: str | None) -> None:
        """The full list (after a relist) of one namespace, or of all of them (None)."""
        for key in [k for k, r in self._routes.items() if namespace is None or r.namespace == namespace]:
            del self._routes[key]
        for body in bodies:
            route = route_from(body)
            if route is not None:
                self._routes[route.key] = route
                self._observed(route)
        self._reindex()

    def _observed(self, route: Route) -> None:
        """Log spec.replicas as the watch delivered it (in resourceVersion order) for the autoscaler."""
        self._sequence += 1
        log = self._replicas_seen.setdefault(route.key, [])
        log.append((self._sequence, route.resource_version, route.replicas))
        del log[:-self.REPLICA_LOG]

    def replica_events(self, key: str, after: int) -> tuple[list[tuple[str | None, int]], int, bool]:
        """(resourceVersion, spec.replicas) seen since sequence `after`, the last sequence, and whether some were
        dropped in between (the log keeps the last REPLICA_LOG per server)."""
        log = self._replicas_seen.get(key, [])
        newer = [(rv, replicas) for seq, rv, replicas in log if seq > after]
        dropped = bool(log) and log[0][0] > after + 1 and after > 0
        return newer, (log[-1][0] if log else after), dropped

    def _reindex(self) -> None:
        index: dict[str, list[Route]] = {}
        for route in self.routes():
            for name in route.names:
                index.setdefault(name, []).append(route)
        self._by_name = index

    def resolve(self, model: str) -> Resolution:
        found = self._by_name.get(model) or []
        if len(found) == 1:
            return Resolution(found[0])
        return Resolution(None, tuple(found))

    def public_name(self, route: Route) -> str:
        """The shortest name that reaches exactly this route: the model name, else `<namespace>/<name>`."""
        for name in (route.model_name, route.alias):
            if name and len(self._by_name.get(name) or []) == 1:
                return name
        return route.key

    def public_names(self, route: Route) -> tuple[str, ...]:
        """What a client lists and asks for: every model of a router-mode server, else its one public name and
        `<public name>:<adapter>` for each of its adapters, in spec.adapters' order."""
        if route.models:
            return route.models
        public = self.public_name(route)
        return (public, *(self._adapter_name(route, public, adapter) for adapter, _ in route.adapters))

    def _adapter_name(self, route: Route, public: str, adapter: str) -> str:
        # `<public>:<adapter>` may also be a name of another server, or this one's own base name: then the key's
        # (a served name has no '/', so only the key form is sure to name this adapter alone).
        name = f"{public}:{adapter}"
        unique = len(self._by_name.get(name) or []) == 1 and name not in route.base_names
        return name if unique else f"{route.key}:{adapter}"

    def listed_name(self, route: Route, requested: str) -> str:
        """The entry of `public_names(route)` that `requested`, a name resolving to `route`, stands for."""
        names = self.public_names(route)
        if requested in names:
            return requested
        chosen = route.adapter(requested)
        return names[1 + chosen[0]] if chosen is not None else names[0]

    def known_names(self) -> list[str]:
        return [name for route in self.routes() for name in self.public_names(route)]
