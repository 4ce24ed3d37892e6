"""The few API calls the node harness makes as the control plane's admin (urllib, the admin's client
certificate): read a path, and server-side apply of the add-on objects. Kept this small on purpose: the product's
own API client lives in llama_operator.kube, a layer above this package."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from .processes import NodesError

PLURALS = {"ServiceAccount": "serviceaccounts", "ConfigMap": "configmaps", "Service": "services",
           "Deployment": "deployments", "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
           "Namespace": "namespaces", "Pod": "pods"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace"}
FIELD_MANAGER = "llama-operator-nodes"


class ControlPlaneLike(Protocol):
    server: str
    ca_cert: Path
    pki: Path


class AdminApi:
    def __init__(self, cluster: ControlPlaneLike) -> None:
        self.server = cluster.server
        self.tls = ssl.create_default_context(cafile=str(cluster.ca_cert))
        self.tls.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:
        request = urllib.request.Request(f"{self.server}{path}", method=method, data=body,
                                         headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=15, context=self.tls) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "GET":
                return None
            raise NodesError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
        except (OSError, urllib.error.URLError) as exc:
            raise NodesError(f"{method} {path}: the API server at {self.server} did not answer: {exc}") from None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def apply(self, obj: dict[str, Any]) -> Any:
        """Server-side apply of `obj` (force: this harness owns its add-ons)."""
        return self.request("PATCH", f"{object_path(obj)}?fieldManager={FIELD_MANAGER}&force=true",
                            json.dumps(obj).encode(), "application/apply-patch+yaml")


def object_path(obj: dict[str, Any]) -> str:
    group_version = obj["apiVersion"]
    base = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    kind = obj["kind"]
    namespace = "" if kind in CLUSTER_SCOPED else f"/namespaces/{obj['metadata'].get('namespace', 'default')}"
    return f"{base}{namespace}/{PLURALS[kind]}/{obj['metadata']['name']}"
