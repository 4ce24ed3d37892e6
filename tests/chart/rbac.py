"""What the operator's RBAC must grant, from the code: `Kube`'s declared permissions, the handlers kopf
registers (read from its registry) and what kopf itself needs; and the rendered roles as (group, resource, verb)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from llama_operator.kube import required_permissions
from tests.chart.chart import NAMESPACE, REPO, find

# What the kopf framework itself needs beyond the handlers' resources (kopf 1.45, --standalone, annotation-based
# progress and diffbase storage as configured in handlers.configure):
#   - Events: kopf posts handler warnings/errors as core v1 Events (POST only, never patches them).
#   - CRDs (cluster mode only): after the initial API discovery (non-resource /apis URLs, allowed to every
#     authenticated user), kopf watches CustomResourceDefinitions to notice resources appearing or disappearing.
#     In namespaced mode this cluster-scoped grant is deliberately absent: kopf then keeps the resources it
#     discovered at start and logs a warning, unless settings.scanning.disabled says this is intended.
#   - Namespaces: not needed; kopf lists/watches them only to expand namespace *patterns*, and the chart passes
#     exact names (or --all-namespaces).
#   - Peering objects (kopfpeerings): not needed in --standalone mode.
KOPF_FRAMEWORK = {("", "events"): {"create"}}


KOPF_FRAMEWORK_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}


Triples = set[tuple[str, str, str]]


def expand(rules: Iterable[Mapping[str, Any]]) -> Triples:
    """RBAC rules as (apiGroup, resource, verb) triples; wildcards and resourceNames are refused outright."""
    triples: Triples = set()
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    triples.add((group, resource, verb))
    return triples


def as_triples(grants: Mapping[tuple[str, str], Iterable[str]]) -> Triples:
    return {(group, resource, verb) for (group, resource), verbs in grants.items() for verb in verbs}


def kopf_handler_grants() -> dict[tuple[str, str], set[str]]:
    """What kopf does for the handlers llama_operator.handlers registers, read from kopf's registry.

    Run in a subprocess so the test session's default kopf registry stays untouched.
    """
    script = r"""
import json, kopf, llama_operator.handlers  # noqa: F401  (registers the handlers)
reg = kopf.get_default_registry()
grants = {}
def add(sel, *verbs):
    plural = sel.plural or sel.any_name
    assert isinstance(plural, str) and sel.group is not None, f"handler selector too vague for RBAC: {sel}"
    grants.setdefault(f"{sel.group}|{plural}", set()).update(verbs)
for h in reg._indexing.get_all_handlers() + reg._watching.get_all_handlers():
    add(h.selector, "list", "watch")
for h in reg._changing.get_all_handlers():
    # kopf stores progress and the last-handled spec (annotations here) and finalizers by patching the object.
    add(h.selector, "list", "watch", "patch")
for h in reg._spawning.get_all_handlers():
    add(h.selector, "list", "watch", "patch")
print(json.dumps({k: sorted(v) for k, v in grants.items()}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return {tuple(key.split("|", 1)): set(verbs) for key, verbs in json.loads(proc.stdout).items()}  # type: ignore[misc]


def code_permissions(*, namespaced: bool = False) -> dict[tuple[str, str], set[str]]:
    """What `Kube` may call (kube.required_permissions), as {(group, resource): verbs}."""
    grants: dict[tuple[str, str], set[str]] = {}
    for permission in required_permissions(namespaced=namespaced):
        grants.setdefault((permission.api_group, permission.resource), set()).update(permission.verbs)
    return grants


def bound_grants(objects: list[dict[str, Any]], sa: str) -> dict[tuple[str, str | None, str], Triples]:
    """{(role kind, namespace, role name): triples} for every role bound to the operator's ServiceAccount."""
    # The leader-election Role (templates/operator-ha.yaml) names its one Lease: test_operator_ha.py checks it.
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects
             if o["kind"] in ("Role", "ClusterRole") and not o["metadata"]["name"].endswith("-operator-leader")}
    objects = [o for o in objects if not (o["kind"] == "RoleBinding"
                                          and o["roleRef"]["name"].endswith("-operator-leader"))]
    bound, bound_to_anyone = {}, set()
    for binding in find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding"):
        ref = binding["roleRef"]
        key = (ref["kind"], binding["metadata"].get("namespace") if ref["kind"] == "Role" else None, ref["name"])
        assert key in roles, f"{binding['kind']} {binding['metadata']['name']} refers to a missing {key}"
        bound_to_anyone.add(key)
        (subject,) = binding["subjects"]
        if subject == {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}:
            bound[key] = expand(roles[key]["rules"])
    assert bound_to_anyone == set(roles), "a rendered role is bound to nobody"
    return bound
