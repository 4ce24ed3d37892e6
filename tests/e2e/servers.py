"""LlamaModels and LlamaServers in a namespace of a real-node sandbox, for the e2e tests that make their own
namespaces (tests/e2e/test_on_real_nodes.py, test_network_policies.py): create one, read
its status, wait for a phase (on timeout: the status, the pods and the namespace's events), list its pods."""

from __future__ import annotations

from typing import Any

from kubernetes.client.rest import ApiException

from tests.e2e.harness import SandboxProcess, custom_object, wait_for

GROUP, VERSION = "llamacpp.dev", "v1beta1"
"""The stored version: a request in it needs no conversion (v1alpha1 ones need the operator's webhook, which a
leader's death takes away for a moment: docs/api.md). test_upgrade passes v1alpha1, all 0.1.0 knows."""
SYSTEM = "llama-system"


def apply_model(real: SandboxProcess, ns: str, name: str, url: str, version: str = VERSION, **spec: Any) -> None:
    real.custom.create_namespaced_custom_object(GROUP, version, ns, "llamamodels", custom_object(
        "llamamodels", name, {"source": {"http": {"url": url}}, **spec}, namespace=ns, version=version))


def apply_server(real: SandboxProcess, ns: str, name: str, version: str = VERSION, **spec: Any) -> None:
    real.custom.create_namespaced_custom_object(GROUP, version, ns, "llamaservers", custom_object(
        "llamaservers", name, {"modelRef": {"name": name}, "contextSize": 256, **spec}, namespace=ns,
        version=version))


def status_of(real: SandboxProcess, ns: str, plural: str, name: str, version: str = VERSION) -> dict[str, Any]:
    try:
        return real.custom.get_namespaced_custom_object(GROUP, version, ns, plural, name).get("status") or {}
    except ApiException as exc:
        if exc.status == 404:
            return {}
        raise


def wait_server(real: SandboxProcess, ns: str, name: str, check: Any, what: str, timeout: float = 240,
                version: str = VERSION) -> dict[str, Any]:
    try:
        return wait_for(lambda: (s := status_of(real, ns, "llamaservers", name, version)) and check(s) and s,
                        timeout=timeout, message=f"{ns}/{name}: {what}")
    except TimeoutError:
        pods = real.kubectl("get", "pods", "-n", ns, "-o", "wide", check=False).stdout
        events = real.kubectl("get", "events", "-n", ns, check=False).stdout[-3000:]
        raise AssertionError(f"{ns}/{name} never {what}; status {status_of(real, ns, 'llamaservers', name)}\n"
                             f"{pods}\n{events}") from None


def ready(real: SandboxProcess, ns: str, name: str, timeout: float = 240) -> dict[str, Any]:
    return wait_server(real, ns, name, lambda s: s.get("phase") == "Ready", "Ready", timeout)


def pods(real: SandboxProcess, ns: str, server: str) -> list[Any]:
    return real.core.list_namespaced_pod(ns, label_selector=f"llamacpp.dev/server={server}").items
