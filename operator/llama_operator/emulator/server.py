"""The Kubernetes API emulator: a kmock.KubernetesEmulator subclass with real API-server semantics.

kmock supplies the HTTP server, the request log (`emulator.requests`), the versioned object store
(`emulator.objects[resource, namespace, name]` with history), Status-shaped error rendering and its
reaction DSL (`emulator['patch', kmock.resource('apps/v1/deployments')] << 500` still overrides any
request, for fault injection). This class replaces kmock's simplistic write path with the behaviour
kopf and the `kubernetes` client rely on:

- metadata stamping (uid, creationTimestamp, generation, one global increasing resourceVersion);
- the namespace taken from the URL; label and field selectors on list and watch;
- watch that subscribes before it snapshots, resumes from a numeric resourceVersion, honours
  `timeoutSeconds` and `sendInitialEvents`, and sends no bookmarks otherwise;
- PATCH by content type (merge, strategic-as-merge, JSON patch with 422 on a failed `test`, apply that
  creates missing objects), PUT, the status and scale subresources, resourceVersion preconditions;
- DELETE with finalizers, garbage collection through ownerReferences, namespace deletion;
- discovery built from the built-in table plus every stored CustomResourceDefinition.

It is a test double: no controllers run (a Deployment never gets status by itself), no admission, no
schema validation/defaulting/pruning. docs/testing-emulator.md lists what only a real cluster covers.

All state lives on one asyncio loop and every write is synchronous code between awaits, so writes are
atomic without locks; callers from other threads go through `EmulatorThread` (runner.py).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import dataclasses
import datetime
import json
import secrets
import string
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal.rendering import StreamingError  # kmock's marker for "headers already sent"

from . import patches, selectors
from .resources import (
    ResourceType,
    api_group,
    api_group_list,
    api_resource_list,
    builtin_resources,
    from_crd,
)

CRD_KEY = ("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES_KEY = ("", "v1", "namespaces")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# How many past events a watch can resume from; older resourceVersions get "410 Gone" like etcd compaction.
EVENT_LOG_SIZE = 10_000

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

ObjKey = tuple[tuple[str, str, str], str | None, str]


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {})


def _not_found(rt: ResourceType, name: str) -> kmock.KubernetesError:
    return _status_error(404, "NotFound", f'{rt.display} "{name}" not found',
                         name=name, group=rt.group, kind=rt.plural)


def _without_meta_and_status(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _get_path(obj: dict[str, Any], path: str) -> Any:
    node: Any = obj
    for part in path.strip(".").split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set_path(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = path.strip(".").split(".")
    node = obj
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


@dataclasses.dataclass(frozen=True)
class _Event:
    rv: int
    resource: tuple[str, str, str]
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclasses.dataclass(eq=False)
class _Watcher:
    resource: tuple[str, str, str]
    queue: collections.deque[_Event] = dataclasses.field(default_factory=collections.deque)
    wakeup: Any = None  # asyncio.Event, created on the emulator's loop


@dataclasses.dataclass(frozen=True)
class ParsedPath:
    """A resource URL split the way the API server does, including `/api/v1/namespaces[/x[/status]]`."""

    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_resource_path(path: str) -> ParsedPath | None:
    """Split a resource URL; None for discovery and other non-resource paths."""
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 3 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 4 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    # `/api/v1/namespaces/x/status` is the Namespace's own subresource, not a resource called "status".
    is_namespace_sub = group == "" and len(rest) == 3 and rest[0] == "namespaces" and rest[2] in (
        "status", "finalize")
    if rest[0] == "namespaces" and len(rest) >= 3 and not is_namespace_sub:
        namespace, rest = rest[1], rest[2:]
    return ParsedPath(
        group=group,
        version=version,
        plural=rest[0],
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """An in-memory Kubernetes API server for kopf and the `kubernetes` client (see module docstring)."""

    _catalog: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _log: collections.deque[_Event] = attrs.field(
        factory=lambda: collections.deque(maxlen=EVENT_LOG_SIZE), init=False)
    _watchers: list[_Watcher] = attrs.field(factory=list, init=False)
    # Last configuration applied per (object, field manager): what a re-apply may remove.
    _applied: dict[tuple[ObjKey, str], dict[str, Any]] = attrs.field(factory=dict, init=False)
    # kmock keeps every request for assertions and matches each new one against that whole log, so a
    # long-running emulator (the sandbox, benchmarks) slows down quadratically. A limit keeps the newest
    # requests only; tests that assert on the log leave it unlimited.
    request_log_limit: int | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # registers discovery + list/watch/fetch/create/update/delete
        # kmock has no action for PUT or for DELETE on a collection; route them by HTTP method.
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback[kmock.method.DELETE] << self._serve_delete_collection
        for rt in builtin_resources():
            self._catalog[rt.key] = rt
        for name in DEFAULT_NAMESPACES:
            self.create_object("v1", "namespaces", None, {"metadata": {"name": name}})

    # ------------------------------------------------------------------ request plumbing

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's own URL parser cannot read `/api/v1/namespaces` (the collection of the core
        # resource named "namespaces"), so requests are parsed here and then served as in kmock.
        body = await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = self._parse_request(raw_request, body)
            self._requests.append(request)
            try:
                return await self._handle(request)
            except StreamingError as exc:
                raw_response = exc.args[0]
                raise exc.__cause__ or exc from None
        except Exception as exc:
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    def _parse_request(self, raw: aiohttp.web.BaseRequest, body: bytes) -> kmock.Request:
        text = body.decode("utf-8", errors="replace")
        data: Any = None
        if body:
            try:
                data = json.loads(text)
            except ValueError:
                data = None  # e.g. YAML apply bodies: decoded by the PATCH handler
        query = dict(raw.query)
        parsed = parse_resource_path(raw.path)
        action: kmock.action | None = None
        resource: kmock.resource | None = None
        if parsed is not None:
            resource = kmock.resource(parsed.group, parsed.version, parsed.plural)
            if raw.method == "GET" and query.get("watch") in ("true", "1"):
                action = kmock.action.WATCH
            elif parsed.name is None:
                action = {"GET": kmock.action.LIST, "POST": kmock.action.CREATE}.get(raw.method)
            else:
                action = {"GET": kmock.action.FETCH, "PATCH": kmock.action.UPDATE,
                          "DELETE": kmock.action.DELETE}.get(raw.method)
        return kmock.Request(
            id=len(self._requests), raw_request=raw, url=raw.url, method=raw.method, params=query,
            headers=dict(raw.headers), cookies=dict(raw.cookies), body=body, text=text, data=data,
            action=action, resource=resource,
            namespace=parsed.namespace if parsed else None,
            name=parsed.name if parsed else None,
            subresource=parsed.subresource if parsed else None,
        )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle: it mutates kmock's store with plain dict merges before
        # routing. Here the writes happen in the fallback handlers below, after user reactions had
        # their chance to intercept (an intercepted write is therefore not stored).
        if self.request_log_limit is not None and len(self._requests) > self.request_log_limit:
            del self._requests[: len(self._requests) - self.request_log_limit]
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    def _resource(self, request: kmock.Request) -> ResourceType:
        res = request.resource
        rt = None if res is None else self._catalog.get((res.group or "", res.version or "", res.plural or ""))
        if rt is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        if rt.namespaced and request.name is not None and request.namespace is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return rt

    def _namespace(self, rt: ResourceType, namespace: str | None) -> str | None:
        return namespace if rt.namespaced else None

    # ------------------------------------------------------------------ discovery

    def _get_resources(self) -> list[kmock.resource]:
        return [kmock.resource(*key) for key in self._catalog]

    @property
    def catalog(self) -> list[ResourceType]:
        return list(self._catalog.values())

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if not isinstance(exc, kmock.KubernetesError):
            return await super()._render_error(exc)  # a bug here: a 500 with the traceback
        return aiohttp.web.json_response({
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": exc.status, "reason": exc.reason, "message": exc.message, "details": exc.details or {},
        }, status=exc.status)

    async def _serve_root(self, request: kmock.Request) -> kmock.Payload:
        paths = {"/api", "/api/v1", "/apis", "/version"}
        for rt in self._catalog.values():
            if rt.group:
                paths |= {f"/apis/{rt.group}", f"/apis/{rt.group}/{rt.version}"}
        return {"paths": sorted(paths)}

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        return {"major": "1", "minor": "34", "gitVersion": "v1.34.0-llama-emulator", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "",
                "compiler": "emulator", "platform": "linux/amd64"}

    async def _serve_api(self, request: kmock.Request) -> kmock.Payload:
        host = request.url.host or "127.0.0.1"
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{host}:{request.url.port}"}]}

    async def _serve_apis(self, request: kmock.Request) -> kmock.Payload:
        return api_group_list(self._catalog.values())

    async def _serve_group(self, request: kmock.Request) -> kmock.Payload:
        doc = api_group(self._catalog.values(), request.url.path.strip("/").split("/")[1])
        if doc is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return doc

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        parts = request.url.path.strip("/").split("/")
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        doc = api_resource_list(self._catalog.values(), group, version)
        if doc is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return doc

    def register_crd(self, crd: dict[str, Any]) -> None:
        """Serve the resources of a CRD body (what storing the CRD object does, without storing it)."""
        for rt in from_crd(crd):
            self._catalog[rt.key] = rt

    # ------------------------------------------------------------------ store primitives

    def _key(self, rt: ResourceType, namespace: str | None, name: str) -> Any:
        return (kmock.resource(*rt.key), self._namespace(rt, namespace), name)

    def _current(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = self._key(rt, namespace, name)
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else obj.last.raw

    def _iter(self, rt: ResourceType, namespace: str | None = None) -> Iterator[dict[str, Any]]:
        for (res, ns, _), obj in list(self._objects.items()):
            if (res.group, res.version, res.plural) != rt.key or obj.deleted:
                continue
            if namespace is not None and ns != namespace:
                continue
            yield obj.last.raw

    def _publish(self, rt: ResourceType, kind: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        event = _Event(rv=self._rv, resource=rt.key, type=kind, obj=obj, old=old)
        self._log.append(event)
        for watcher in self._watchers:
            if watcher.resource == rt.key:
                watcher.queue.append(event)
                if watcher.wakeup is not None:
                    watcher.wakeup.set()

    def _store(self, rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        """Write a new version (stamping resourceVersion) and notify watchers."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        meta = obj["metadata"]
        key = self._key(rt, meta.get("namespace"), meta["name"])
        if key in self._objects:
            self._objects[key].create(obj)  # appends a version to kmock's history
        else:
            self._objects[key] = obj
        self._publish(rt, "ADDED" if old is None else "MODIFIED", obj, old)
        if old is None and self._orphaned(obj):
            # The real garbage collector deletes an object created with owners that are already gone
            # (e.g. a controller that applied a child just as its owner was deleted).
            self._delete_object(rt, meta.get("namespace"), meta["name"], propagation="Background")
        return obj

    def _orphaned(self, obj: dict[str, Any]) -> bool:
        owner_uids = {ref.get("uid") for ref in obj["metadata"].get("ownerReferences") or []}
        if not owner_uids:
            return False
        live_uids = {other["metadata"].get("uid") for _, other in self._all_objects()}
        return not owner_uids & live_uids

    def _remove(self, rt: ResourceType, old: dict[str, Any]) -> dict[str, Any]:
        """Physically remove an object, then collect what it owned and what lived in it."""
        self._rv += 1
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        meta = gone["metadata"]
        key = self._key(rt, meta.get("namespace"), meta["name"])
        self._objects[key].delete()
        self._applied = {k: v for k, v in self._applied.items() if k[0] != self._plain_key(rt, meta)}
        self._publish(rt, "DELETED", gone, old)
        if rt.key == CRD_KEY:
            self._unregister_crd(gone)
        if rt.key == NAMESPACES_KEY:
            self._empty_namespace(meta["name"])
        self._collect_garbage(meta.get("uid"))
        return gone

    def _plain_key(self, rt: ResourceType, meta: dict[str, Any]) -> ObjKey:
        return (rt.key, self._namespace(rt, meta.get("namespace")), meta["name"])

    def _all_objects(self) -> list[tuple[ResourceType, dict[str, Any]]]:
        out = []
        for (res, _, _), obj in list(self._objects.items()):
            rt = self._catalog.get((res.group, res.version, res.plural))
            if rt is not None and not obj.deleted:
                out.append((rt, obj.last.raw))
        return out

    def _collect_garbage(self, owner_uid: str | None) -> None:
        # Background cascading deletion, done at once rather than by an asynchronous collector: an
        # object whose owners are all gone is deleted; one with a surviving owner loses the dangling
        # reference only.
        if not owner_uid:
            return
        live_uids = {obj["metadata"].get("uid") for _, obj in self._all_objects()}
        for rt, obj in self._all_objects():
            refs = obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                continue
            meta = obj["metadata"]
            remaining = [ref for ref in refs if ref.get("uid") != owner_uid and ref.get("uid") in live_uids]
            if remaining:
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = remaining
                self._store(rt, new, obj)
            else:
                self._delete_object(rt, meta.get("namespace"), meta["name"], propagation="Background")

    def _empty_namespace(self, namespace: str) -> None:
        for rt, obj in self._all_objects():
            if rt.namespaced and obj["metadata"].get("namespace") == namespace:
                meta = obj["metadata"]
                if self._current(rt, namespace, meta["name"]) is not None:
                    self._delete_object(rt, namespace, meta["name"], propagation="Background")

    def _unregister_crd(self, crd: dict[str, Any]) -> None:
        for rt in from_crd(crd):
            for obj in list(self._iter(rt)):
                self._remove(rt, obj)
            self._catalog.pop(rt.key, None)

    # ------------------------------------------------------------------ verbs (synchronous core)

    def _resolve(self, api_version: str, plural: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        rt = self._catalog.get((group, version, plural))
        if rt is None:
            raise _status_error(404, "NotFound", f"unknown resource {api_version} {plural}")
        return rt

    def create_object(self, api_version: str, plural: str, namespace: str | None, body: dict[str, Any]
               ) -> dict[str, Any]:
        """Create an object as POST does; the public entry point for tests and the HTTP handler."""
        return copy.deepcopy(self._create(self._resolve(api_version, plural), namespace, body))

    def _create(self, rt: ResourceType, namespace: str | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _status_error(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if namespace and body_ns and body_ns != namespace:
                raise _status_error(400, "BadRequest", "the namespace of the provided object does not "
                                    "match the namespace sent on the request")
            namespace = namespace or body_ns
            if not namespace:
                raise _status_error(400, "BadRequest", "a namespaced object needs a namespace")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise _status_error(422, "Invalid", f"{rt.kind} is invalid: metadata.name: Required value")
            alphabet = string.ascii_lowercase + string.digits
            meta["name"] = prefix + "".join(secrets.choice(alphabet) for _ in range(5))
        if self._current(rt, namespace, meta["name"]) is not None:
            raise _status_error(409, "AlreadyExists", f'{rt.display} "{meta["name"]}" already exists',
                                name=meta["name"], group=rt.group, kind=rt.plural)
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        if rt.status:
            obj.pop("status", None)  # status is written through its subresource only
        if rt.key == NAMESPACES_KEY:
            obj["status"] = {"phase": "Active"}
        if rt.key == CRD_KEY:
            names = obj.get("spec", {}).get("names", {})
            obj["status"] = {
                "acceptedNames": names,
                "storedVersions": [v["name"] for v in obj.get("spec", {}).get("versions", []) if v.get("storage")],
                "conditions": [
                    {"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": _now()}
                    for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))
                ],
            }
            self.register_crd(obj)
        return self._store(rt, obj, None)

    def _write(self, rt: ResourceType, old: dict[str, Any], new: Any, subresource: str | None
               ) -> dict[str, Any]:
        """Store `new` as the next version of `old` with the API server's update rules."""
        if not isinstance(new, dict):
            raise _status_error(422, "Invalid", "the result of the update is not a JSON object")
        meta_new = new.get("metadata") or {}
        expected_rv = meta_new.get("resourceVersion")
        if expected_rv and expected_rv != old["metadata"]["resourceVersion"]:
            raise _status_error(409, "Conflict", f'Operation cannot be fulfilled on {rt.display} '
                                f'"{old["metadata"]["name"]}": the object has been modified; please '
                                "apply your changes to the latest version and try again",
                                name=old["metadata"]["name"], group=rt.group, kind=rt.plural)
        if subresource == "status":
            result = copy.deepcopy(old)
            if new.get("status") is None:
                result.pop("status", None)
            else:
                result["status"] = copy.deepcopy(new["status"])
        else:
            result = copy.deepcopy(new)
            if rt.status:
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
                else:
                    result.pop("status", None)
            meta = result.setdefault("metadata", {})
            for field in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                          "deletionGracePeriodSeconds", "generation"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            if old["metadata"].get("deletionTimestamp"):
                # A deleting object may lose finalizers but never gain new ones.
                kept = set(old["metadata"].get("finalizers") or [])
                meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f in kept]
                if not meta["finalizers"]:
                    del meta["finalizers"]
            result["apiVersion"], result["kind"] = rt.api_version, rt.kind
            if _without_meta_and_status(result) != _without_meta_and_status(old):
                meta["generation"] = old["metadata"].get("generation", 1) + 1
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        result["metadata"].pop("managedFields", None)
        if result == old:
            return old  # a no-op write: no new resourceVersion, no watch event (as etcd does)
        if result["metadata"].get("deletionTimestamp") and not result["metadata"].get("finalizers"):
            self._store(rt, result, old)
            return self._remove(rt, result)
        if rt.key == CRD_KEY:
            self.register_crd(result)
        return self._store(rt, result, old)

    def _delete_object(self, rt: ResourceType, namespace: str | None, name: str, *,
                       propagation: str = "Background") -> dict[str, Any]:
        old = self._current(rt, namespace, name)
        if old is None:
            raise _not_found(rt, name)
        if propagation == "Orphan":
            self._orphan(old["metadata"].get("uid"))
        if old["metadata"].get("deletionTimestamp"):
            return old  # already being deleted: waits for its finalizers
        if old["metadata"].get("finalizers"):
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = _now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            return self._store(rt, new, old)
        return self._remove(rt, old)

    def _orphan(self, owner_uid: str | None) -> None:
        for rt, obj in self._all_objects():
            refs = obj["metadata"].get("ownerReferences") or []
            if owner_uid and any(ref.get("uid") == owner_uid for ref in refs):
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                if not new["metadata"]["ownerReferences"]:
                    del new["metadata"]["ownerReferences"]
                self._store(rt, new, obj)

    def _patch(self, rt: ResourceType, namespace: str | None, name: str, subresource: str | None,
               content_type: str, raw_body: bytes, params: dict[str, str]) -> dict[str, Any]:
        content_type = content_type.split(";")[0].strip().lower()
        try:
            patch: Any = (yaml.safe_load(raw_body) if content_type == APPLY_PATCH
                          else json.loads(raw_body or b"null"))
        except (ValueError, yaml.YAMLError) as exc:
            raise _status_error(400, "BadRequest", f"cannot parse the patch: {exc}") from exc
        old = self._current(rt, namespace, name)
        if content_type == APPLY_PATCH:
            return self._apply(rt, namespace, name, subresource, old, patch, params)
        if old is None:
            raise _not_found(rt, name)
        if subresource == "scale":
            return self._patch_scale(rt, old, content_type, patch)
        try:
            if content_type in (MERGE_PATCH, STRATEGIC_PATCH):
                new = patches.merge_patch(old, patch)
            elif content_type == JSON_PATCH:
                new = patches.json_patch(old, patch)
            else:
                raise _status_error(415, "UnsupportedMediaType",
                                    f"the body of the request was in an unknown format: {content_type}")
        except patches.PatchError as exc:
            raise _status_error(422, "Invalid", str(exc), name=name, group=rt.group, kind=rt.plural) from exc
        if content_type == JSON_PATCH:
            # A JSON patch may `test` the resourceVersion, but the result must not be read as a
            # precondition on a stale version: drop what the patch left there.
            new.setdefault("metadata", {})["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self._write(rt, old, new, subresource)

    def _apply(self, rt: ResourceType, namespace: str | None, name: str, subresource: str | None,
               old: dict[str, Any] | None, applied: Any, params: dict[str, str]) -> dict[str, Any]:
        manager = params.get("fieldManager")
        if not manager:
            raise _status_error(400, "BadRequest", "PatchOptions.meta.k8s.io is invalid: fieldManager: "
                                "Required value: is required for apply patch")
        if not isinstance(applied, dict):
            raise _status_error(400, "BadRequest", "an apply patch must be an object")
        applied_meta = applied.get("metadata") or {}
        if applied_meta.get("name") not in (None, name):
            raise _status_error(400, "BadRequest", "the name of the object does not match the URL")
        plain_key: ObjKey = (rt.key, self._namespace(rt, namespace), name)
        previous = self._applied.get((plain_key, manager))
        # Identity is not "applied": keep it out of what a later apply may remove.
        tracked = copy.deepcopy(applied)
        tracked_meta = tracked.setdefault("metadata", {})
        for field in ("name", "namespace", "resourceVersion", "uid"):
            tracked_meta.pop(field, None)
        tracked.pop("apiVersion", None)
        tracked.pop("kind", None)
        if old is None:
            if subresource is not None:
                raise _not_found(rt, name)
            body = copy.deepcopy(applied)
            body.setdefault("metadata", {})["name"] = name
            created = self._create(rt, namespace, body)
            self._applied[(plain_key, manager)] = tracked
            return created
        if subresource == "status":
            status_only = {"status": tracked.get("status") or {}}
            prev_status = None if previous is None else {"status": previous.get("status") or {}}
            new = patches.apply(old, status_only, prev_status)
        else:
            if rt.status:
                tracked.pop("status", None)
            new = patches.apply(old, tracked, None if previous is None else {
                k: v for k, v in previous.items() if not (rt.status and k == "status")})
        result = self._write(rt, old, new, subresource)
        merged = dict(previous or {})
        if subresource == "status":
            merged["status"] = tracked.get("status") or {}
        else:
            merged = {**{k: v for k, v in merged.items() if k == "status"}, **tracked}
        self._applied[(plain_key, manager)] = merged
        return result

    # ------------------------------------------------------------------ scale subresource

    def _scale_view(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        assert rt.scale is not None
        meta = obj["metadata"]
        selector: str | None = None
        if rt.scale_selector_from_spec:
            labels = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or None
        elif rt.scale.label_selector:
            selector = _get_path(obj, rt.scale.label_selector)
        status: dict[str, Any] = {"replicas": _get_path(obj, rt.scale.status_replicas) or 0}
        if selector:
            status["selector"] = selector
        return {
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                              "creationTimestamp") if k in meta},
            "spec": {"replicas": _get_path(obj, rt.scale.spec_replicas) or 0},
            "status": status,
        }

    def _write_scale(self, rt: ResourceType, old: dict[str, Any], scale: Any) -> dict[str, Any]:
        assert rt.scale is not None
        replicas = ((scale or {}).get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise _status_error(422, "Invalid", "spec.replicas must be a non-negative integer")
        new = copy.deepcopy(old)
        _set_path(new, rt.scale.spec_replicas, replicas)
        expected_rv = ((scale or {}).get("metadata") or {}).get("resourceVersion")
        if expected_rv:
            new["metadata"]["resourceVersion"] = expected_rv
        return self._scale_view(rt, self._write(rt, old, new, None))

    def _patch_scale(self, rt: ResourceType, old: dict[str, Any], content_type: str, patch: Any
                     ) -> dict[str, Any]:
        if rt.scale is None:
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        view = self._scale_view(rt, old)
        try:
            scaled = patches.json_patch(view, patch) if content_type == JSON_PATCH else patches.merge_patch(
                view, patch)
        except patches.PatchError as exc:
            raise _status_error(422, "Invalid", str(exc)) from exc
        scaled.setdefault("metadata", {})["resourceVersion"] = None
        return self._write_scale(rt, old, scaled)

    # ------------------------------------------------------------------ HTTP handlers

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        rt = self._resource(request)
        assert request.name is not None
        obj = self._current(rt, request.namespace, request.name)
        if obj is None:
            raise _not_found(rt, request.name)
        if request.subresource == "scale" and rt.scale is not None:
            return self._scale_view(rt, obj)
        if request.subresource not in (None, "status") or (request.subresource == "status" and not rt.status):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        return obj

    @staticmethod
    def _json_body(request: kmock.Request) -> Any:
        content_type = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if content_type not in ("application/json", "application/yaml", "*/*", ""):
            # kubectl sends built-in kinds as protobuf first; a 415 makes client-go retry as JSON.
            raise _status_error(415, "UnsupportedMediaType",
                                f"the body of the request was in an unknown format: {content_type}")
        if content_type == "application/yaml":
            return yaml.safe_load(request.body)
        return request.data

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        rt = self._resource(request)
        obj = self._create(rt, request.namespace, self._json_body(request))
        return kmock.Response(status=201, payload=obj)

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        rt = self._resource(request)
        assert request.name is not None
        if request.subresource not in (None, "status", "scale"):
            raise _status_error(404, "NotFound", "the server could not find the requested resource")
        content_type = request.headers.get("Content-Type", MERGE_PATCH)
        result = self._patch(rt, request.namespace, request.name, request.subresource, content_type,
                             request.body, dict(request.params))
        return result

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        rt = self._resource(request)
        if request.name is None or request.subresource not in (None, "status", "scale"):
            raise _status_error(405, "MethodNotAllowed", "the server does not allow this method")
        old = self._current(rt, request.namespace, request.name)
        if old is None:
            raise _not_found(rt, request.name)
        if request.subresource == "scale":
            if rt.scale is None:
                raise _status_error(404, "NotFound", "the server could not find the requested resource")
            return self._write_scale(rt, old, self._json_body(request))
        body = self._json_body(request)
        if not isinstance(body, dict):
            raise _status_error(400, "BadRequest", "the request body must be a JSON object")
        if (body.get("metadata") or {}).get("name") not in (None, request.name):
            raise _status_error(400, "BadRequest", "the name of the object does not match the URL")
        return self._write(rt, old, body, request.subresource)

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        rt = self._resource(request)
        assert request.name is not None
        options = request.data if isinstance(request.data, dict) else {}
        propagation = request.params.get("propagationPolicy") or options.get("propagationPolicy") or "Background"
        precondition = (options.get("preconditions") or {}).get("resourceVersion")
        current = self._current(rt, request.namespace, request.name)
        if current is not None and precondition and precondition != current["metadata"]["resourceVersion"]:
            raise _status_error(409, "Conflict", "the resourceVersion in the precondition does not match")
        return self._delete_object(rt, request.namespace, request.name, propagation=propagation)

    async def _serve_delete_collection(self, request: kmock.Request) -> kmock.Payload:
        if request.resource is None or request.name is not None:
            raise _status_error(405, "MethodNotAllowed", "the server does not allow this method")
        rt = self._resource(request)
        items = self._select(rt, request)
        for obj in items:
            meta = obj["metadata"]
            if self._current(rt, meta.get("namespace"), meta["name"]) is not None:
                self._delete_object(rt, meta.get("namespace"), meta["name"])
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success"}

    def _select(self, rt: ResourceType, request: kmock.Request) -> list[dict[str, Any]]:
        match = self._matcher(request)
        objs = [obj for obj in self._iter(rt, self._namespace(rt, request.namespace)) if match(obj)]
        return sorted(objs, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))

    def _matcher(self, request: kmock.Request) -> selectors.Predicate:
        try:
            labels = selectors.parse_label_selector(request.params.get("labelSelector"))
            fields = selectors.parse_field_selector(request.params.get("fieldSelector"))
        except selectors.SelectorError as exc:
            raise _status_error(400, "BadRequest", str(exc)) from exc
        name = request.name
        return lambda obj: labels(obj) and fields(obj) and (name is None or obj["metadata"]["name"] == name)

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        rt = self._resource(request)
        items = self._select(rt, request)
        meta: dict[str, Any] = {"resourceVersion": str(self._rv)}
        start = request.params.get("continue")
        if start:
            after = base64.urlsafe_b64decode(start.encode()).decode()
            items = [o for o in items if f'{o["metadata"].get("namespace") or ""}/{o["metadata"]["name"]}' > after]
        limit = int(request.params.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            items = items[:limit]
            last = items[-1]["metadata"]
            token = f'{last.get("namespace") or ""}/{last["name"]}'
            meta["continue"] = base64.urlsafe_b64encode(token.encode()).decode()
        return {"apiVersion": rt.api_version, "kind": f"{rt.kind}List", "metadata": meta, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> kmock.Payload:
        # kubectl refuses a watch stream without a JSON content type (kopf does not care).
        return kmock.Response(status=200, headers={"Content-Type": "application/json"},
                              payload=self._watch_stream(request))

    async def _watch_stream(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        rt = self._resource(request)
        match = self._matcher(request)
        namespace = self._namespace(rt, request.namespace)
        since = request.params.get("resourceVersion") or ""
        timeout = float(request.params.get("timeoutSeconds") or 0)
        initial_bookmark = request.params.get("sendInitialEvents") == "true"

        # Subscribe and snapshot in one synchronous block: no write can fall between the two.
        watcher = _Watcher(resource=rt.key, wakeup=asyncio.Event())
        self._watchers.append(watcher)
        backlog: list[dict[str, Any]] = []
        expired = False
        if since in ("", "0") or initial_bookmark:
            backlog = [{"type": "ADDED", "object": obj} for obj in self._select(rt, request)]
        else:
            try:
                since_rv = int(since)
            except ValueError as exc:
                self._watchers.remove(watcher)
                raise _status_error(400, "BadRequest", f"invalid resourceVersion: {since!r}") from exc
            oldest = self._log[0].rv if self._log else self._rv + 1
            if since_rv < oldest - 1 and since_rv < self._rv:
                expired = True
            else:
                watcher.queue.extend(e for e in self._log if e.rv > since_rv and e.resource == rt.key)
        current_rv = self._rv
        try:
            yield b""  # send the headers now: an idle watch is still an open stream
            if expired:
                yield {"type": "ERROR", "object": {
                    "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since} ({self._rv})"}}
                return
            for event in backlog:
                yield event
            if initial_bookmark:
                yield {"type": "BOOKMARK", "object": {
                    "apiVersion": rt.api_version, "kind": rt.kind, "metadata": {
                        "resourceVersion": str(current_rv),
                        "annotations": {"k8s.io/initial-events-end": "true"}}}}
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout > 0 else None

            def transport_closed() -> bool:
                # aiohttp does not cancel a handler whose client went away; poll the transport so
                # that an idle watch of a gone client ends instead of lingering.
                raw = request._raw_request
                return raw is None or raw.transport is None or raw.transport.is_closing()

            while True:
                while watcher.queue:
                    event = watcher.queue.popleft()
                    out = self._translate(event, match, namespace)
                    if out is not None:
                        yield out
                if deadline is not None and loop.time() >= deadline:
                    return
                if transport_closed():
                    return
                watcher.wakeup.clear()
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - loop.time()))
                try:
                    await asyncio.wait_for(watcher.wakeup.wait(), timeout=wait)
                except TimeoutError:
                    pass
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    @staticmethod
    def _translate(event: _Event, match: selectors.Predicate, namespace: str | None) -> dict[str, Any] | None:
        """The event a filtered watch sees: objects entering/leaving the selection are ADDED/DELETED."""
        def visible(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            return (namespace is None or obj["metadata"].get("namespace") == namespace) and match(obj)

        if event.type == "ADDED":
            return {"type": "ADDED", "object": event.obj} if visible(event.obj) else None
        if event.type == "DELETED":
            return {"type": "DELETED", "object": event.obj} if visible(event.obj) else None
        now, before = visible(event.obj), visible(event.old)
        if now and before:
            return {"type": "MODIFIED", "object": event.obj}
        if now:
            return {"type": "ADDED", "object": event.obj}
        if before:
            return {"type": "DELETED", "object": event.obj}
        return None

    # ------------------------------------------------------------------ direct access (on the loop)
    # Tests call these through EmulatorThread, which runs them on the emulator's loop. They apply the
    # same rules as the HTTP verbs (stamping, events, GC) but skip HTTP and the reaction DSL.

    def read_object(self, api_version: str, plural: str, namespace: str | None, name: str
                    ) -> dict[str, Any] | None:
        obj = self._current(self._resolve(api_version, plural), namespace, name)
        return None if obj is None else copy.deepcopy(obj)

    def list_objects(self, api_version: str, plural: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        rt = self._resolve(api_version, plural)
        match = selectors.parse_label_selector(label_selector)
        objs = [o for o in self._iter(rt, self._namespace(rt, namespace)) if match(o)]
        return copy.deepcopy(sorted(objs, key=lambda o: (o["metadata"].get("namespace") or "",
                                                         o["metadata"]["name"])))

    def patch_object(self, api_version: str, plural: str, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None, content_type: str = MERGE_PATCH) -> dict[str, Any]:
        rt = self._resolve(api_version, plural)
        raw = json.dumps(patch).encode()
        return copy.deepcopy(self._patch(rt, namespace, name, subresource, content_type, raw, {}))

    def delete_object(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any]:
        rt = self._resolve(api_version, plural)
        return copy.deepcopy(self._delete_object(rt, namespace, name))

    @property
    def resource_version(self) -> int:
        return self._rv
