"""The chart's NetworkPolicies (operator, gateway) and the peers it hands the operator for the llama-server pods'
policies (docs/security.md#network)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llama_operator.builders.network_policy import build_network_policy
from llama_operator.builders.objects import selector_labels
from llama_operator.config import Settings
from tests.chart.chart import CHART, NAMESPACE, RELEASE, env_of, find, render, run_helm, the_deployment, the_gateway
from tests.conftest import server

MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
API_SERVER = [{"ipBlock": {"cidr": "10.0.0.0/24"}}]
APPS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
ALL_ON: dict[str, Any] = {
    "gateway": {"enabled": True},
    "networkPolicy": {"operator": {"webhookFrom": API_SERVER}, "gateway": {"apiFrom": APPS},
                      "llamaServers": {"enabled": True, "extraFrom": APPS}},
}
ENV = "LLAMA_OPERATOR_SERVER_NETWORK_POLICY_FROM"


def _render(helm: str, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _policy(objects: list[dict[str, Any]], selects: Mapping[str, Any]) -> Mapping[str, Any]:
    (policy,) = [p for p in find(objects, "NetworkPolicy")
                 if p["spec"]["podSelector"]["matchLabels"] == dict(selects)]
    return policy


def _ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def _rules(policy: Mapping[str, Any]) -> dict[int, list[Any] | None]:
    """Port -> the peers admitted on it (None: any source)."""
    rules = {}
    for rule in policy["spec"]["ingress"]:
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP"
        rules[port["port"]] = rule.get("from")
    return rules


def test_by_default_the_operator_admits_the_webhook_from_anywhere_and_metrics_from_monitoring(helm: str) -> None:
    objects = render(helm, "default")
    deployment = the_deployment(objects)
    policy = _policy(objects, deployment["spec"]["selector"]["matchLabels"])
    kubernetes_validate.validate(dict(policy), "1.31.0", strict=True)
    assert policy["metadata"]["namespace"] == NAMESPACE and policy["spec"]["policyTypes"] == ["Ingress"]
    ports = _ports(deployment["spec"]["template"]["spec"]["containers"][0])
    # the liveness/readiness port has no rule: the kubelet calls from the node, which is always admitted
    assert _rules(policy) == {ports["webhook"]: None, ports["metrics"]: MONITORING}
    assert ENV not in env_of(deployment)  # llama-server pods: off by default
    assert len(find(objects, "NetworkPolicy")) == 1  # no gateway, no policy for it


def test_everything_on_narrows_each_port_and_hands_the_operator_its_peers(helm: str) -> None:
    objects = _render(helm, ALL_ON)
    for policy in find(objects, "NetworkPolicy"):
        kubernetes_validate.validate(policy, "1.31.0", strict=True)
    operator, gateway = the_deployment(objects), the_gateway(objects)
    operator_ports = _ports(operator["spec"]["template"]["spec"]["containers"][0])
    assert _rules(_policy(objects, operator["spec"]["selector"]["matchLabels"])) == {
        operator_ports["webhook"]: API_SERVER, operator_ports["metrics"]: MONITORING}
    gateway_ports = _ports(gateway["spec"]["template"]["spec"]["containers"][0])
    assert _rules(_policy(objects, gateway["spec"]["selector"]["matchLabels"])) == {
        gateway_ports["http"]: APPS, gateway_ports["metrics"]: MONITORING}

    # What the operator puts next to each LlamaServer, from the env the chart sets: own namespace, the operator's
    # and the gateway's pods (their labels, in the release namespace), monitoring, the extra peers.
    settings = Settings.from_env(env_of(operator))
    policy = build_network_policy(server(name="chat"), settings)
    assert policy is not None and policy["spec"]["podSelector"]["matchLabels"] == selector_labels("chat")
    release_ns = {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {"podSelector": {}},
        {"namespaceSelector": release_ns, "podSelector": {"matchLabels": operator["spec"]["selector"]["matchLabels"]}},
        {"namespaceSelector": release_ns, "podSelector": {"matchLabels": gateway["spec"]["selector"]["matchLabels"]}},
        *MONITORING, *APPS]
    for pod in (operator, gateway):  # the selectors select the pods the chart runs
        labels = pod["spec"]["template"]["metadata"]["labels"]
        assert any(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}).items() <= labels.items()
                   for peer in rule["from"][1:3])


@pytest.mark.parametrize("values", [
    {"networkPolicy": {"operator": {"enabled": False}}},
    {"gateway": {"enabled": True}, "networkPolicy": {"operator": {"enabled": False}, "gateway": {"enabled": False}}},
])
def test_each_policy_can_be_turned_off(helm: str, values: dict[str, Any]) -> None:
    assert find(_render(helm, values), "NetworkPolicy") == []


def test_without_a_gateway_the_llama_server_peers_name_only_the_operator(helm: str) -> None:
    values = {"networkPolicy": {"metricsFrom": [], "llamaServers": {"enabled": True}}}
    settings = Settings.from_env(env_of(the_deployment(_render(helm, values))))
    assert settings.server_network_policy_from is not None
    (operator_peer,) = settings.server_network_policy_from
    assert operator_peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "llama-operator"


def test_the_schema_refuses_a_peer_that_is_not_one(helm: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), values={
        "networkPolicy": {"llamaServers": {"enabled": True, "extraFrom": [{"namespace": "apps"}]}}})
    assert proc.returncode != 0 and "extraFrom" in proc.stderr
