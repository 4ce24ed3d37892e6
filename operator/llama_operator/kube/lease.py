"""The operator's leader-election Lease on the API server: the `LeaseStore` leader.py elects over.

The Lease lives in the operator's own (release) namespace, not in the namespaces it watches, so its one grant is a
Role there (`LEASE_PERMISSION`, the source the chart's RBAC is checked against). Each request is bounded by a
short timeout: a hanging API server must not outlast the leader's renew deadline.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from ..leader import LeaseRecord
from .client import translate
from .permissions import Permission
from .resources import ResourceKind

LEASES = ResourceKind("coordination.k8s.io", "v1", "leases")
LEASE_PERMISSION = Permission(LEASES.api_group, LEASES.plural, frozenset({"get", "create", "update"}))
"""What the election does, in the release namespace only (read, create once, update with a resourceVersion)."""


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
    """One named Lease through the API client, every call in a worker thread with `timeout` seconds at most."""

    def __init__(self, api_client: k8s_client.ApiClient, namespace: str, name: str, *, timeout: float = 5.0) -> None:
        self._api = k8s_client.CoordinationV1Api(api_client)
        self._namespace = namespace
        self._name = name
        self._timeout = timeout

    async def _call(self, verb: str, fn: Any, *args: Any) -> Any:
        try:
            result = await asyncio.to_thread(fn, *args, _request_timeout=self._timeout)
        except ApiException as exc:
            raise translate(exc, f"{verb} lease {self._namespace}/{self._name}",
                            f"{verb} leases.coordination.k8s.io in namespace {self._namespace}") from None
        return self._api.api_client.sanitize_for_serialization(result)

    async def get(self) -> tuple[LeaseRecord, str]:
        body = await self._call("get", self._api.read_namespaced_lease, self._name, self._namespace)
        return record_from_spec(body.get("spec")), str(body["metadata"]["resourceVersion"])

    async def create(self, record: LeaseRecord) -> str:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self._name, "namespace": self._namespace},
                "spec": spec_from_record(record)}
        stored = await self._call("create", self._api.create_namespaced_lease, self._namespace, body)
        return str(stored["metadata"]["resourceVersion"])

    async def update(self, record: LeaseRecord, version: str) -> str:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self._name, "namespace": self._namespace, "resourceVersion": version},
                "spec": spec_from_record(record)}
        stored = await self._call("update", self._api.replace_namespaced_lease, self._name, self._namespace, body)
        return str(stored["metadata"]["resourceVersion"])
