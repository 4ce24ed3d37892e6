"""The chart's RBAC grants exactly what the code uses (tests/chart/rbac.py), or nothing when left to the user."""

from __future__ import annotations

import pytest

from tests.chart.chart import RELEASE, SCENARIOS, find, render
from tests.chart.rbac import (
    KOPF_FRAMEWORK,
    KOPF_FRAMEWORK_CLUSTER,
    as_triples,
    bound_grants,
    code_permissions,
    kopf_handler_grants,
)


@pytest.mark.parametrize("scenario", ["default", "namespaced", "cert-manager-issuer", "gateway", "gateway-namespaced"])
def test_rbac_grants_exactly_what_the_code_uses(helm: str, scenario: str) -> None:
    namespaces = SCENARIOS[scenario].get("watchNamespaces")
    # Cluster-scoped reads (Nodes, for the Fits condition) exist only in cluster mode.
    operator_needs = as_triples(code_permissions(namespaced=bool(namespaces)))
    kopf_needs = as_triples(kopf_handler_grants()) | as_triples(KOPF_FRAMEWORK)
    objects = render(helm, scenario)
    bound = bound_grants(objects, f"{RELEASE}-llama-operator")

    if not namespaces:
        kopf_needs |= as_triples(KOPF_FRAMEWORK_CLUSTER)
        assert {kind for kind, _, _ in bound} == {"ClusterRole"}
        scopes: list[str | None] = [None]
    else:
        assert not find(objects, "ClusterRole") and not find(objects, "ClusterRoleBinding"), (
            "namespaced mode must not grant anything cluster-wide"
        )
        assert {ns for _, ns, _ in bound} == set(namespaces)
        scopes = list(namespaces)

    for scope in scopes:
        in_scope = {name: triples for (_, ns, name), triples in bound.items() if ns == scope}
        kopf_roles = {name: t for name, t in in_scope.items() if name.endswith("-kopf")}
        operator_roles = {name: t for name, t in in_scope.items() if not name.endswith("-kopf")}
        assert len(kopf_roles) == 1 and len(operator_roles) == 1, in_scope
        (kopf_granted,) = kopf_roles.values()
        (operator_granted,) = operator_roles.values()
        assert kopf_granted == kopf_needs, (
            f"kopf role in {scope or 'cluster'}: extra {sorted(kopf_granted - kopf_needs)}, "
            f"missing {sorted(kopf_needs - kopf_granted)}"
        )
        assert operator_granted == operator_needs, (
            f"operator role in {scope or 'cluster'}: extra {sorted(operator_granted - operator_needs)}, "
            f"missing {sorted(operator_needs - operator_granted)}"
        )


def test_rbac_can_be_left_to_the_user(helm: str) -> None:
    objects = render(helm, "minimal")
    assert not [o for o in objects if o["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    assert not find(objects, "ServiceAccount")
