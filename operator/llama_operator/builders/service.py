"""The Service in front of a LlamaServer's pods: the in-cluster OpenAI-compatible endpoint."""

from __future__ import annotations

from typing import Any

from ..api.v1beta1 import LlamaServer
from ..contract import PORT_NAME
from .objects import object_meta, selector_labels, server_labels


def endpoint_url(server: LlamaServer) -> str:
    meta = server.metadata
    return f"http://{meta.name}.{meta.namespace}.svc:{server.spec.service.port}/v1"


def build_service(server: LlamaServer) -> dict[str, Any]:
    service = server.spec.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(
            server, name=server.metadata.name, labels=server_labels(server), annotations=service.annotations
        ),
        "spec": {
            "type": service.type,
            "selector": selector_labels(server.metadata.name),
            "ports": [{"name": PORT_NAME, "port": service.port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
