"""An in-process Kubernetes API emulator for integration tests and, later, `llama-operator sandbox`.

Built on kmock (optional extra `sandbox`). `Emulator` is the API server (server.py); `EmulatorThread`
serves it on 127.0.0.1 from a background thread (runner.py). What it models and what only a real
cluster covers is written down in docs/testing-emulator.md.
"""

from .resources import ResourceType, builtin_resources, from_crd
from .runner import EmulatorThread, kubeconfig, write_kubeconfig
from .server import APPLY_PATCH, JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH, Emulator, parse_resource_path

__all__ = [
    "APPLY_PATCH",
    "JSON_PATCH",
    "MERGE_PATCH",
    "STRATEGIC_PATCH",
    "Emulator",
    "EmulatorThread",
    "ResourceType",
    "builtin_resources",
    "from_crd",
    "kubeconfig",
    "parse_resource_path",
    "write_kubeconfig",
]
