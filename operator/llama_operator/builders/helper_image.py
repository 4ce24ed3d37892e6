"""Which operator image a server's running pods keep when the operator is upgraded.

The drain sidecar and the fetch init containers run the operator's own image (the chart's, passed as
LLAMA_OPERATOR_FETCHER_IMAGE), so every release renders every pod template with a new image: applied as it is, an
operator upgrade would roll every model pod with nothing else changed, which re-downloads the model into an
emptyDir cache and, on a one-replica GPU server (Recreate), stops it. Measured by tests/e2e/test_upgrade.py: the two
images were the only difference between 0.1.0's pod template and the next one's.

So a Deployment whose helper containers run another operator image keeps that image as long as the rest of its pod
template would not change: `with_live_helper_image` renders the desired Deployment with the live one's helper
image, and the reconcile applies that when a dry-run apply shows the pod template unchanged (reconcile/server.py).
Any other change of the template (a new flag, a new model revision, a podAnnotation) brings the new image with it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def _containers(deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    return [c for key in ("initContainers", "containers") for c in pod.get(key) or [] if isinstance(c, dict)]


def with_live_helper_image(desired: Mapping[str, Any], live: Mapping[str, Any] | None,
                           image: str) -> dict[str, Any] | None:
    """`desired` (a Deployment whose helper containers run the operator's `image`) with the image that `live`'s
    containers of the same names run instead, when they all run one other image; None otherwise (no live
    Deployment, the same image, no such container, or several images)."""
    helpers = {c["name"] for c in _containers(desired) if c.get("image") == image}
    if live is None or not helpers:
        return None
    running = {c.get("image") for c in _containers(live) if c.get("name") in helpers}
    if len(running) != 1:
        return None
    (old,) = running
    if not isinstance(old, str) or not old or old == image:
        return None
    pinned = copy.deepcopy(dict(desired))
    for container in _containers(pinned):
        if container.get("image") == image:
            container["image"] = old
    return pinned
