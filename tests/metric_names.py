"""The metric names the tests scrape and assert, and the only ones the Grafana dashboard may query.

tests/unit/test_metrics.py scrapes the operator's /metrics and asserts every OPERATOR name;
tests/runtime/test_metrics_scrape.py scrapes the real llama-server's /metrics and asserts every LLAMA_SERVER name;
tests/unit/test_dashboard.py checks that each query of the dashboard names one of them.
"""

OPERATOR = frozenset({
    "llama_operator_reconciles_total",
    "llama_operator_reconcile_duration_seconds_bucket",
    "llama_operator_reconcile_duration_seconds_count",
    "llama_operator_reconcile_duration_seconds_sum",
    "llama_operator_objects",
    "llama_operator_server_replicas",
    "llama_operator_server_memory_estimate_bytes",
})

LLAMA_SERVER = frozenset({
    "llamacpp:prompt_tokens_total",
    "llamacpp:prompt_seconds_total",
    "llamacpp:tokens_predicted_total",
    "llamacpp:tokens_predicted_seconds_total",
    "llamacpp:n_decode_total",
    "llamacpp:prompt_tokens_seconds",
    "llamacpp:predicted_tokens_seconds",
    "llamacpp:requests_processing",
    "llamacpp:requests_deferred",
    "llamacpp:n_busy_slots_per_decode",
})

SEEN = OPERATOR | LLAMA_SERVER
