"""The operator's two replicas in the chart: the election's settings reach leader.ElectionConfig, its one Lease is
granted by name in the release namespace only, the PDB and the soft spread, and bad election times are refused."""

from __future__ import annotations

import pytest

from llama_operator.kube.lease import LEASE_PERMISSION
from llama_operator.leader import ElectionConfig
from tests.chart.chart import NAMESPACE, RELEASE, SCENARIOS, env_of, find, render, run_helm, the_deployment
from tests.helm import CHART

FULLNAME = f"{RELEASE}-llama-operator"
LEASE = f"{FULLNAME}-leader"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_election_settings_reach_the_operator(helm: str, scenario: str) -> None:
    deployment = the_deployment(render(helm, scenario))
    env = env_of(deployment)
    config = ElectionConfig.from_env({**env, "POD_ID": "pod-a"})
    assert config is not None, "the chart always runs the election (a surge pod must wait as a standby)"
    assert (config.namespace, config.name) == (NAMESPACE, LEASE)
    assert (config.lease_duration, config.renew_deadline, config.retry_period) == (15, 10, 2)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (pod_id,) = [e for e in container["env"] if e["name"] == "POD_ID"]
    assert pod_id["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # each replica its own identity


@pytest.mark.parametrize("scenario", ["default", "namespaced", "gateway-namespaced"])
def test_the_lease_is_granted_by_name_in_the_release_namespace_only(helm: str, scenario: str) -> None:
    objects = render(helm, scenario)
    lease_rules = [(o["metadata"].get("namespace"), o["metadata"]["name"], rule)
                   for o in objects if o["kind"] in ("Role", "ClusterRole")
                   for rule in o["rules"] if "leases" in rule["resources"]]
    mine = [(ns, rule) for ns, name, rule in lease_rules if name == LEASE]
    assert {ns for ns, _ in mine} == {NAMESPACE}
    granted = {(verb, tuple(rule.get("resourceNames", ()))) for _, rule in mine for verb in rule["verbs"]}
    assert granted == {("create", ()), ("get", (LEASE,)), ("update", (LEASE,))}
    assert {verb for verb, _ in granted} == LEASE_PERMISSION.verbs  # what kube/lease.py calls, no more
    (binding,) = [b for b in find(objects, "RoleBinding") if b["metadata"]["name"] == LEASE]
    assert binding["metadata"]["namespace"] == NAMESPACE and binding["roleRef"]["name"] == LEASE
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    # No other role bound to the operator's account touches Leases.
    assert [name for _, name, _ in lease_rules if name == LEASE or not name.endswith("-gateway-leases")] == [
        LEASE] * len(mine)


def test_two_replicas_spread_softly_with_a_pdb(helm: str) -> None:
    objects = render(helm, "default")
    pod = the_deployment(objects)["spec"]["template"]["spec"]
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway" and spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["nodeTaintsPolicy"] == "Honor"
    selector = the_deployment(objects)["spec"]["selector"]["matchLabels"]
    assert spread["labelSelector"]["matchLabels"] == selector
    (pdb,) = [p for p in find(objects, "PodDisruptionBudget") if p["metadata"]["name"] == FULLNAME]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}


def test_one_replica_has_no_pdb_and_still_elects(helm: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, values={"replicas": 1})
    assert proc.returncode == 0, proc.stderr
    assert f"kind: PodDisruptionBudget\nmetadata:\n  name: {FULLNAME}\n" not in proc.stdout
    assert "LLAMA_OPERATOR_LEADER_ELECTION" in proc.stdout


@pytest.mark.parametrize("values, message", [
    ({"leaderElection": {"leaseDurationSeconds": 15, "renewDeadlineSeconds": 15, "retryPeriodSeconds": 2}},
     "retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"),
    ({"replicas": 0}, "replicas"),
    ({"leaderElection": {"retryPeriodSeconds": "2s"}}, "retryPeriodSeconds"),
])
def test_bad_election_values_are_refused(helm: str, values: dict[str, object], message: str) -> None:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
