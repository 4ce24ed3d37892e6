"""`llama-operator render`: the objects the operator would create for some YAML files, with no cluster.

Files in v1alpha1 are converted to v1beta1 first (api/conversion.py), as the API server does for the operator.
What only the cluster or the network could say (an owner's uid, a sha256 the hub publishes) is left out;
the init container resolves those at run time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api.conversion import VERSIONS, convert
from .api.errors import describe
from .api.v1beta1 import API_VERSION, LlamaModel, LlamaServer
from .builders import build_cache_pvc
from .builders.plan import PlanProblem, plan_server
from .config import Settings
from .flags.spec import spec_problems
from .policy import model_policy_problems
from .reconcile.model import offline_status


class RenderError(ValueError):
    """Input that cannot be rendered; the message names the file, the object and the field."""


def _load_documents(paths: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise RenderError(f"{path}: {exc.strerror}") from exc
        try:
            loaded = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise RenderError(f"{path}: not valid YAML: {exc}") from exc
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise RenderError(f"{path}: every document must be a mapping (a Kubernetes object)")
            documents.append((path, doc))
    return documents


def _parse(path: str, doc: dict[str, Any], kind: type[LlamaModel] | type[LlamaServer]) -> Any:
    name = (doc.get("metadata") or {}).get("name", "?")
    try:
        return kind.model_validate(doc)
    except ValidationError as exc:
        raise RenderError(f"{path}: {doc.get('kind')} {name}: {describe(exc)[0]}") from None


def _find_model(
    models: dict[tuple[str, str], LlamaModel], server: LlamaServer, path: str, name: str, where: str
) -> LlamaModel:
    model = models.get((server.metadata.namespace, name))
    if model is None:
        namespace = server.metadata.namespace
        raise RenderError(f"{where}: {path}.name: LlamaModel {name!r} is not in the given files ({namespace=})")
    return model


def render(paths: Iterable[str], settings: Settings, *, default_namespace: str = "default") -> list[dict[str, Any]]:
    models: dict[tuple[str, str], LlamaModel] = {}
    servers: list[tuple[str, LlamaServer]] = []
    for path, doc in _load_documents(paths):
        doc.setdefault("metadata", {}).setdefault("namespace", default_namespace)
        if doc.get("apiVersion") not in VERSIONS or doc.get("kind") not in ("LlamaModel", "LlamaServer"):
            continue  # other objects (Secrets, namespaces) in the same files are not ours to render
        # v1alpha1 files render as the API server would serve them to the operator: converted to v1beta1.
        doc = convert(doc, API_VERSION)
        if doc["kind"] == "LlamaModel":
            model = _parse(path, doc, LlamaModel)
            refused = model_policy_problems(model.spec, settings)
            if refused:
                raise RenderError(f"{path}: LlamaModel {model.metadata.name}: {refused[0]}")
            if not model.status.cache_key:  # a status copied from a cluster is kept as is
                model = model.model_copy(update={"status": offline_status(model, settings)})
            models[(model.metadata.namespace, model.metadata.name)] = model
        else:
            servers.append((path, _parse(path, doc, LlamaServer)))
    objects: list[dict[str, Any]] = []
    for model in models.values():
        pvc = build_cache_pvc(model, settings)
        if pvc is not None:
            objects.append(pvc)
    for path, server in servers:
        where = f"{path}: LlamaServer {server.metadata.name}"
        problems = spec_problems(server.spec, server.metadata.namespace, settings)
        if problems:
            raise RenderError(f"{where}: {problems[0]}")
        refs = server.spec.model_refs()
        found = {ref.name: _find_model(models, server, field, ref.name, where) for field, ref in refs}
        plan = plan_server(server, found, settings)
        if isinstance(plan, PlanProblem):
            raise RenderError(f"{where}: {plan.message}")
        objects += plan.objects
    return objects
