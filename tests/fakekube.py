"""An in-memory stand-in for `llama_operator.kube.Kube`, for unit tests of the reconcile functions.

It stores plain dicts keyed by (plural, namespace, name), bumps `resourceVersion` on every write and
`metadata.generation` on spec writes (like the API server), records every call in `calls`, and raises an
injected exception when a test asks it to (`fail_on`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

from llama_operator.kube import KINDS_BY_API, ResourceKind

Key = tuple[str, str, str]


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str | None, str | None]] = []
        self.fail_on: dict[tuple[str, str | None], Callable[[], BaseException]] = {}
        """(method, object name or None for any) -> factory of the exception that call raises."""
        self._versions = itertools.count(100)
        self._applied: dict[Key, str] = {}

    # -- arranging ------------------------------------------------------------------------------------

    def put(self, kind: ResourceKind, body: Mapping[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta.setdefault("generation", 1)
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = str(next(self._versions))
        self.objects[(kind.plural, meta["namespace"], meta["name"])] = obj
        return obj

    def fail(self, method: str, name: str | None, exc: Callable[[], BaseException]) -> None:
        self.fail_on[(method, name)] = exc

    def _maybe_fail(self, method: str, name: str | None) -> None:
        self.calls.append((method, "", None, name))
        for key in ((method, name), (method, None)):
            if key in self.fail_on:
                raise self.fail_on[key]()

    def count(self, method: str, plural: str | None = None) -> int:
        return sum(1 for call in self.calls if call[0] == method and (plural is None or call[1] == plural))

    # -- the Kube interface ---------------------------------------------------------------------------

    async def get(self, kind: ResourceKind, namespace: str, name: str) -> dict[str, Any] | None:
        self._maybe_fail("get", name)
        self.calls[-1] = ("get", kind.plural, namespace, name)
        obj = self.objects.get((kind.plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def list(
        self, kind: ResourceKind, namespace: str | None, *, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        self._maybe_fail("list", None)
        self.calls[-1] = ("list", kind.plural, namespace, None)
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        out = []
        for (plural, ns, _), obj in sorted(self.objects.items()):
            labels = obj.get("metadata", {}).get("labels") or {}
            if plural == kind.plural and namespace in (None, ns) and all(labels.get(k) == v for k, v in wanted.items()):
                out.append(copy.deepcopy(obj))
        return out

    async def apply(self, obj: Mapping[str, Any], **_: Any) -> dict[str, Any]:
        meta = obj["metadata"]
        self._maybe_fail("apply", meta["name"])
        kind = KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
        self.calls[-1] = ("apply", kind.plural, meta["namespace"], meta["name"])
        key = (kind.plural, meta["namespace"], meta["name"])
        existing = self.objects.get(key)
        stored = copy.deepcopy(dict(obj))
        stored_meta = stored["metadata"]
        if existing is not None:
            stored["status"] = existing.get("status", {})
            stored_meta["uid"] = existing["metadata"]["uid"]
            changed = existing.get("spec") != stored.get("spec")
            stored_meta["generation"] = existing["metadata"]["generation"] + (1 if changed else 0)
            if not changed and existing["metadata"].get("labels") == stored_meta.get("labels"):
                stored_meta["resourceVersion"] = existing["metadata"]["resourceVersion"]
                self.objects[key] = stored
                self._applied[key] = stored_meta["resourceVersion"]
                return copy.deepcopy(stored)
        else:
            stored_meta["uid"] = f"uid-{meta['name']}"
            stored_meta["generation"] = 1
        stored_meta["resourceVersion"] = str(next(self._versions))
        self.objects[key] = stored
        self._applied[key] = stored_meta["resourceVersion"]
        return copy.deepcopy(stored)

    def is_own_write(self, plural: str, namespace: str, name: str, resource_version: str | None) -> bool:
        return resource_version is not None and self._applied.get((plural, namespace, name)) == resource_version

    async def delete(self, kind: ResourceKind, namespace: str, name: str) -> bool:
        self._maybe_fail("delete", name)
        return self.objects.pop((kind.plural, namespace, name), None) is not None

    async def patch_status(
        self, kind: ResourceKind, namespace: str, name: str, status: Mapping[str, Any], *,
        previous: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        self._maybe_fail("patch_status", name)
        self.calls[-1] = ("patch_status", kind.plural, namespace, name)
        obj = self.objects.get((kind.plural, namespace, name))
        if obj is None:
            return None
        obj["status"] = copy.deepcopy(dict(status))
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(obj)

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str:
        from llama_operator.kube import NotFound

        raise NotFound(f"Secret {namespace}/{name} not found", status=404)

    async def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        from llama_operator.kube import NotFound

        raise NotFound(f"Secret {namespace}/{name} not found", status=404)


class Events(list[tuple[str, str, str, str]]):
    """An EventRecorder that keeps (object name, type, reason, message)."""

    def __call__(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None:
        self.append((body["metadata"]["name"], type, reason, message))
