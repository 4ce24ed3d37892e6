"""Prometheus metrics of the operator itself (served on Settings.metrics_port at /metrics).

Besides the reconcile counters: how many LlamaModels and LlamaServers are in each phase (`PHASES`, fed by the
status writers and pruned by the resync), and the replicas and estimated memory of each LlamaServer. The
llama-server pods serve their own metrics (`llamacpp:*`, `--metrics`) on :8080/metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "llama_operator_reconciles_total", "Reconciles run, by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "llama_operator_reconcile_duration_seconds", "Time spent in one reconcile.", ["kind"]
)
OBJECTS = Gauge(
    "llama_operator_objects", "LlamaModels and LlamaServers by kind and phase.", ["kind", "phase"]
)
SERVER_REPLICAS = Gauge(
    "llama_operator_server_replicas", "Replicas of a LlamaServer: desired and ready.",
    ["namespace", "name", "state"],
)
SERVER_MEMORY = Gauge(
    "llama_operator_server_memory_estimate_bytes", "Estimated memory per replica of a LlamaServer "
    "(device: host or gpu, the largest GPU share).", ["namespace", "name", "device"],
)

DOWNLOAD_BYTES = Gauge(
    "llama_operator_download_bytes", "A LlamaServer's running model download (state: done or total), "
    "from its fetcher's progress lines; absent when nothing downloads.", ["namespace", "name", "file", "state"],
)
DOWNLOAD_RATE = Gauge(
    "llama_operator_download_bytes_per_second", "Transfer rate of a LlamaServer's running model download.",
    ["namespace", "name", "file"],
)

KINDS = ("LlamaModel", "LlamaServer")
PHASES_BY_KIND = {
    "LlamaModel": ("Pending", "Resolving", "Ready", "Failed"),
    "LlamaServer": ("Pending", "Downloading", "Loading", "Ready", "Degraded", "Failed"),
}


class PhaseTracker:
    """The last phase of every object, as the gauge `llama_operator_objects{kind,phase}` counts them.

    Every phase of a kind is exported (0 included), so a dashboard's series never disappear."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str, str], str] = {}
        # Counted as phases change, not recounted: a reconcile of one of thousands of servers costs O(1) here.
        self._counts = {kind: dict.fromkeys(phases, 0) for kind, phases in PHASES_BY_KIND.items()}
        for kind, phases in PHASES_BY_KIND.items():
            for phase in phases:
                OBJECTS.labels(kind, phase).set(0)

    def observe(self, kind: str, namespace: str, name: str, phase: str | None) -> None:
        key, phase = (kind, namespace, name), phase or "Pending"
        before = self._phases.get(key)
        if before == phase:
            return
        self._phases[key] = phase
        self._count(kind, before, -1)
        self._count(kind, phase, +1)

    def forget(self, kind: str, namespace: str, name: str) -> None:
        before = self._phases.pop((kind, namespace, name), None)
        if before is not None:
            self._count(kind, before, -1)
        if kind == "LlamaServer":
            for state in ("desired", "ready"):
                _remove(SERVER_REPLICAS, namespace, name, state)
            for device in ("host", "gpu"):
                _remove(SERVER_MEMORY, namespace, name, device)
            export_download(namespace, name, file=None, done=None, total=None, rate=None)

    def retain(self, kind: str, namespace: str | None, existing: Iterable[tuple[str, str]]) -> None:
        """Forget the objects of `kind` (in `namespace`, or everywhere) that no longer exist."""
        alive = set(existing)
        for key in [k for k in self._phases if k[0] == kind and (namespace is None or k[1] == namespace)]:
            if (key[1], key[2]) not in alive:
                self.forget(*key)

    def _count(self, kind: str, phase: str | None, change: int) -> None:
        if phase is None:
            return
        counts = self._counts.setdefault(kind, {})
        counts[phase] = counts.get(phase, 0) + change
        OBJECTS.labels(kind, phase).set(counts[phase])


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


_DOWNLOADING: dict[tuple[str, str], str] = {}
"""(namespace, server) -> the file whose download is exported, so a finished one can be removed."""


def export_download(namespace: str, name: str, *, file: str | None, done: int | None, total: int | None,
                    rate: int | None) -> None:
    """Export a server's running download, or (file None) remove its last one."""
    previous = _DOWNLOADING.pop((namespace, name), None)
    if previous is not None and previous != file:
        _remove(DOWNLOAD_RATE, namespace, name, previous)
        for state in ("done", "total"):
            _remove(DOWNLOAD_BYTES, namespace, name, previous, state)
    if file is None:
        return
    _DOWNLOADING[(namespace, name)] = file
    DOWNLOAD_BYTES.labels(namespace, name, file, "done").set(done or 0)
    DOWNLOAD_BYTES.labels(namespace, name, file, "total").set(total or 0)
    DOWNLOAD_RATE.labels(namespace, name, file).set(rate or 0)


def observe_server(namespace: str, name: str, *, desired: int, ready: int, host_bytes: int | None,
                   gpu_bytes: int | None) -> None:
    SERVER_REPLICAS.labels(namespace, name, "desired").set(desired)
    SERVER_REPLICAS.labels(namespace, name, "ready").set(ready)
    for device, value in (("host", host_bytes), ("gpu", gpu_bytes)):
        if value is None:
            _remove(SERVER_MEMORY, namespace, name, device)
        else:
            SERVER_MEMORY.labels(namespace, name, device).set(value)


PHASES = PhaseTracker()


def serve(port: int) -> None:
    start_http_server(port)
