"""List-and-watch loops that keep the routing and endpoint tables current (an informer, minus the cache).

Each loop lists (replacing that namespace's entries), then watches from the list's resourceVersion, following
bookmarks; a watch that ends is resumed from the last version seen, an expired version (410 Gone) is listed
again, and any other failure is retried with a capped backoff, so an API server restart heals by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..errors import KubeError
from ..kube import Kube, ResourceKind

log = logging.getLogger(__name__)

Replace = Callable[[Iterable[Mapping[str, Any]], str | None], None]
Upsert = Callable[[Mapping[str, Any]], None]
Remove = Callable[[Mapping[str, Any]], None]


async def list_and_watch(kube: Kube, kind: ResourceKind, namespace: str | None, *, replace: Replace,
                         upsert: Upsert, remove: Remove, synced: asyncio.Event, label_selector: str = "",
                         watch_seconds: int = 300) -> None:
    where = namespace or "all namespaces"
    backoff = 1.0
    while True:
        try:
            items, version = await kube.list_versioned(kind, namespace, label_selector=label_selector)
            replace(items, namespace)
            synced.set()
            backoff = 1.0
            while True:
                async for event_type, obj in kube.watch(kind, namespace, version, label_selector=label_selector,
                                                        timeout_seconds=watch_seconds):
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if event_type in ("ADDED", "MODIFIED"):
                        upsert(obj)
                    elif event_type == "DELETED":
                        remove(obj)
        except KubeError as exc:
            if exc.status == 410:
                log.info("watch of %s in %s expired: listing again", kind.plural, where)
                continue
            log.warning("watch of %s in %s failed (retrying in %.0fs): %s", kind.plural, where, backoff, exc)
        except (OSError, ValueError) as exc:
            log.warning("watch of %s in %s failed (retrying in %.0fs): %s", kind.plural, where, backoff, exc)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 30.0)
