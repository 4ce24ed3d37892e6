"""The drain of a llama-server pod: the `llama-operator drain` sidecar and the preStop hook that waits on it.

A stopping pod leaves the Service's endpoints at once (Kubernetes marks it terminating), but llama-server stops
serving on SIGTERM and cuts the streams it holds. The hook delays that SIGTERM until the sidecar says llama-server
is idle, or until the server's budget (spec.terminationGracePeriodSeconds, less a margin) is spent. The sidecar
is a native sidecar (an init container with restartPolicy Always) from the operator's own image: the llama-server
image may have no shell to run a wait in, and a sidecar is stopped only after llama-server has exited.
"""

from __future__ import annotations

from typing import Any

from ..api.v1beta1 import LlamaServer
from ..config import Settings
from ..contract import API_KEY_ENV, DRAIN_CONTAINER, DRAIN_MARGIN_SECONDS, DRAIN_PATH, DRAIN_PORT, DRAIN_READY_PATH
from ..flags.render import SERVER_PORT
from .prompt_cache import KeptSlots
from .security import container_security_context


def drain_budget(server: LlamaServer) -> int:
    """Seconds the drain may wait: the pod's grace period less the time llama-server needs after SIGTERM."""
    return max(1, server.spec.termination_grace_period_seconds - DRAIN_MARGIN_SECONDS)


def drain_sidecar(server: LlamaServer, settings: Settings, kept: KeptSlots | None = None) -> dict[str, Any]:
    """The native sidecar serving /drain to the llama-server container's preStop hook; with `kept` it also saves
    the slots' prompt caches once idle and restores them at start, Ready only after that (a native sidecar's
    readiness is part of the pod's)."""
    sidecar = {
        "name": DRAIN_CONTAINER,
        "image": settings.fetcher_image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["llama-operator"],
        "args": ["drain", "--port", str(DRAIN_PORT), "--server", f"http://127.0.0.1:{SERVER_PORT}",
                 "--budget-seconds", str(drain_budget(server))],
        "ports": [{"name": DRAIN_CONTAINER, "containerPort": DRAIN_PORT, "protocol": "TCP"}],
        # Measured: about 22 MiB RSS (Python, standard library only).
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if server.spec.api_key_secret_ref is not None:
        # llama-server guards /metrics and /slots with the key too: the sidecar sends it.
        ref = server.spec.api_key_secret_ref
        sidecar["env"] = [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]
    if kept is not None:
        sidecar["args"] = [*sidecar["args"], *kept.sidecar_args()]
        sidecar["volumeMounts"] = [kept.mount]
        sidecar["readinessProbe"] = {"httpGet": {"path": DRAIN_READY_PATH, "port": DRAIN_PORT},
                                     "periodSeconds": 1, "failureThreshold": 1, "timeoutSeconds": 2}
    return sidecar


def drain_hook() -> dict[str, Any]:
    """llama-server's lifecycle: preStop calls the sidecar (by number: a named port resolves in this container)."""
    return {"preStop": {"httpGet": {"path": DRAIN_PATH, "port": DRAIN_PORT}}}
