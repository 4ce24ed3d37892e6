"""What every reconcile needs, bundled once at startup: the API caller, settings, and an event recorder."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Settings
from ..kube import Kube
from .watched import Watched


class EventRecorder(Protocol):
    """Posts Kubernetes Events about an object (kopf's poster in production, a list in unit tests)."""

    def __call__(self, body: Mapping[str, Any], *, type: str, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class Context:
    kube: Kube
    settings: Settings
    record_event: EventRecorder
    clock: Callable[[], float] = time.time
    """Wall-clock seconds (tests move it): when the periodic re-resolution of a model source is due."""
    watched: Watched = field(default_factory=Watched)
    """What the watches hold (reconcile/indexes.py fills it): the periodic loops read it instead of LISTing."""
