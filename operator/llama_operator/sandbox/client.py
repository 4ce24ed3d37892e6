"""The sandbox node's own small async Kubernetes API client and informers (aiohttp, JSON over HTTP).

The node plays kubelet and controllers, which on a real cluster are separate API clients; this one talks to
the API over HTTP like they do (never through the emulator's Python objects), so the node could run against
any API server that the kubeconfig names. The operator's own client (`llama_operator.kube`) is not reused:
it is synchronous and scoped to the operator's permissions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp

log = logging.getLogger("llama_operator.sandbox")

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class Api:
    """GET/LIST/WATCH/CREATE/PATCH/DELETE on one API server (plain HTTP, as the emulator serves)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Api used outside `async with`"
        return self._session

    async def _request(self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
                       params: dict[str, str] | None = None) -> Any:
        url = self.base_url + path + (f"?{urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self.session.request(method, url, data=data, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=30)) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except ValueError:
                    message = text
                raise ApiError(response.status, message)
            return json.loads(text) if text else None

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str) -> tuple[list[dict[str, Any]], str]:
        result = await self._request("GET", path)
        return list(result.get("items") or []), str(result.get("metadata", {}).get("resourceVersion") or "0")

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", path, body=body)

    async def patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return await self._request("PATCH", path, body=patch, content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status == 404:  # deleted meanwhile: nothing left to write to
                return None
            raise

    async def delete(self, path: str) -> None:
        try:
            await self._request("DELETE", path)
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def watch(self, path: str, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        params = {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": "300",
                  "allowWatchBookmarks": "false"}
        url = f"{self.base_url}{path}?{urlencode(params)}"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)


class Informer:
    """A local cache of one resource kept current by list + watch; calls `on_change` after every change."""

    def __init__(self, api: Api, api_version: str, plural: str, on_change: Callable[[], None]) -> None:
        self.api = api
        self.path = resource_path(api_version, plural)
        self.plural = plural
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self._on_change = on_change

    @staticmethod
    def key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return meta.get("namespace") or "", meta.get("name") or ""

    def put(self, obj: dict[str, Any]) -> None:
        """Record a write this process made, before its watch event arrives (avoids acting twice)."""
        self.objects[self.key(obj)] = obj

    def forget(self, obj: dict[str, Any]) -> None:
        self.objects.pop(self.key(obj), None)

    def values(self) -> list[dict[str, Any]]:
        return list(self.objects.values())

    async def run(self) -> None:
        while True:
            try:
                items, version = await self.api.list(self.path)
                self.objects = {self.key(item): item for item in items}
                self.synced.set()
                self._on_change()
                while True:
                    expired = False
                    async for event in self.api.watch(self.path, version):
                        obj = event.get("object") or {}
                        if event.get("type") == "ERROR":
                            expired = True
                            break
                        version = str(obj.get("metadata", {}).get("resourceVersion") or version)
                        if event.get("type") == "DELETED":
                            self.objects.pop(self.key(obj), None)
                        else:
                            self.objects[self.key(obj)] = obj
                        self._on_change()
                    if expired:
                        break  # relist
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, ApiError, ValueError, OSError) as exc:
                log.debug("watch %s: %s; relisting", self.plural, exc)
                await asyncio.sleep(1)
