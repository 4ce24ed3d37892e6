"""The model names a LlamaServer serves: what /v1/models lists and what requests put in `model`."""

from __future__ import annotations

from ..api.v1beta1 import LlamaServer


def model_name(server: LlamaServer) -> str:
    """What /v1/models serves and clients put in `model` (router mode: every served name, comma-separated)."""
    if server.spec.models is not None:
        return ", ".join(served_names(server))
    assert server.spec.model_ref is not None  # LlamaServerSpec: exactly one of modelRef and models
    return server.spec.alias or server.spec.model_ref.name


def served_names(server: LlamaServer) -> list[str]:
    """Every model name a request may use with this server."""
    if server.spec.models is not None:
        return [model.served_name for model in server.spec.models]
    return [model_name(server)]
