"""The answers the gateway writes itself, in OpenAI's formats: errors, and the model objects of /v1/models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from .routing import Route

KNOWN_LISTED = 20
"""Model names a 404 lists (all of them are in GET /v1/models)."""


def openai_error(status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: Mapping[str, str] | None = None) -> web.Response:
    """An error in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=dict(headers or {}))


def model_object(route: Route, name: str, ready: int) -> dict[str, Any]:
    """One listed model: `name` is one of `routes.public_names(route)` (a router-mode server is listed once per
    model it serves, a server with LoRA adapters once more per adapter; `state` and the replicas are the
    server's, whichever of its models is loaded or adapters applied)."""
    state = "ready" if ready else ("scaled_to_zero" if route.replicas == 0 else "starting")
    chosen = None if route.models else route.adapter(name)
    if route.models:
        aliases = [name]
    elif chosen is not None:  # the names that select the same adapter
        aliases = [f"{base}:{route.adapters[chosen[0]][0]}" for base in route.base_names]
    else:
        aliases = list(route.base_names)
    return {"id": name, "object": "model", "created": route.created, "owned_by": route.namespace,
            "namespace": route.namespace, "llamaserver": route.name, "aliases": aliases, "state": state,
            "replicas": route.replicas, "ready_replicas": ready, "autoscaling": route.scaling is not None}


def unknown_model(model: str, candidates: Sequence[Route], known: Sequence[str]) -> web.Response:
    """400 when several servers answer to `model`, else 404 naming (some of) the `known` ones."""
    if candidates:
        names = ", ".join(r.key for r in candidates)
        return openai_error(400, f"The model '{model}' is served by several LlamaServers ({names}): "
                            "name one as <namespace>/<name>.", param="model", code="model_ambiguous")
    listed = ", ".join(known[:KNOWN_LISTED]) or "none"
    if len(known) > KNOWN_LISTED:
        listed += f" and {len(known) - KNOWN_LISTED} more (GET /v1/models)"
    return openai_error(404, f"The model '{model}' does not exist on this gateway. Known models: {listed}.",
                        param="model", code="model_not_found")
