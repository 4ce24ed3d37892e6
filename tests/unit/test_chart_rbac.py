"""What the chart's RBAC is checked against (tests/chart/rbac.py) is not vacuous."""

from __future__ import annotations

from tests.chart.rbac import code_permissions, kopf_handler_grants


def test_kopf_derivation_sees_the_handlers() -> None:
    """Guards the registry reading above: if it found nothing, the kopf role check would be vacuous."""
    grants = kopf_handler_grants()
    assert grants[("llamacpp.dev", "llamaservers")] >= {"list", "watch"}
    assert grants[("llamacpp.dev", "llamamodels")] >= {"list", "watch", "patch"}


def test_code_permissions_are_kubes_and_namespaced_mode_drops_the_cluster_scoped() -> None:
    """What the RBAC test compares the chart with: the operator's declared permissions, Nodes only cluster-wide."""
    cluster, namespaced = code_permissions(), code_permissions(namespaced=True)
    assert cluster[("apps", "deployments")] >= {"get", "list", "create", "patch", "delete"}
    assert cluster[("", "nodes")] == {"list"} and ("", "nodes") not in namespaced
    assert set(cluster) - set(namespaced) == {("", "nodes")}
