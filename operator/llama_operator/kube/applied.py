"""Applied-tracking: what our last server-side apply of each object sent and what the API server stored.

Lets an unchanged desired object skip the apply, and recognises the watch echo of our own write.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

