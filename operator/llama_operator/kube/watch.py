"""A watch's event stream: the synchronous client's chunked response read in a daemon thread, handed to asyncio.

Raises the client's `ApiException` for an error answer (`Kube.watch` translates it) and `Unavailable` for a
dropped connection or an ERROR event (status 410: the version is too old, list again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from ..errors import Unavailable


async def watch_events(api: k8s_client.ApiClient, path: str, query: list[tuple[str, str]], timeout_seconds: int
                       ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(type, object) events of the watch at `path` until the API server ends it; closing early shuts it down."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    done = object()
    holder: dict[str, Any] = {}

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed after the reader left: nobody wants the item
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def run() -> None:
        try:
            _read_watch(api, path, query, timeout_seconds, put, holder)
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
            # Unblocks the reading thread; when it has already released the connection there is nothing to unblock
            # (urllib3 raises RuntimeError then, which would hide the error this generator is ending with).
            with contextlib.suppress(RuntimeError):
                response.shutdown()


def _read_watch(api: k8s_client.ApiClient, path: str, query: list[tuple[str, str]], timeout_seconds: int,
                put: Callable[[Any], None], holder: dict[str, Any]) -> None:
    _, url, headers, _, _ = api.param_serialize(
        method="GET", resource_path=path, query_params=query, header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"])
    try:
        response = api.call_api("GET", url, header_params=headers, _request_timeout=(10, timeout_seconds + 30))
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
