"""The gateway as the chart installs it: off by default, its own RBAC, wired to the CLI, metrics, names."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.chart.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    assert_qualified_and_pinned,
    find,
    render,
    the_deployment,
    the_gateway,
)
from tests.chart.rbac import bound_grants


def test_gateway_is_off_by_default(helm: str) -> None:
    assert not [o for o in render(helm, "default") if "gateway" in o["metadata"]["name"]]


@pytest.mark.parametrize("scenario", ["gateway", "gateway-namespaced", "network-policy"])
def test_gateway_rbac_grants_exactly_what_the_gateway_uses(helm: str, scenario: str) -> None:
    from llama_operator.gateway.app import LEASE_PERMISSIONS, required_permissions

    values = SCENARIOS[scenario]
    autoscale = values["gateway"].get("autoscale", True)
    needs = {(p.api_group, p.resource, verb) for p in required_permissions(autoscale=autoscale) for verb in p.verbs}
    objects = render(helm, scenario)
    account = the_gateway(objects)["spec"]["template"]["spec"]["serviceAccountName"]
    assert account != f"{RELEASE}-llama-operator", "the gateway has an identity of its own"
    assert [a for a in find(objects, "ServiceAccount") if a["metadata"]["name"] == account]
    bound = bound_grants(objects, account)
    # The replicas' Leases: a Role in the release namespace only, and only when they scale.
    leases = {key: bound.pop(key) for key in list(bound) if key[2].endswith("-leases")}
    lease_needs = {(p.api_group, p.resource, verb) for p in LEASE_PERMISSIONS for verb in p.verbs}
    assert leases == ({("Role", NAMESPACE, f"{account}-leases"): lease_needs} if autoscale else {})
    namespaces = values.get("watchNamespaces")
    if namespaces:
        assert {kind for kind, _, _ in bound} == {"Role"} and {ns for _, ns, _ in bound} == set(namespaces)
    else:
        assert {kind for kind, _, _ in bound} == {"ClusterRole"}
    for key, granted in bound.items():
        assert granted == needs, f"{key}: extra {sorted(granted - needs)}, missing {sorted(needs - granted)}"
    # It reads no Secret (it holds no API keys), no pod, and never writes a LlamaServer beyond scale and status.
    assert {r for _, r, _ in needs} <= {"llamaservers", "endpointslices", "llamaservers/scale", "llamaservers/status"}
    assert ("llamacpp.dev", "llamaservers/scale", "patch") in needs if autoscale else not any(
        verb == "patch" for _, _, verb in needs)


@pytest.mark.parametrize("scenario", ["gateway", "gateway-namespaced"])
def test_gateway_deployment_is_wired_to_the_cli(helm: str, scenario: str) -> None:
    from llama_operator.cli import build_parser
    from llama_operator.gateway import config_from_args
    from llama_operator.gateway.app import Gateway, GatewayConfig

    values = SCENARIOS[scenario]
    objects = render(helm, scenario)
    deployment, operator = the_gateway(objects), the_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2, "two replicas: a lost pod cuts only its own streams"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert container["image"] == operator["spec"]["template"]["spec"]["containers"][0]["image"]
    assert_qualified_and_pinned(container["image"])

    # The chart's arguments mean to the CLI what the values say.
    args = build_parser().parse_args(container["args"])
    assert args.command == "gateway"
    config = config_from_args(args)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (config.listen, config.admin) == (f"0.0.0.0:{ports['http']}", f"0.0.0.0:{ports['metrics']}")
    assert config.namespaces == tuple(values.get("watchNamespaces", ()))
    assert config.autoscale == values["gateway"].get("autoscale", True)
    assert (config.hold_timeout, config.hold_queue, config.max_request_bytes, config.static) == (120, 100, 32 << 20, {})
    gateway = values["gateway"]
    assert (config.max_buffered_bytes, config.header_timeout, config.body_timeout, config.max_connections) == (
        256 << 20, 30, 60, gateway.get("maxConnections", 1024))
    assert config.cors_origins == tuple(gateway.get("cors", {}).get("allowedOrigins", ()))
    # With autoscale the replicas coordinate through Leases in the release namespace, each under its pod's name.
    assert (config.lease_namespace, config.lease_name) == (
        (NAMESPACE, deployment["metadata"]["name"]) if config.autoscale else ("", "llama-gateway"))
    (pod_name,) = [e for e in container["env"] if e["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # The probes ask for paths the gateway's admin port serves.
    served = {route.resource.canonical for route in Gateway(GatewayConfig(), None)._admin_app().router.routes()
              if route.resource is not None}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics" and container[probe]["httpGet"]["path"] in served
    # Stopping: preStop waits on the admin port while the endpoint goes, then the streams get drainSeconds.
    pre_stop = container["lifecycle"]["preStop"]["httpGet"]
    assert pre_stop["port"] == "metrics" and pre_stop["path"] in served
    assert config.drain_timeout == gateway.get("drainSeconds", 60)
    assert pod["terminationGracePeriodSeconds"] >= config.drain_delay + config.drain_timeout + 5

    # The gateway's Services select its pod and not the operator's, and the other way round.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    operator_labels = operator["spec"]["template"]["metadata"]["labels"]
    assert not deployment["spec"]["selector"]["matchLabels"].items() <= operator_labels.items()
    assert not operator["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {s["metadata"]["name"]: s for s in find(objects, "Service")}
    api = services[deployment["metadata"]["name"]]
    assert api["spec"]["selector"].items() <= labels.items()
    assert api["spec"]["type"] == values["gateway"].get("service", {}).get("type", "ClusterIP")
    assert api["metadata"].get("annotations") == values["gateway"].get("service", {}).get("annotations")
    assert [p["targetPort"] for p in api["spec"]["ports"]] == ["http"]
    for service in services.values():
        selects_gateway = service["spec"]["selector"].items() <= labels.items()
        assert selects_gateway != (service["spec"]["selector"].items() <= operator_labels.items())


def test_gateway_metrics_service_and_servicemonitor(helm: str) -> None:
    objects = render(helm, "gateway")
    deployment = the_gateway(objects)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (metrics_service,) = [s for s in find(objects, "Service") if s["metadata"]["name"].endswith("-gateway-metrics")]
    assert metrics_service["spec"]["selector"].items() <= labels.items()
    (port,) = metrics_service["spec"]["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == SCENARIOS["gateway"]["gateway"].get("metricsPort", 9090)
    (monitor,) = [m for m in find(objects, "ServiceMonitor") if m["metadata"]["name"].endswith("-gateway")]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert [s for s in find(objects, "Service") if selector.items() <= s["metadata"]["labels"].items()] == [
        metrics_service]
    assert not [s for s in find(render(helm, "gateway-namespaced"), "ServiceMonitor")]


def test_gateway_names_fit_kubernetes_limits(helm: str) -> None:
    long_release = "a-release-name-that-is-long-on-purpose-" + "x" * 14
    proc = subprocess.run([helm, "template", long_release, str(CHART), "-n", NAMESPACE, "--set",
                           "gateway.enabled=true"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = [obj["metadata"]["name"] for obj in filter(None, yaml.safe_load_all(proc.stdout))
             if obj["kind"] == "Service"]
    assert any(name.endswith("-gateway") for name in names) and any(name.endswith("-gateway-metrics") for name in names)
    for name in names:
        assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name), f"bad Service name {name!r}"


def test_gateway_body_limits_that_cannot_work_fail_the_install(helm: str) -> None:
    proc = subprocess.run([helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "gateway.enabled=true",
                           "--set", "gateway.maxRequestBytes=1073741824", "--set", "gateway.maxBufferedBytes=1048576"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "gateway.maxRequestBytes (1073741824) is larger than gateway.maxBufferedBytes (1048576)" in proc.stderr


@pytest.mark.parametrize("scenario", ["gateway", "network-policy"])
def test_gateway_replicas_have_a_disruption_budget_and_spread_across_nodes(helm: str, scenario: str) -> None:
    objects = render(helm, scenario)
    deployment = the_gateway(objects)
    selector = deployment["spec"]["selector"]["matchLabels"]
    (budget,) = [b for b in find(objects, "PodDisruptionBudget") if b["metadata"]["name"].endswith("-gateway")]
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    assert budget["metadata"]["namespace"] == NAMESPACE
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
                      "labelSelector": {"matchLabels": selector}}, "soft: never a pod pending for want of a node"


def test_gateway_replicas_are_a_value(helm: str) -> None:
    proc = subprocess.run([helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "gateway.enabled=true",
                           "--set", "gateway.replicas=3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    assert the_gateway(objects)["spec"]["replicas"] == 3
    proc = subprocess.run([helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "gateway.enabled=true",
                           "--set", "gateway.replicas=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "replicas" in proc.stderr


def test_the_admin_api_is_off_by_default_and_reads_its_token_from_the_secret(helm: str) -> None:
    from llama_operator.cli import build_parser

    (container,) = the_gateway(render(helm, "gateway"))["spec"]["template"]["spec"]["containers"]
    assert "--admin-token-file" not in container["args"]
    proc = subprocess.run([helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "gateway.enabled=true",
                           "--set", "gateway.adminTokenSecretRef.name=gateway-admin",
                           "--set", "gateway.adminTokenSecretRef.key=bearer"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pod = the_gateway([o for o in yaml.safe_load_all(proc.stdout) if o])["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    path = build_parser().parse_args(container["args"]).admin_token_file
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "admin-token"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "admin-token"]
    assert mount["readOnly"] and path == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    assert volume["secret"]["secretName"] == "gateway-admin" and volume["secret"]["items"][0]["key"] == "bearer"
    assert "gateway-admin" not in str(container.get("env")), "the token reaches the pod as a file only"
    bad = subprocess.run([helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "--set", "gateway.enabled=true",
                          "--set", "gateway.adminTokenSecretRef.name=Not_A_Name"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "adminTokenSecretRef" in bad.stderr
