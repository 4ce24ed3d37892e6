"""Download progress of a LlamaServer's pods: the newest progress line of each running fetcher, as status.

The fetcher has no API credentials (and needs none): it logs progress lines (`contract.progress_line`), and
the operator reads the tail of the running fetch container's log through the API server while the server is
Downloading, every `contract.PROGRESS_INTERVAL_SECONDS`. Reading a log is best effort: a pod whose log cannot
be read (no kubelet answer yet, RBAC without pods/log) simply has no progress to report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..api.v1beta1 import DownloadStatus, LlamaServerStatus
from ..contract import PROGRESS_INTERVAL_SECONDS, Progress, human, is_fetch_container, parse_progress
from ..errors import KubeError
from .context import Context

log = logging.getLogger(__name__)

_UNREADABLE: set[tuple[str, str, str]] = set()
"""Fetch containers whose log could not be read (warned about once)."""

TAIL_LINES = 20
"""Enough to hold the newest progress line among the fetcher's other lines (lock waits, retries)."""


def running_fetchers(pods: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(pod, container) of every fetch init container that is running now."""
    found = []
    for pod in pods:
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        for init in (pod.get("status") or {}).get("initContainerStatuses") or []:
            if is_fetch_container(init.get("name", "")) and "running" in (init.get("state") or {}):
                found.append((pod["metadata"]["name"], init["name"]))
    return found


def download_status(pod: str, progress: Progress) -> DownloadStatus:
    """The status of one fetch, for people (`summary`, also a printer column) and for tools (the numbers)."""
    percent = int(100 * progress.done / progress.total) if progress.total else 0
    summary = f"{percent}% of {human(progress.total)}, {progress.rate / 1e6:.1f} MB/s"
    return DownloadStatus(pod=pod, file=progress.file, bytes_done=progress.done, bytes_total=progress.total,
                          percent=percent, bytes_per_second=int(progress.rate), summary=summary)


async def observe_download(ctx: Context, namespace: str, pods: Sequence[Mapping[str, Any]]) -> DownloadStatus | None:
    """The progress of the least advanced running fetch among the pods (what the fleet waits for), if any."""
    reports = []
    for pod, container in running_fetchers(pods):
        try:
            tail = await ctx.kube.container_log(namespace, pod, container, tail_lines=TAIL_LINES)
        except KubeError as exc:
            if (namespace, pod, container) not in _UNREADABLE:  # said once per fetch, not every few seconds
                if len(_UNREADABLE) > 1024:  # pods come and go: forget old ones rather than grow forever
                    _UNREADABLE.clear()
                _UNREADABLE.add((namespace, pod, container))
                log.warning("No download progress for pod %s/%s (%s): %s", namespace, pod, container, exc)
            continue
        progress = parse_progress(tail)
        if progress is not None:
            reports.append(download_status(pod, progress))
    return min(reports, key=lambda d: d.percent or 0, default=None)


def poll_again(status: LlamaServerStatus | None) -> float | None:
    """While Downloading, reconcile again when the fetcher has logged its next progress line (its first one
    comes a progress interval after it started)."""
    return PROGRESS_INTERVAL_SECONDS if status is not None and status.phase == "Downloading" else None
