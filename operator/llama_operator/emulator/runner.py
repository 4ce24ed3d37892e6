"""Runs the emulator on 127.0.0.1 in a thread of its own, and writes kubeconfigs that point at it.

Why a dedicated thread and event loop rather than the caller's loop: the `kubernetes` client is
synchronous. A test (or `llama-operator sandbox`) that calls it from the thread owning the emulator's
loop would block the very loop that must answer, and deadlock. With the emulator on its own loop,
sync tests, async tests and a kopf operator running in yet another thread (KopfRunner) all reach it over
HTTP the same way, and the emulator outlives any single test's event loop.

Direct access (`read`, `create`, `patch`, `delete`, `list`) runs the emulator's own write path on its
loop and waits for the result, so it is safe from any thread and keeps stamping/events/GC identical to
what the HTTP API does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import kmock
import yaml

from ..waiting import wait_for
from .server import MERGE_PATCH, Emulator

T = TypeVar("T")


class EmulatorThread:
    """An Emulator served over HTTP from a background thread (a context manager)."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 crds: list[dict[str, Any]] | None = None, request_log_limit: int | None = None) -> None:
        self.host = host
        self._request_log_limit = request_log_limit
        self._port = port
        self._crds = list(crds or [])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.emulator: Emulator | None = None
        self.port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorThread:
        self._thread = threading.Thread(target=self._main, name="k8s-emulator", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            raise RuntimeError("the API emulator failed to start") from self._error
        if not self._ready.is_set():
            raise RuntimeError("the API emulator did not start within 30s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced to start(); the thread has no other way to report
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.emulator = Emulator(request_log_limit=self._request_log_limit)
        for crd in self._crds:
            self.emulator.create_object("apiextensions.k8s.io/v1", "customresourcedefinitions", None, crd)
        async with self.emulator, kmock.Server(self.emulator, host=self.host, port=self._port) as server:
            self.port = server.port
            self._ready.set()
            await self._stop.wait()

    # ------------------------------------------------------------------ thread-safe direct access

    def call(self, fn: Callable[[Emulator], T]) -> T:
        """Run `fn(emulator)` on the emulator's loop and return its result (raises its errors)."""
        assert self._loop is not None and self.emulator is not None, "the emulator is not running"
        emulator = self.emulator

        async def run() -> T:
            return fn(emulator)

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout=30)

    async def acall(self, fn: Callable[[Emulator], T]) -> T:
        """`call` for async code: awaits without blocking the caller's loop."""
        return await asyncio.to_thread(self.call, fn)

    def read(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The current object, or None when absent."""
        return self.call(lambda e: e.read_object(api_version, plural, namespace, name))

    def list(self, api_version: str, plural: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        return self.call(lambda e: e.list_objects(api_version, plural, namespace, label_selector))

    def create(self, api_version: str, plural: str, namespace: str | None, body: dict[str, Any]
               ) -> dict[str, Any]:
        return self.call(lambda e: e.create_object(api_version, plural, namespace, body))

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None, content_type: str = MERGE_PATCH) -> dict[str, Any]:
        """Patch like the API does; `subresource="status"` is how tests play a controller's part."""
        return self.call(lambda e: e.patch_object(api_version, plural, namespace, name, patch,
                                                  subresource=subresource, content_type=content_type))

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any]:
        return self.call(lambda e: e.delete_object(api_version, plural, namespace, name))

    def wait_for(self, predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05,
                 message: str = "condition") -> T:
        """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
        return wait_for(predicate, timeout=timeout, interval=interval, message=message)


def kubeconfig(server_url: str, *, namespace: str = "default", context: str = "emulator") -> dict[str, Any]:
    """A kubeconfig for a plain-HTTP server with a dummy token (the emulator does not authenticate)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": server_url}}],
        "users": [{"name": context, "user": {"token": "emulator"}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": namespace}}],
        "current-context": context,
        "preferences": {},
    }


def write_kubeconfig(path: pathlib.Path, server_url: str, *, namespace: str = "default") -> pathlib.Path:
    path.write_text(yaml.safe_dump(kubeconfig(server_url, namespace=namespace), sort_keys=False))
    return path
