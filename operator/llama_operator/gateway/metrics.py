"""Prometheus metrics of the gateway (its own registry, served on the admin port at /metrics).

Labels: `model` is the LlamaServer as `<namespace>/<name>` (bounded by the servers that exist, whatever clients
send: an unknown model is counted as `unknown`); `code` is the HTTP status the client got (499: the client went
away first). Names follow Prometheus conventions with the `llama_gateway_` prefix; docs/gateway.md lists them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("llama_gateway_requests_total", "Requests answered, by model and HTTP status.",
                   ["model", "code"], registry=REGISTRY)
TIME_TO_FIRST_BYTE = Histogram(
    "llama_gateway_time_to_first_byte_seconds",
    "From the request's arrival to the first response byte sent to the client (holding included).",
    ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
FAST_LANE = Counter("llama_gateway_fast_lane_requests_total",
                    "Requests answered by the fast lane, at the socket (also in llama_gateway_requests_total).",
                    ["model"], registry=REGISTRY)
REQUEST_DURATION = Histogram("llama_gateway_request_duration_seconds", "From arrival to the last byte sent.",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
IN_FLIGHT = Gauge("llama_gateway_in_flight_requests", "Requests being proxied to a replica now.", ["model"],
                  registry=REGISTRY)
QUEUE_LENGTH = Gauge("llama_gateway_queue_length", "Requests held waiting for a ready replica now.", ["model"],
                     registry=REGISTRY)
HOLD_SECONDS = Histogram("llama_gateway_hold_seconds",
                         "Time requests were held waiting for a ready replica, by outcome (ready, timeout, full).",
                         ["model", "outcome"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
UPSTREAM_RETRIES = Counter("llama_gateway_upstream_retries_total",
                           "Requests sent again to another replica after one failed before any byte was sent.",
                           ["model"], registry=REGISTRY)
SCALE_FROM_ZERO = Counter("llama_gateway_scale_from_zero_total", "Scale-ups from zero replicas.", ["model"],
                          registry=REGISTRY)
SCALES = Counter("llama_gateway_scale_total", "Writes of spec.replicas by the autoscaler, by direction.",
                 ["model", "direction"], registry=REGISTRY)
SCALE_ERRORS = Counter("llama_gateway_scale_errors_total", "Scale writes the API server refused or failed.",
                       ["model"], registry=REGISTRY)
DESIRED_REPLICAS = Gauge("llama_gateway_desired_replicas", "Replicas the autoscaler wants.", ["model"],
                         registry=REGISTRY)
READY_ENDPOINTS = Gauge("llama_gateway_ready_endpoints", "Ready replicas the gateway can send requests to.",
                        ["model"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter("llama_gateway_connections_refused_total",
                              "Client connections answered 503 and closed because --max-connections were open.",
                              registry=REGISTRY)
BODY_BYTES = Gauge("llama_gateway_request_body_bytes", "Bytes of request bodies held now (reserved from "
                   "--max-buffered-bytes).", registry=REGISTRY)
LEADER = Gauge("llama_gateway_leader", "1 while this replica holds the autoscaler's Lease (it decides and writes "
               "spec.replicas), else 0.", registry=REGISTRY)
PEERS = Gauge("llama_gateway_peers", "Other gateway replicas whose load report is live (renewed within its TTL).",
              registry=REGISTRY)
FLEET_ACTIVE = Gauge("llama_gateway_fleet_active_requests", "Requests in flight plus held over every live gateway "
                     "replica, as the autoscaler sums them (updated by the deciding replica).", ["model"],
                     registry=REGISTRY)
PEER_ACTIVE = Gauge("llama_gateway_peer_active_requests", "Requests in flight plus held that the deciding replica "
                    "counts from the other replicas' live reports (its own left out).", ["model"], registry=REGISTRY)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
