"""The drain of a llama-server pod: the `llama-operator drain` sidecar and the preStop hook that waits on it.

A stopping pod leaves the Service's endpoints at once (Kubernetes marks it terminating), but llama-server stops
serving on SIGTERM and cuts the streams it holds. The hook delays that SIGTERM until the sidecar says llama-server
is idle, or until the server's budget (spec.terminationGracePeriodSeconds, less a margin) is spent. The sidecar
is a native sidecar (an init container with restartPolicy Always) from the operator's own image: the llama-server
image may have no shell to run a wait in, and a sidecar is stopped only after llama-server has exited.
"""

from __future__ import annotations

from typing import Any

from ..api.v1alpha1 import LlamaServer
from ..config import Settings
from ..contract import DRAIN_CONTAINER, DRAIN_MARGIN_SECONDS, DRAIN_PATH, DRAIN_PORT
from ..flags.render import SERVER_PORT
from .security import container_security_context


def drain_budget(server: LlamaServer) -> int:
    """Seconds the drain may wait: the pod's grace period less the time llama-server needs after SIGTERM."""
    return max(1, server.spec.termination_grace_period_seconds - DRAIN_MARGIN_SECONDS)


def drain_sidecar(server: LlamaServer, settings: Settings) -> dict[str, Any]:
    """The native sidecar serving /drain to the llama-server container's preStop hook."""
    return {
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


def drain_hook() -> dict[str, Any]:
    """llama-server's lifecycle: preStop calls the sidecar (by number: a named port resolves in this container)."""
    return {"preStop": {"httpGet": {"path": DRAIN_PATH, "port": DRAIN_PORT}}}
