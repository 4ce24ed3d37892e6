"""Leases (coordination.k8s.io/v1) on the API server: the one Lease client of the operator and the gateway.

- `LeaseApi`: GET, POST, PUT and DELETE of any Lease in one namespace, on raw dict bodies, each request bounded by
  a short timeout (a hanging API server must not outlast a leader's renew deadline), API errors translated by
  `translate`. It calls the API through the client's public ApiClient because `Kube` has no PUT with a
  resourceVersion, and every Lease write is one: a conflict is a lost race, never an overwrite.
- `lease_body`: a whole Lease object, for a POST or a PUT.
- `KubeLeaseStore`: one named Lease as the `LeaseRecord`s leader.py elects over (the operator's leader Lease, the
  gateway's decider Lease), on a `LeaseApi`.
- `LEASE_PERMISSION`: what an election calls. The operator's Lease lives in its own (release) namespace, not in the
  namespaces it watches, so its one grant is a Role there (the source the chart's RBAC is checked against); the
  gateway adds what its per-replica reports need (gateway/app.py).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from ..errors import NotFound, Unavailable
from ..leader import LeaseRecord
from .client import translate
from .permissions import Permission
from .resources import ResourceKind

LEASES = ResourceKind("coordination.k8s.io", "v1", "leases")
LEASE_PERMISSION = Permission(LEASES.api_group, LEASES.plural, frozenset({"get", "create", "update"}))
"""What an election does, in the Lease's namespace only (read, create once, update with a resourceVersion)."""

_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "DELETE": "delete"}
"""The RBAC verb of each method, for the permission a 403 names."""


class LeaseApi:
    """GET, POST, PUT and DELETE of Leases in one namespace, each bounded to `timeout` seconds."""

    def __init__(self, api: ApiClient, namespace: str, *, timeout: float = 5.0) -> None:
        self._api = api
        self.namespace = namespace
        self._timeout = timeout

    def _call_sync(self, method: str, name: str | None, body: Any) -> Any:
        path = LEASES.path(self.namespace, name)
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        _, url, headers, body, _ = self._api.param_serialize(method=method, resource_path=path, query_params=[],
                                                             header_params=headers, body=body,
                                                             auth_settings=["BearerToken"])
        try:
            response = self._api.call_api(method, url, header_params=headers, body=body,
                                          _request_timeout=self._timeout)
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"{method} {path}: {exc}") from exc
        data = response.read()
        if not 200 <= response.status <= 299:
            raise translate(ApiException(status=response.status, reason=response.reason,
                                         body=data.decode("utf-8", "replace")), f"{method} {path}",
                            f"{_VERBS[method]} leases.coordination.k8s.io in namespace {self.namespace}")
        return json.loads(data) if data else None

    async def _call(self, method: str, name: str | None = None, body: Any = None) -> Any:
        return await asyncio.to_thread(self._call_sync, method, name, body)

    async def get(self, name: str) -> dict[str, Any] | None:
        """The Lease, or None when there is none."""
        try:
            return dict(await self._call("GET", name))
        except NotFound:
            return None

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Lease as stored; Conflict when it exists."""
        return dict(await self._call("POST", None, body))

    async def replace(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Lease as stored; Conflict when body's resourceVersion is not the stored one, NotFound when gone."""
        return dict(await self._call("PUT", body["metadata"]["name"], body))

    async def delete(self, name: str) -> None:
        """Delete it; a Lease already gone is no error."""
        try:
            await self._call("DELETE", name)
        except NotFound:
            pass


def lease_body(name: str, spec: dict[str, Any], *, labels: dict[str, str] | None = None,
               annotations: dict[str, str] | None = None, resource_version: str | None = None) -> dict[str, Any]:
    """A Lease object; with `resource_version` a PUT that the API server refuses (409) if anyone wrote since."""
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    if annotations:
        metadata["annotations"] = annotations
    if resource_version is not None:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": f"{LEASES.api_group}/{LEASES.version}", "kind": "Lease", "metadata": metadata, "spec": spec}


def record_from_spec(spec: dict[str, Any] | None) -> LeaseRecord:
    spec = spec or {}
    try:
        duration = float(spec.get("leaseDurationSeconds") or 0)
        transitions = int(spec.get("leaseTransitions") or 0)
    except (TypeError, ValueError):  # a Lease someone else wrote: treat it as expired-style garbage
        duration, transitions = 0.0, 0
    return LeaseRecord(holder=str(spec.get("holderIdentity") or "")[:253], lease_duration=duration,
                       acquire_time=spec.get("acquireTime"), renew_time=spec.get("renewTime"),
                       transitions=transitions)


def spec_from_record(record: LeaseRecord) -> dict[str, Any]:
    return {
        "holderIdentity": record.holder or None,
        # The API takes whole seconds; rounding up never shortens what the holder was promised.
        "leaseDurationSeconds": max(1, math.ceil(record.lease_duration)),
        "acquireTime": record.acquire_time,
        "renewTime": record.renew_time,
        "leaseTransitions": record.transitions,
    }


class KubeLeaseStore:
    """One named Lease as `LeaseRecord`s (leader.py's `LeaseStore`), through a `LeaseApi`."""

    def __init__(self, api: LeaseApi, name: str) -> None:
        self.api = api
        self.name = name

    async def get(self) -> tuple[LeaseRecord, str]:
        body = await self.api.get(self.name)
        if body is None:
            raise NotFound(f"lease {self.api.namespace}/{self.name} not found")
        return record_from_spec(body.get("spec")), str(body["metadata"]["resourceVersion"])

    async def create(self, record: LeaseRecord) -> str:
        stored = await self.api.create(lease_body(self.name, spec_from_record(record)))
        return str(stored["metadata"]["resourceVersion"])

    async def update(self, record: LeaseRecord, version: str) -> str:
        stored = await self.api.replace(lease_body(self.name, spec_from_record(record), resource_version=version))
        return str(stored["metadata"]["resourceVersion"])
