"""The sandbox's own small async Kubernetes API client and informers (aiohttp, JSON over HTTPS).

The node (kubelet, provisioner, Service proxies) talks to the real API server like the components it stands
in for: over HTTPS, trusting the control plane's CA, authenticated by a client certificate (the kubelet as
`system:node:sandbox`, so the Node authorizer decides what it may read). The operator's own client
(`llama_operator.kube`) is not reused: it is synchronous and scoped to the operator's permissions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

log = logging.getLogger("llama_operator.sandbox")

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason


def resource_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
                  subresource: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def client_ssl_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


class Api:
    """GET/LIST/WATCH/CREATE/PATCH/DELETE on one API server."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        connector = aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else False)
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Api used outside `async with`"
        return self._session

    async def request(self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
                      params: dict[str, str] | None = None) -> Any:
        url = self.base_url + path + (f"?{urlencode(params)}" if params else "")
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self.session.request(method, url, data=data, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=30)) as response:
            text = await response.text()
            if response.status >= 400:
                try:
                    status = json.loads(text)
                    message, reason = status.get("message", text), status.get("reason", "")
                except ValueError:
                    message, reason = text, ""
                raise ApiError(response.status, message, reason)
            return json.loads(text) if text else None

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str, params: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], str]:
        result = await self.request("GET", path, params=params)
        return list(result.get("items") or []), str(result.get("metadata", {}).get("resourceVersion") or "0")

    async def create(self, path: str, body: dict[str, Any], params: dict[str, str] | None = None) -> Any:
        return await self.request("POST", path, body=body, params=params)

    async def put(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request("PUT", path, body=body)

    async def patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status == 404:  # deleted meanwhile: nothing left to write to
                return None
            raise

    async def delete(self, path: str, body: dict[str, Any] | None = None) -> None:
        try:
            await self.request("DELETE", path, body=body)
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def watch(self, path: str, resource_version: str, params: dict[str, str] | None = None
                    ) -> AsyncIterator[dict[str, Any]]:
        query = {**(params or {}), "watch": "true", "resourceVersion": resource_version, "timeoutSeconds": "300",
                 "allowWatchBookmarks": "true"}
        url = f"{self.base_url}{path}?{urlencode(query)}"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
            if response.status >= 400:
                raise ApiError(response.status, await response.text())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)


class Informer:
    """A local cache of one resource kept current by list + watch; calls `on_change` after every change."""

    def __init__(self, api: Api, api_version: str, plural: str, on_change: Callable[[], None], *,
                 namespace: str | None = None, params: dict[str, str] | None = None) -> None:
        self.api = api
        self.path = resource_path(api_version, plural, namespace)
        self.plural = plural
        self.params = dict(params or {})
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self._on_change = on_change

    @staticmethod
    def key(obj: dict[str, Any]) -> tuple[str, str]:
        meta = obj.get("metadata") or {}
        return meta.get("namespace") or "", meta.get("name") or ""

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((namespace, name))

    def values(self) -> list[dict[str, Any]]:
        return list(self.objects.values())

    async def run(self) -> None:
        while True:
            try:
                items, version = await self.api.list(self.path, self.params)
                self.objects = {self.key(item): item for item in items}
                self.synced.set()
                self._on_change()
                while True:
                    expired = False
                    async for event in self.api.watch(self.path, version, self.params):
                        obj = event.get("object") or {}
                        kind = event.get("type")
                        if kind == "ERROR":
                            expired = True
                            break
                        version = str(obj.get("metadata", {}).get("resourceVersion") or version)
                        if kind == "BOOKMARK":
                            continue
                        if kind == "DELETED":
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
