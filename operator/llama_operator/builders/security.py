"""The security contexts of every container and pod the operator builds: restricted Pod Security, fixed UID."""

from __future__ import annotations

from typing import Any

RUN_AS_USER = 65532
"""A fixed non-root UID: the llama.cpp images default to root, which restricted pod security forbids."""


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        # fsGroup makes EmptyDir and most PVCs writable for the fetcher; hostPath is not chowned (docs).
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
