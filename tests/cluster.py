"""Test-side access to the real test control plane: a small synchronous API client and `kubectl`.

`ClusterApi` talks to kube-apiserver over HTTPS with the admin client certificate, one namespace per test,
with the same helpers the integration tests always used (`read/list/create/patch/delete/wait_for`), so a
test reads as "arrange through the API, run the operator, assert on what the API server holds".
"""

from __future__ import annotations

import copy
import json
import pathlib
import socket
import ssl
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from llama_operator.api.v1beta1 import GROUP, VERSION
from llama_operator.controlplane import ControlPlane
from llama_operator.sandbox.client import resource_path
from tests.waiting import wait_for

T = TypeVar("T")
LLAMA_API_VERSION = f"{GROUP}/{VERSION}"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{status}: {message}")
        self.status = status
        self.body = body


class ClusterApi:
    """The admin's view of the API server (system:masters: RBAC never gets in the way of arranging a test)."""

    def __init__(self, cluster: ControlPlane, namespace: str = "default") -> None:
        self.cluster = cluster
        self.namespace = namespace
        tls = ssl.create_default_context(cafile=str(cluster.ca_cert))
        tls.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
        self.http = httpx.Client(base_url=cluster.server, verify=tls, timeout=30)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, body: Any = None, content_type: str = "application/json",
                params: Mapping[str, str] | None = None) -> Any:
        content = None if body is None else (body if isinstance(body, str | bytes) else json.dumps(body))
        response = self.http.request(method, path, content=content, params=params,
                                     headers={"Content-Type": content_type} if content is not None else {})
        try:
            payload: Any = response.json()
        except ValueError:
            payload = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, payload)
        return payload

    def read(self, api_version: str, plural: str, namespace: str | None, name: str,
             subresource: str | None = None) -> dict[str, Any] | None:
        try:
            return self.request("GET", resource_path(api_version, plural, namespace, name, subresource))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None,
             label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        return self.request("GET", resource_path(api_version, plural, namespace), params=params)["items"]

    def create(self, api_version: str, plural: str, namespace: str | None, body: dict[str, Any]
               ) -> dict[str, Any]:
        return self.request("POST", resource_path(api_version, plural, namespace), body=body)

    def create_llama(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a LlamaModel/LlamaServer from a test body (tests/conftest.py factories) in this namespace;
        the fields only the API server may set (uid, generation) are left out."""
        body = copy.deepcopy(body)
        for key in ("uid", "generation"):
            body["metadata"].pop(key, None)
        body["metadata"]["namespace"] = self.namespace
        return self.create(LLAMA_API_VERSION, plural, self.namespace, body)

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None, content_type: str = MERGE_PATCH,
              field_manager: str | None = None, force: bool = False) -> dict[str, Any]:
        params = {"fieldManager": field_manager} if field_manager else {}
        if force:
            params["force"] = "true"
        return self.request("PATCH", resource_path(api_version, plural, namespace, name, subresource), body=patch,
                            content_type=content_type, params=params or None)

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("DELETE", resource_path(api_version, plural, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def wait_for(self, predicate: Callable[[], T], *, timeout: float = 15.0, interval: float = 0.1,
                 message: str = "condition") -> T:
        return wait_for(predicate, timeout=timeout, interval=interval, message=message)


def tls_listening(port: int, ca: pathlib.Path | str) -> bool:
    """Whether a TLS server on 127.0.0.1:`port` answers a handshake with a certificate of `ca` (a webhook server
    the test started)."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock, \
                context.wrap_socket(sock, server_hostname="127.0.0.1"):
            return True
    except OSError:
        return False


def kubectl(cluster: ControlPlane, *args: str, kubeconfig: pathlib.Path | None = None, input: str | None = None,
            check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the control plane's own kubectl (same version as the API server) with the admin kubeconfig."""
    assert cluster.binaries is not None
    proc = subprocess.run([str(cluster.binaries.kubectl), "--kubeconfig", str(kubeconfig or cluster.admin_kubeconfig),
                           *args], input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def apply_objects(api: ClusterApi, objects: Sequence[Mapping[str, Any]], *, field_manager: str = "tests") -> None:
    """Server-side apply a list of objects (chart-rendered RBAC, CRDs ...) as the admin."""
    plurals = {"ClusterRole": ("rbac.authorization.k8s.io/v1", "clusterroles", False),
               "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
               "Role": ("rbac.authorization.k8s.io/v1", "roles", True),
               "RoleBinding": ("rbac.authorization.k8s.io/v1", "rolebindings", True),
               "ServiceAccount": ("v1", "serviceaccounts", True),
               "Namespace": ("v1", "namespaces", False),
               "CustomResourceDefinition": ("apiextensions.k8s.io/v1", "customresourcedefinitions", False)}
    for obj in objects:
        api_version, plural, namespaced = plurals[obj["kind"]]
        namespace = obj["metadata"].get("namespace", api.namespace) if namespaced else None
        api.patch(api_version, plural, namespace, obj["metadata"]["name"], json.dumps(obj),
                  content_type=APPLY_PATCH, field_manager=field_manager, force=True)
