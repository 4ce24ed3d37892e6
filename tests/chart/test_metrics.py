"""The operator's metrics Service and ServiceMonitor, the PodMonitor of llama-server pods, the dashboard ConfigMap."""

from __future__ import annotations

import json

from tests.chart.chart import CHART, env_of, find, render, the_deployment


def test_metrics_service_and_servicemonitor(helm: str) -> None:
    objects = render(helm, "servicemonitor")
    deployment = the_deployment(objects)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (metrics_service,) = [s for s in find(objects, "Service") if s["metadata"]["name"].endswith("-metrics")]
    (port,) = metrics_service["spec"]["ports"]
    (cport,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert str(cport["containerPort"]) == env_of(deployment)["LLAMA_OPERATOR_METRICS_PORT"]
    (monitor,) = find(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    # The ServiceMonitor selects the metrics Service and only it.
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in find(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert selected == [metrics_service]
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert not find(render(helm, "default"), "ServiceMonitor")
    assert not [s for s in find(render(helm, "minimal"), "Service") if s["metadata"]["name"].endswith("-metrics")]


def test_podmonitor_selects_the_llama_server_pods(helm: str) -> None:
    from llama_operator.builders.objects import server_labels
    from tests.conftest import server

    (monitor,) = find(render(helm, "monitoring"), "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    # what the operator's pods carry, and the container port llama-server listens on
    assert monitor["spec"]["selector"]["matchLabels"].items() <= server_labels(server()).items()
    assert monitor["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    (namespaced,) = find(render(helm, "monitoring-namespaced"), "PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    assert not find(render(helm, "default"), "PodMonitor")


def test_grafana_dashboard_configmap_holds_the_dashboard(helm: str) -> None:
    """The chart ships files/dashboards/llama-operator.json (checked in tests/unit/test_dashboard.py) as is."""
    dashboard = json.loads((CHART / "files" / "dashboards" / "llama-operator.json").read_text())
    (config_map,) = [c for c in find(render(helm, "monitoring"), "ConfigMap") if c["metadata"]["name"].endswith(
        "-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert json.loads(config_map["data"]["llama-operator.json"]) == dashboard
    assert not [c for c in find(render(helm, "default"), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
