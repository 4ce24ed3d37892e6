"""The only module that calls the Kubernetes API (besides kopf's own watching), and translates its errors.

The `kubernetes` client is synchronous, so every call runs in a worker thread (`asyncio.to_thread`) and
never blocks the event loop. Objects travel as plain dicts; writes of owned objects use server-side apply
with the `llama-operator` field manager, so repeated applies converge and repair drift.

Every (resource, verb) this module may use is declared in `PERMISSIONS`; a call outside it raises at once,
so the chart's RBAC (checked against `required_permissions()`) cannot silently fall behind the code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from .api.v1alpha1 import GROUP, VERSION
from .errors import Conflict, Forbidden, Invalid, KubeError, NotFound, Unavailable

__all__ = ["Conflict", "Forbidden", "Invalid", "KubeError", "NotFound", "Unavailable"]  # the error taxonomy lives
# in errors.py; callers keep importing the API errors from here, where they are raised.

log = logging.getLogger(__name__)

FIELD_MANAGER = "llama-operator"


@dataclass(frozen=True)
class ResourceKind:
    """A namespaced API resource: enough to build its URLs."""

    api_group: str
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The URL of the object, or of the collection (namespace None: across all namespaces)."""
        base = f"/api/{self.version}" if not self.api_group else f"/apis/{self.api_group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}" if namespace else f"{base}/{self.plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


DEPLOYMENTS = ResourceKind("apps", "v1", "deployments")
SERVICES = ResourceKind("", "v1", "services")
PERSISTENT_VOLUME_CLAIMS = ResourceKind("", "v1", "persistentvolumeclaims")
PODS = ResourceKind("", "v1", "pods")
SECRETS = ResourceKind("", "v1", "secrets")
CONFIG_MAPS = ResourceKind("", "v1", "configmaps")
LLAMA_MODELS = ResourceKind(GROUP, VERSION, "llamamodels")
LLAMA_SERVERS = ResourceKind(GROUP, VERSION, "llamaservers")
ENDPOINT_SLICES = ResourceKind("discovery.k8s.io", "v1", "endpointslices")
"""Read (watched) by the gateway: the ready addresses of each LlamaServer's Service."""
NODES = ResourceKind("", "v1", "nodes")
"""Cluster-scoped: read (cluster mode only) for the GPU memory labels the Fits condition compares with."""

KINDS_BY_API: Mapping[tuple[str, str], ResourceKind] = {
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("v1", "Service"): SERVICES,
    ("v1", "PersistentVolumeClaim"): PERSISTENT_VOLUME_CLAIMS,
    ("v1", "ConfigMap"): CONFIG_MAPS,
}


@dataclass(frozen=True)
class Permission:
    """One RBAC rule: verbs on a resource (`plural` or `plural/subresource`) of an API group."""

    api_group: str
    resource: str
    verbs: frozenset[str]
    cluster_scoped: bool = False
    """A cluster-scoped resource: granted by the chart only in cluster mode (a Role cannot grant it)."""


# What this module does, per resource. Reads of owned kinds also come from kopf's watches (see rbac.py).
# Server-side apply that creates an object is authorised as create as well as patch.
PERMISSIONS: tuple[Permission, ...] = (
    Permission("apps", "deployments", frozenset({"get", "list", "create", "patch", "delete"})),
    Permission("", "services", frozenset({"get", "list", "create", "patch", "delete"})),
    Permission("", "persistentvolumeclaims", frozenset({"get", "list", "create", "patch", "delete"})),
    Permission("", "pods", frozenset({"list"})),
    # The tail of a running fetcher's log: its progress lines become status.download while it downloads.
    Permission("", "pods/log", frozenset({"get"})),
    Permission("", "secrets", frozenset({"get"})),
    # A LlamaModel's trust ConfigMap (the sha256 recorded on first use, read by its pods' fetchers).
    Permission("", "configmaps", frozenset({"get", "create", "patch"})),
    Permission(GROUP, "llamamodels", frozenset({"get", "list"})),
    Permission(GROUP, "llamaservers", frozenset({"get", "list"})),
    Permission(GROUP, "llamamodels/status", frozenset({"patch"})),
    Permission(GROUP, "llamaservers/status", frozenset({"patch"})),
    # Owned objects carry blockOwnerDeletion: the OwnerReferencesPermissionEnforcement admission plugin
    # then requires update on the owner's finalizers subresource.
    Permission(GROUP, "llamamodels/finalizers", frozenset({"update"})),
    Permission(GROUP, "llamaservers/finalizers", frozenset({"update"})),
    # GPU memory per node (nvidia.com/gpu.memory) for the Fits condition; namespaced mode does without.
    Permission("", "nodes", frozenset({"list"}), cluster_scoped=True),
)


def _check_permission(kind: ResourceKind, verb: str, subresource: str | None = None,
                      permissions: tuple[Permission, ...] = PERMISSIONS) -> None:
    resource = kind.plural if subresource is None else f"{kind.plural}/{subresource}"
    for permission in permissions:
        if permission.api_group == kind.api_group and permission.resource == resource and verb in permission.verbs:
            return
    raise AssertionError(f"the declared permissions lack {verb} on {kind.api_group or 'core'}/{resource}")


def _translate(exc: ApiException, what: str, permission: str | None = None) -> KubeError:
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


def _rule(verb: str, kind: ResourceKind, namespace: str | None, subresource: str | None = None) -> str:
    """The RBAC rule a request needs, as a person reads it: `patch deployments.apps in namespace ml`."""
    resource = kind.plural + (f".{kind.api_group}" if kind.api_group else "")
    resource += f"/{subresource}" if subresource else ""
    where = f"in namespace {namespace}" if namespace else "cluster-wide"
    return f"{verb} {resource} {where}"


def load_api_client() -> k8s_client.ApiClient:
    """An API client for the in-cluster service account, else the current kubeconfig (KUBECONFIG)."""
    configuration = k8s_client.Configuration()
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


UNKNOWN = object()
"""`Kube.apply(live=UNKNOWN)`: the caller did not read the object, so the apply is always sent."""


def desired_digest(obj: Mapping[str, Any]) -> str:
    """sha256 of an object as built (canonical JSON): equal digests, equal desired objects."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Applied:
    """What our last server-side apply of one object sent (its digest) and what the API server stored."""

    digest: str
    uid: str | None
    generation: int | None
    resource_version: str | None

    def covers(self, digest: str, live: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
        """Whether applying `desired` again would change nothing in `live`.

        Same desired object, same object (uid), nobody touched its spec since (generation; resourceVersion for
        kinds without one — status writes by other controllers move only the resourceVersion), and the labels,
        annotations and owner references we set are still there. Anything else is drift and is applied.
        """
        meta, want = live.get("metadata") or {}, desired.get("metadata") or {}
        if digest != self.digest or meta.get("uid") != self.uid:
            return False
        if self.generation is not None:
            if meta.get("generation") != self.generation:
                return False
        elif meta.get("resourceVersion") != self.resource_version:
            return False
        for field in ("labels", "annotations"):
            have = meta.get(field) or {}
            if any(have.get(k) != v for k, v in (want.get(field) or {}).items()):
                return False
        return not want.get("ownerReferences") or meta.get("ownerReferences") == want["ownerReferences"]


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
            return await asyncio.to_thread(self._request_sync, method, path, **kwargs)
        except ApiException as exc:
            raise _translate(exc, f"{method} {path}", permission) from None

    async def apply(self, obj: Mapping[str, Any], *, live: Mapping[str, Any] | None | object = UNKNOWN
                    ) -> dict[str, Any]:
        """Server-side apply of an owned object (create or converge); returns the stored object.

        With `live` (the object as just read, None when absent), nothing is sent when the desired object hashes
        the same as at our last apply and `live` is still what that apply left (see `Applied.covers`): a pod
        event then costs a read, not a write.
        """
        kind = KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
        _check_permission(kind, "patch", permissions=self._permissions)
        _check_permission(kind, "create", permissions=self._permissions)
        meta = obj["metadata"]
        key = (kind.plural, meta["namespace"], meta["name"])
        digest = desired_digest(obj)
        record = self._applied.get(key)
        if isinstance(live, Mapping) and record is not None and record.covers(digest, live, obj):
            return dict(live)
        stored = await self._request(
            "PATCH",
            kind.path(meta["namespace"], meta["name"]),
            body=obj,
            query=[("fieldManager", self._field_manager), ("force", "true")],
            content_type="application/apply-patch+yaml",
            permission=_rule("patch", kind, meta["namespace"]) + " (and create)",
        )
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
        _check_permission(kind, "get", permissions=self._permissions)
        try:
            return await self._request("GET", kind.path(namespace, name), permission=_rule("get", kind, namespace))
        except NotFound:
            return None

    async def list(
        self, kind: ResourceKind, namespace: str | None, *, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        """Objects in one namespace, or in all (None)."""
        _check_permission(kind, "list", permissions=self._permissions)
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self._request("GET", kind.path(namespace), query=query,
                                     permission=_rule("list", kind, namespace))
        return list(result.get("items") or [])

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        _check_permission(kind, "delete", permissions=self._permissions)
        try:
            await self._request("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"},
                                permission=_rule("delete", kind, namespace))
        except NotFound:
            return False
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
        _check_permission(kind, "patch", "status", permissions=self._permissions)
        cleared = {key: None for key in previous or {} if key not in status}
        try:
            return await self._request(
                "PATCH",
                kind.path(namespace, name, "status"),
                body={"status": {**status, **cleared}},
                content_type="application/merge-patch+json",
                permission=_rule("patch", kind, namespace, "status"),
            )
        except NotFound:
            return None

    async def list_versioned(self, kind: ResourceKind, namespace: str | None, *, label_selector: str = ""
                             ) -> tuple[list[dict[str, Any]], str]:
        """Objects in one namespace (or all: None) and the list's resourceVersion, where a watch starts."""
        _check_permission(kind, "list", permissions=self._permissions)
        query = [("labelSelector", label_selector)] if label_selector else []
        result = await self._request("GET", kind.path(namespace), query=query,
                                     permission=_rule("list", kind, namespace))
        return list(result.get("items") or []), str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, kind: ResourceKind, namespace: str | None, resource_version: str, *,
                    label_selector: str = "", timeout_seconds: int = 300
                    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) events after `resource_version` until the API server ends the watch.

        Types: ADDED, MODIFIED, DELETED, BOOKMARK (an object with only metadata.resourceVersion). A watch whose
        version is too old raises Unavailable with status 410: list again. The stream is read in a daemon thread
        (the client is synchronous); leaving the iteration early shuts the connection down.
        """
        _check_permission(kind, "watch", permissions=self._permissions)
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(timeout_seconds))]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if label_selector:
            query.append(("labelSelector", label_selector))
        path = kind.path(namespace)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        done = object()
        holder: dict[str, Any] = {}

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def run() -> None:
            try:
                self._watch_sync(path, query, timeout_seconds, put, holder)
            except BaseException as exc:  # handed to the reader, which raises it
                put(exc)
            finally:
                put(done)

        threading.Thread(target=run, name=f"watch {path}", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    return
                if isinstance(item, ApiException):
                    raise _translate(item, f"GET {path} (watch)", _rule("watch", kind, namespace))
                if isinstance(item, BaseException):
                    raise item
                event_type, obj = item
                if event_type == "ERROR":
                    code = int(obj.get("code") or 0)
                    raise Unavailable(f"watch {path}: {obj.get('message')}", status=code)
                yield event_type, obj
        finally:
            response = holder.get("response")
            if response is not None:
                response.shutdown()  # unblocks the reading thread

    def _watch_sync(self, path: str, query: list[tuple[str, str]], timeout_seconds: int,
                    put: Any, holder: dict[str, Any]) -> None:
        _, url, headers, _, _ = self._api.param_serialize(
            method="GET", resource_path=path, query_params=query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"])
        try:
            response = self._api.call_api("GET", url, header_params=headers,
                                          _request_timeout=(10, timeout_seconds + 30))
        except urllib3.exceptions.HTTPError as exc:
            raise Unavailable(f"GET {path} (watch): {exc}") from exc
        raw = response.response
        holder["response"] = raw
        if not 200 <= raw.status <= 299:
            raise ApiException(status=raw.status, reason=raw.reason, body=raw.read().decode("utf-8", "replace"))
        pending = b""
        try:
            for chunk in raw.stream(amt=None, decode_content=False):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        event = json.loads(line)
                        put((event.get("type"), event.get("object") or {}))
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError):
            # Shut down by the reader, or the connection dropped: the caller watches again from its version.
            return
        finally:
            raw.release_conn()

    async def scale(self, kind: ResourceKind, namespace: str, name: str, replicas: int) -> dict[str, Any] | None:
        """Set spec.replicas through the scale subresource (what `kubectl scale` does); None when gone."""
        _check_permission(kind, "patch", "scale", permissions=self._permissions)
        try:
            return await self._request(
                "PATCH", kind.path(namespace, name, "scale"), body={"spec": {"replicas": replicas}},
                query=[("fieldManager", self._field_manager)], content_type="application/merge-patch+json",
                permission=_rule("patch", kind, namespace, "scale"))
        except NotFound:
            return None

    async def container_log(self, namespace: str, pod: str, container: str, *, tail_lines: int) -> str:
        """The last `tail_lines` lines a container logged (through the API server, from its kubelet)."""
        _check_permission(PODS, "get", "log")
        return await self._request(
            "GET", PODS.path(namespace, pod, "log"), text=True,
            query=[("container", container), ("tailLines", str(tail_lines))],
            permission=_rule("get", PODS, namespace, "log"))

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


def required_permissions(*, namespaced: bool = False) -> tuple[Permission, ...]:
    """What this module may call, for RBAC (kopf's own watches are derived from its registry by the chart test).

    `namespaced`: what a Role in each watched namespace must grant (no cluster-scoped resources)."""
    return tuple(p for p in PERMISSIONS if not (namespaced and p.cluster_scoped))
