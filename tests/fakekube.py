"""An in-memory API server behind the real `llama_operator.kube.Kube`, for unit tests of the reconcile code.

`FakeKube` is a `Kube` whose one HTTP method, `_request`, is answered from a dict keyed by
(plural, namespace, name) instead of a socket, so everything above it — server-side apply bookkeeping, the
skip of unchanged applies, own-write recognition, status patches, Secret reads, the permission checks — is
the product's own code. Like the API server it bumps `resourceVersion` on every real change (not on a
no-op apply) and `metadata.generation` on spec changes, answers a dry-run apply (`dryRun=All`, verb `dry_run`)
without storing it, records every request in `calls`, and raises an injected exception where a test asks
(`fail`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

from llama_operator.kube import Kube, NotFound, ResourceKind

Key = tuple[str, str, str]


def _parse(path: str) -> tuple[str, str | None, str | None, str | None]:
    """(plural, namespace, name, subresource) of an API path."""
    parts = path.strip("/").split("/")
    parts = parts[2:] if parts[0] == "api" else parts[3:]  # api/v1/... or apis/group/version/...
    namespace = None
    if parts[0] == "namespaces":
        namespace, parts = parts[1], parts[2:]
    plural = parts[0]
    name = parts[1] if len(parts) > 1 else None
    sub = parts[2] if len(parts) > 2 else None
    return plural, namespace, name, sub


class FakeKube(Kube):
    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no API client: _request never leaves the process
        self.objects: dict[Key, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str | None, str | None]] = []
        self.fail_on: dict[tuple[str, str | None], Callable[[], BaseException]] = {}
        """(verb, object name or None for any) -> factory of the exception that request raises."""
        self._versions = itertools.count(100)
        self.logs: dict[tuple[str, str, str], str] = {}
        """(namespace, pod, container) -> what `pods/log` answers (the kubelet's part)."""

    # -- arranging and asserting ----------------------------------------------------------------------

    def put(self, kind: ResourceKind, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store an object as a user (or another controller) would have created it."""
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("generation", 1)
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(kind.plural, meta["namespace"], meta["name"])] = obj
        return copy.deepcopy(obj)

    def edit(self, plural: str, name: str, change: Callable[[dict[str, Any]], None], *, spec: bool = True) -> None:
        """Change a stored object in place as someone else would (kubectl edit): bumps the versions."""
        obj = self.objects[(plural, "default", name)]
        change(obj)
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        if spec:
            obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1

    def fail(self, verb: str, name: str | None, exc: Callable[[], BaseException]) -> None:
        """Make `verb` (get, list, apply, dry_run, patch_status, delete) on `name` (None: any) raise `exc()`."""
        self.fail_on[(verb, name)] = exc

    def count(self, verb: str, plural: str | None = None) -> int:
        return sum(1 for call in self.calls if call[0] == verb and (plural is None or call[1] == plural))

    # -- the API server -------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, permission: str | None = None, body: Any = None,
                       query: list[tuple[str, str]] | None = None, content_type: str | None = None,
                       text: bool = False) -> Any:
        plural, namespace, name, sub = _parse(path)
        if sub == "log":
            self.calls.append(("log", plural, namespace, name))
            container = dict(query or [])["container"]
            if (namespace, name, container) not in self.logs:
                raise NotFound(f"GET {path}: no log", status=404)
            return self.logs[(namespace, name, container)]
        verb = {"GET": "get" if name else "list", "DELETE": "delete"}.get(method) or (
            "patch_status" if sub == "status" else "dry_run" if ("dryRun", "All") in (query or []) else "apply")
        self.calls.append((verb, plural, namespace, name))
        for key in ((verb, name), (verb, None)):
            if key in self.fail_on:
                raise self.fail_on[key]()
        if verb == "list":
            wanted = dict(part.split("=", 1) for part in dict(query or []).get("labelSelector", "").split(",") if part)
            items = [copy.deepcopy(obj) for (p, ns, _), obj in sorted(self.objects.items())
                     if p == plural and namespace in (None, ns)
                     and all((obj["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]
            return {"items": items}
        assert namespace is not None and name is not None
        key = (plural, namespace, name)
        stored = self.objects.get(key)
        if verb == "get":
            if stored is None:
                raise NotFound(f"GET {path}: not found", status=404)
            return copy.deepcopy(stored)
        if verb == "delete":
            if self.objects.pop(key, None) is None:
                raise NotFound(f"DELETE {path}: not found", status=404)
            return {}
        if verb == "patch_status":
            if stored is None:
                raise NotFound(f"PATCH {path}: not found", status=404)
            status = stored.setdefault("status", {})
            for field, value in body["status"].items():
                if value is None:
                    status.pop(field, None)
                else:
                    status[field] = copy.deepcopy(value)
            stored["metadata"]["resourceVersion"] = str(next(self._versions))
            return copy.deepcopy(stored)
        return self._server_side_apply(key, body, dry_run=verb == "dry_run")

    def _server_side_apply(self, key: Key, body: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        desired = copy.deepcopy(dict(body))
        meta = desired["metadata"]
        existing = self.objects.get(key)
        if existing is None:
            meta.update(uid=f"uid-{meta['name']}", generation=1, resourceVersion=str(next(self._versions)))
            if not dry_run:
                self.objects[key] = desired
            return copy.deepcopy(desired)
        old_meta = existing["metadata"]
        merged = {**existing, **{k: v for k, v in desired.items() if k != "metadata"}}
        merged["metadata"] = {**old_meta, **{k: v for k, v in meta.items()}}
        if merged == existing:
            return copy.deepcopy(existing)  # a no-op apply stores nothing and keeps the resourceVersion
        if merged.get("spec") != existing.get("spec"):
            merged["metadata"]["generation"] = old_meta.get("generation", 1) + 1
        merged["metadata"]["resourceVersion"] = str(next(self._versions))
        if not dry_run:  # dryRun=All: the object as it would be stored, nothing stored
            self.objects[key] = merged
        return copy.deepcopy(merged)


class Events(list[tuple[str, str, str, str]]):
    """An EventRecorder that keeps (object name, type, reason, message)."""

    def __call__(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
        self.append((body["metadata"]["name"], type, reason, message))
