"""Prometheus metrics of the operator itself (served on Settings.metrics_port at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter(
    "llama_operator_reconciles_total", "Reconciles run, by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "llama_operator_reconcile_duration_seconds", "Time spent in one reconcile.", ["kind"]
)


def serve(port: int) -> None:
    start_http_server(port)
