"""The Grafana dashboard queries only metrics the tests scrape (tests/metric_names.py)."""

from __future__ import annotations

import json
import re

from tests.chart.chart import CHART

_PROMQL_WORDS = {"sum", "max", "min", "avg", "count", "by", "without", "rate", "irate", "increase", "le",
                 "histogram_quantile", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions, keywords, label names in
    `by (...)` or label matchers, or numbers."""
    stripped = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # grouping labels
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped):
        token, rest = match.group(0), stripped[match.end():].lstrip()
        if token in _PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(token)
    return names


def test_promql_metrics_finds_names_and_only_names() -> None:
    assert promql_metrics('sum by (namespace, pod) (rate(llamacpp:prompt_tokens_total{namespace=~"$ns"}[5m]))'
                          ) == {"llamacpp:prompt_tokens_total"}
    assert promql_metrics("histogram_quantile(0.95, sum by (le) (rate(a_bucket[5m]))) / b") == {"a_bucket", "b"}


def test_grafana_dashboard_is_valid_and_queries_only_metrics_the_tests_scrape() -> None:
    from tests.metric_names import SEEN

    text = (CHART / "files" / "dashboards" / "llama-operator.json").read_text()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert exprs and len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for expr in exprs:
        names = promql_metrics(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= SEEN, f"{expr!r} queries {sorted(names - SEEN)}, which no test scrapes"
        used |= names
    # the dashboard covers what the issue asks for: tokens/s, in flight and deferred, time per token, phases
    assert {"llamacpp:tokens_predicted_total", "llamacpp:requests_processing", "llamacpp:requests_deferred",
            "llamacpp:tokens_predicted_seconds_total", "llama_operator_objects"} <= used
    for panel in dashboard["panels"]:  # panels do not overlap on Grafana's 24-column grid
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24
