"""Ready endpoints of each LlamaServer's Service, from the watched EndpointSlices.

The real EndpointSlice controller writes one or more slices per Service (label `kubernetes.io/service-name`)
from the pods that match its selector; an address counts here only while its `ready` condition is true (an
absent condition means ready, as the API documents), so a terminating or unready pod gets no new request. The
port is the slice's port named `http` (the operator's Service targets the pods' `http` port).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..contract import PORT_NAME

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, order=True)
class Endpoint:
    address: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


def ready_endpoints(slice_body: Mapping[str, Any]) -> list[Endpoint]:
    """The ready addresses of one EndpointSlice, with its `http` port (else its only port)."""
    ports = slice_body.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    if port is None and len(ports) == 1:
        port = ports[0].get("port")
    if not isinstance(port, int):
        return []
    found = []
    for endpoint in slice_body.get("endpoints") or []:
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is False:
            continue
        found += [Endpoint(address, port) for address in endpoint.get("addresses") or []]
    return found


class EndpointTable:
    """Slices by (namespace, name); ready endpoints by Service. `on_change(namespace, service)` after a change."""

    def __init__(self, on_change: Callable[[str, str], None] | None = None) -> None:
        self._slices: dict[tuple[str, str], tuple[str, list[Endpoint]]] = {}
        self._by_service: dict[tuple[str, str], tuple[Endpoint, ...]] = {}
        self._on_change = on_change

    def ready(self, namespace: str, service: str) -> tuple[Endpoint, ...]:
        return self._by_service.get((namespace, service), ())

    def upsert(self, slice_body: Mapping[str, Any]) -> None:
        meta = slice_body.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        key = (meta.get("namespace", ""), meta.get("name", ""))
        old = self._slices.get(key)
        if service is None:
            self._slices.pop(key, None)
        else:
            self._slices[key] = (service, ready_endpoints(slice_body))
        self._refresh({(key[0], s) for s in (old[0] if old else None, service) if s})

    def remove(self, slice_body: Mapping[str, Any]) -> None:
        meta = slice_body.get("metadata") or {}
        old = self._slices.pop((meta.get("namespace", ""), meta.get("name", "")), None)
        if old is not None:
            self._refresh({(meta.get("namespace", ""), old[0])})

    def replace(self, bodies: Iterable[Mapping[str, Any]], namespace: str | None) -> None:
        touched = {(ns, svc) for (ns, _), (svc, _) in self._slices.items() if namespace is None or ns == namespace}
        self._slices = {k: v for k, v in self._slices.items() if not (namespace is None or k[0] == namespace)}
        for body in bodies:
            meta = body.get("metadata") or {}
            service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
            if service is not None:
                self._slices[(meta.get("namespace", ""), meta.get("name", ""))] = (service, ready_endpoints(body))
                touched.add((meta.get("namespace", ""), service))
        self._refresh(touched)

    def _refresh(self, services: set[tuple[str, str]]) -> None:
        for namespace, service in services:
            endpoints = sorted({e for (ns, _), (svc, found) in self._slices.items()
                                if ns == namespace and svc == service for e in found})
            before = self._by_service.get((namespace, service), ())
            if endpoints:
                self._by_service[(namespace, service)] = tuple(endpoints)
            else:
                self._by_service.pop((namespace, service), None)
            if tuple(endpoints) != before and self._on_change is not None:
                self._on_change(namespace, service)
