"""The emulator's resource catalog: which API resources exist and how discovery describes them.

Owns the built-in resource table (the handful of core/apps/... resources the operator and kopf touch),
the translation of a CustomResourceDefinition body into catalog entries, and the discovery documents
(`/api`, `/apis`, `/apis/{group}`, `/api/v1`, `/apis/{group}/{version}`) that kopf's resource scanning
and kubectl read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = ("get", "patch", "update")


@dataclasses.dataclass(frozen=True)
class ScalePaths:
    """Where the scale subresource reads and writes its fields (CRD `subresources.scale` semantics)."""

    spec_replicas: str = ".spec.replicas"
    status_replicas: str = ".status.replicas"
    label_selector: str | None = ".status.selector"


@dataclasses.dataclass(frozen=True)
class ResourceType:
    """One served resource: a group/version/plural with its discovery facts."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status: bool = False  # has the status subresource: main writes never touch .status
    scale: ScalePaths | None = None
    # Deployments derive the Scale selector from spec.selector; CRDs name a string path instead.
    scale_selector_from_spec: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def display(self) -> str:
        """How Kubernetes names the resource in error messages: `deployments.apps`, `pods`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery(self) -> list[dict[str, Any]]:
        """APIResource entries for this resource and its subresources."""
        entries = [
            {
                "name": self.plural,
                "singularName": self.singular or self.kind.lower(),
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": list(ALL_VERBS),
                "shortNames": list(self.short_names),
                "categories": list(self.categories),
            }
        ]
        if self.status:
            entries.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": list(SUBRESOURCE_VERBS),
                }
            )
        if self.scale is not None:
            entries.append(
                {
                    "name": f"{self.plural}/scale",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "group": "autoscaling",
                    "version": "v1",
                    "kind": "Scale",
                    "verbs": list(SUBRESOURCE_VERBS),
                }
            )
        return entries


def builtin_resources() -> list[ResourceType]:
    """The built-in resources the operator, kopf and the tests use (not the whole Kubernetes API)."""
    return [
        ResourceType("", "v1", "pods", "Pod", short_names=("po",), categories=("all",), status=True),
        ResourceType("", "v1", "services", "Service", short_names=("svc",), categories=("all",), status=True),
        ResourceType("", "v1", "endpoints", "Endpoints", short_names=("ep",)),
        ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", short_names=("pvc",),
                     status=True),
        ResourceType("", "v1", "secrets", "Secret"),
        ResourceType("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
        ResourceType("", "v1", "events", "Event", short_names=("ev",)),
        ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",), status=True),
        ResourceType("apps", "v1", "deployments", "Deployment", short_names=("deploy",), categories=("all",),
                     status=True, scale=ScalePaths(label_selector=None), scale_selector_from_spec=True),
        ResourceType("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
        ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
        ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                     namespaced=False, short_names=("crd", "crds"), status=True),
    ]


def from_crd(crd: dict[str, Any]) -> list[ResourceType]:
    """Catalog entries for every served version of a CustomResourceDefinition body."""
    spec = crd.get("spec", {})
    names = spec.get("names", {})
    out: list[ResourceType] = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        scale = subresources.get("scale")
        out.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                singular=names.get("singular", ""),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames", [])),
                categories=tuple(names.get("categories", [])),
                status="status" in subresources,
                scale=None if scale is None else ScalePaths(
                    spec_replicas=scale["specReplicasPath"],
                    status_replicas=scale["statusReplicasPath"],
                    label_selector=scale.get("labelSelectorPath"),
                ),
            )
        )
    return out


def _versions_by_group(resources: Iterable[ResourceType]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for res in resources:
        if res.group and res.version not in groups.setdefault(res.group, []):
            groups[res.group].append(res.version)
    return groups


def _group_doc(group: str, versions: list[str]) -> dict[str, Any]:
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(resources: Iterable[ResourceType]) -> dict[str, Any]:
    groups = _versions_by_group(resources)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group_doc(group, versions) for group, versions in sorted(groups.items())],
    }


def api_group(resources: Iterable[ResourceType], group: str) -> dict[str, Any] | None:
    versions = _versions_by_group(resources).get(group)
    if not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(group, versions)}


def api_resource_list(resources: Iterable[ResourceType], group: str, version: str) -> dict[str, Any] | None:
    matching = [r for r in resources if r.group == group and r.version == version]
    if not matching:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [entry for res in sorted(matching, key=lambda r: r.plural) for entry in res.discovery()],
    }
