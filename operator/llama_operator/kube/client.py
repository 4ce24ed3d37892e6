"""The only caller of the Kubernetes API (besides kopf's own watching): `Kube`, and the translation of its errors.

The `kubernetes` client is synchronous, so every call runs in a worker thread of its own pool (`API_THREADS`) and
never blocks the event loop. Objects travel as plain dicts; writes of owned objects use server-side apply
with the `llama-operator` field manager, so repeated applies converge and repair drift.

Every (resource, verb) a `Kube` may use is declared in its permissions (`permissions.PERMISSIONS` for the
operator); a call outside them raises at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import json
import os
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from ..errors import Conflict, Forbidden, Invalid, KubeError, NotFound, Unavailable
from .applied import UNKNOWN, Applied, desired_digest
from .permissions import PERMISSIONS, Permission, check_permission, rule
from .resources import KINDS_BY_API, PODS, SECRETS, ResourceKind
from .watch import watch_events

FIELD_MANAGER = "llama-operator"
API_THREADS = 32
"""API calls in flight at once per process, and the pooled connections behind them. The synchronous client holds
a thread per call; asyncio's default executor has os.cpu_count() + 4 threads (6 on 2 cores), which capped the
operator at 6 calls in flight whatever its reconcile concurrency (reconcile/runtime.py) allowed."""
ABSENT_MAX = 100_000
"""Objects remembered as absent (`Kube.known_absent`) at most: about 10 MiB."""
_API_POOL = ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")


def translate(exc: ApiException, what: str, permission: str | None = None) -> KubeError:
    """The ApiException as one of our errors; `permission` names the RBAC rule a 401/403 lacks."""
    status = int(exc.status or 0)
    message = what
    try:
        body = json.loads(exc.body or "{}")
        if isinstance(body, dict) and body.get("message"):
            message = f"{what}: {body['message']}"
    except (ValueError, TypeError):
        pass
    if status == 404:
        return NotFound(message, status=status)
    if status == 409:
        return Conflict(message, status=status)
    if status in (400, 422):
        return Invalid(message, status=status)
    if status in (401, 403):
        return Forbidden(message, status=status, permission=permission)
    return Unavailable(message, status=status)


def load_api_client() -> k8s_client.ApiClient:
    """An API client for the in-cluster service account, else the current kubeconfig (KUBECONFIG)."""
    configuration = k8s_client.Configuration()
    configuration.connection_pool_maxsize = API_THREADS
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        # The client reads KUBECONFIG once at import time; read it now so a changed environment counts.
        k8s_config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return k8s_client.ApiClient(configuration)


def connection_settings(api_client: k8s_client.ApiClient) -> dict[str, Any]:
    """The same endpoint and credentials as `api_client`, as kopf's ConnectionInfo keyword arguments.

    kopf watches with its own HTTP client; logging it in from our configuration means both speak to the
    same server with the same identity (in-cluster service account or the current kubeconfig context).
    """
    conf = api_client.configuration
    # The client keeps the token under "BearerToken" (kubeconfig and in-cluster alike; "authorization" in
    # older releases); read it the way the client itself does, or kopf would watch as system:anonymous.
    if conf.refresh_api_key_hook is not None:
        conf.refresh_api_key_hook(conf)
    header = conf.get_api_key_with_prefix("BearerToken", alias="authorization") or ""
    scheme, _, token = header.partition(" ")
    return {
        "server": conf.host,
        "ca_path": conf.ssl_ca_cert,
        "insecure": not conf.verify_ssl,
        "scheme": scheme or None,
        "token": token or None,
        "certificate_path": conf.cert_file,
        "private_key_path": conf.key_file,
    }


class Kube:
    """Async facade over the synchronous client; one instance per operator process."""

    def __init__(self, api_client: k8s_client.ApiClient, *, field_manager: str = FIELD_MANAGER,
                 permissions: tuple[Permission, ...] = PERMISSIONS) -> None:
        self._api = api_client
        self._field_manager = field_manager
        # What this process may call (the operator's PERMISSIONS, or the gateway's): RBAC is derived from it.
        self._permissions = permissions
        # What the last apply of each object sent and got back: recognises the watch echo of our own write, and
        # lets an unchanged desired object skip the apply (see `apply(live=...)`).
        self._applied: dict[tuple[str, str, str], Applied] = {}
        # Objects this process saw absent (a GET's 404, or its own delete) and has not applied since: removing an
        # object a plan no longer wants (reconcile/network.py) then costs no read on every reconcile. Only this
        # operator makes them and one process leads at a time, so nobody else can have created one since.
        self._absent: set[tuple[str, str, str]] = set()

    @property
    def api_client(self) -> k8s_client.ApiClient:
        return self._api

    def _request_sync(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
        text: bool = False,
    ) -> Any:
        # pods/log answers text/plain but accepts only `*/*` or API media types in Accept (as kubectl sends).
        headers = {"Accept": "*/*" if text else "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        _, url, headers, body, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(method, url, header_params=headers, body=body, _request_timeout=30)
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"{method} {path}: {exc}") from exc
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException(status=response.status, reason=response.reason, body=data.decode("utf-8", "replace"))
        if text:
            return data.decode("utf-8", "replace")
        return json.loads(data) if data else None

    async def _request(self, method: str, path: str, *, permission: str | None = None, **kwargs: Any) -> Any:
        try:
            call = functools.partial(self._request_sync, method, path, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(
                _API_POOL, contextvars.copy_context().run, call)
        except ApiException as exc:
            raise translate(exc, f"{method} {path}", permission) from None

    def covers(self, obj: Mapping[str, Any], live: Mapping[str, Any]) -> bool:
        """Whether our last apply of this object sent exactly `obj` and `live` is still what it left (an apply of
        `obj` with `live` would send nothing)."""
        kind = KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
        record = self._applied.get((kind.plural, obj["metadata"]["namespace"], obj["metadata"]["name"]))
        return record is not None and record.covers(desired_digest(obj), live, obj)

    async def apply(self, obj: Mapping[str, Any], *, live: Mapping[str, Any] | None | object = UNKNOWN,
                    dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply of an owned object (create or converge); returns the stored object.

        With `live` (the object as just read, None when absent), nothing is sent when the desired object hashes
        the same as at our last apply and `live` is still what that apply left (see `Applied.covers`): a pod
        event then costs a read, not a write. `dry_run`: the object as the API server would store it, stored
        nothing and remembered nothing.
        """
        kind = KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
        check_permission(kind, "patch", permissions=self._permissions)
        check_permission(kind, "create", permissions=self._permissions)
        meta = obj["metadata"]
        key = (kind.plural, meta["namespace"], meta["name"])
        if not dry_run:
            self._absent.discard(key)
            if isinstance(live, Mapping) and self.covers(obj, live):
                return dict(live)
        query = [("fieldManager", self._field_manager), ("force", "true")]
        stored = await self._request(
            "PATCH",
            kind.path(meta["namespace"], meta["name"]),
            body=obj,
            query=[*query, ("dryRun", "All")] if dry_run else query,
            content_type="application/apply-patch+yaml",
            permission=rule("patch", kind, meta["namespace"]) + " (and create)",
        )
        if dry_run:
            return dict(stored or {})
        digest = desired_digest(obj)
        stored_meta = (stored or {}).get("metadata", {})
        self._applied[key] = Applied(digest, stored_meta.get("uid"), stored_meta.get("generation"),
                                     stored_meta.get("resourceVersion"))
        return stored

    def is_own_write(self, plural: str, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether this object version is exactly what our last apply stored (nothing to react to)."""
        applied = self._applied.get((plural, namespace, name))
        return resource_version is not None and applied is not None and applied.resource_version == resource_version

    async def get(self, kind: ResourceKind, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        check_permission(kind, "get", permissions=self._permissions)
        try:
            found = await self._request("GET", kind.path(namespace, name), permission=rule("get", kind, namespace))
        except NotFound:
            self._seen_absent((kind.plural, namespace, name))
            return None
        self._absent.discard((kind.plural, namespace, name))
        return found

    def _seen_absent(self, key: tuple[str, str, str]) -> None:
        if len(self._absent) >= ABSENT_MAX:  # names of deleted servers pile up: start over rather than grow
            self._absent.clear()
        self._absent.add(key)

    def known_absent(self, kind: ResourceKind, namespace: str, name: str) -> bool:
        """Whether this process saw the object absent and has not applied it since (see `_absent`)."""
        return (kind.plural, namespace, name) in self._absent

    async def list(
        self, kind: ResourceKind, namespace: str | None, *, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        """Objects in one namespace, or in all (None)."""
        check_permission(kind, "list", permissions=self._permissions)
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self._request("GET", kind.path(namespace), query=query,
                                     permission=rule("list", kind, namespace))
        return list(result.get("items") or [])

    async def serves(self, kind: ResourceKind) -> bool:
        """Whether the API server serves this resource: its group/version's discovery document lists it (every
        authenticated client may read discovery: no RBAC rule)."""
        group_version = f"/apis/{kind.api_group}/{kind.version}" if kind.api_group else f"/api/{kind.version}"
        try:
            found = await self._request("GET", group_version)
        except NotFound:
            return False
        return any(resource.get("name") == kind.plural for resource in (found or {}).get("resources") or [])

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        check_permission(kind, "delete", permissions=self._permissions)
        try:
            await self._request("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"},
                                permission=rule("delete", kind, namespace))
        except NotFound:
            self._seen_absent((kind.plural, namespace, name))
            return False
        self._seen_absent((kind.plural, namespace, name))
        return True

    async def patch_status(
        self,
        kind: ResourceKind,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        previous: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None when the object is gone.

        With `previous` (the status as last read), the result is exactly `status`: top-level keys that
        `previous` has and `status` lacks are cleared, not left stale.
        """
        check_permission(kind, "patch", "status", permissions=self._permissions)
        cleared = {key: None for key in previous or {} if key not in status}
        try:
            return await self._request(
                "PATCH",
                kind.path(namespace, name, "status"),
                body={"status": {**status, **cleared}},
                content_type="application/merge-patch+json",
                permission=rule("patch", kind, namespace, "status"),
            )
        except NotFound:
            return None

    async def list_versioned(self, kind: ResourceKind, namespace: str | None, *, label_selector: str = ""
                             ) -> tuple[list[dict[str, Any]], str]:
        """Objects in one namespace (or all: None) and the list's resourceVersion, where a watch starts."""
        check_permission(kind, "list", permissions=self._permissions)
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self._request("GET", kind.path(namespace), query=query,
                                     permission=rule("list", kind, namespace))
        return list(result.get("items") or []), str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, kind: ResourceKind, namespace: str | None, resource_version: str, *,
                    label_selector: str = "", timeout_seconds: int = 300
                    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) events after `resource_version` until the API server ends the watch.

        Types: ADDED, MODIFIED, DELETED, BOOKMARK (an object with only metadata.resourceVersion). A watch whose
        version is too old raises Unavailable with status 410: list again. The stream is read in a daemon thread
        (the client is synchronous); leaving the iteration early shuts the connection down.
        """
        check_permission(kind, "watch", permissions=self._permissions)
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_seconds))]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if label_selector:
            query.append(("labelSelector", label_selector))
        path = kind.path(namespace)
        async with aclosing(watch_events(self._api, path, query, timeout_seconds)) as events:
            try:
                async for event in events:
                    yield event
            except ApiException as exc:
                raise translate(exc, f"GET {path} (watch)", rule("watch", kind, namespace)) from None

    async def scale(self, kind: ResourceKind, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
        """Set spec.replicas through the scale subresource (what `kubectl scale` does); None when gone."""
        check_permission(kind, "patch", "scale", permissions=self._permissions)
        try:
            return await self._request(
                "PATCH", kind.path(namespace, name, "scale"), body={"spec": {"replicas": replicas}},
                query=[("fieldManager", self._field_manager)], content_type="application/merge-patch+json",
                permission=rule("patch", kind, namespace, "scale"))
        except NotFound:
            return None

    async def container_log(self, namespace: str, pod: str, container: str, *, tail_lines: int,
                            limit_bytes: int = 64 * 1024) -> str:
        """The last `tail_lines` lines a container logged (through the API server, from its kubelet), at most
        `limit_bytes` of them: a line may be as long as the container wants."""
        check_permission(PODS, "get", "log")
        return await self._request(
            "GET", PODS.path(namespace, pod, "log"), text=True,
            query=[("container", container), ("tailLines", str(tail_lines)), ("limitBytes", str(limit_bytes))],
            permission=rule("get", PODS, namespace, "log"))

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        """One key of a Secret, decoded. Raises NotFound naming the Secret or the key (never the value)."""
        secret = await self.get(SECRETS, namespace, name)
        if secret is None:
            raise NotFound(f"Secret {namespace}/{name} not found", status=404)
        data = secret.get("data") or {}
        if key not in data:
            raise NotFound(f"Secret {namespace}/{name} has no key {key!r}", status=404)
        return base64.b64decode(data[key]).decode("utf-8")

    async def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        """Every key of a Secret, decoded."""
        secret = await self.get(SECRETS, namespace, name)
        if secret is None:
            raise NotFound(f"Secret {namespace}/{name} not found", status=404)
        return {k: base64.b64decode(v).decode("utf-8") for k, v in (secret.get("data") or {}).items()}

