"""Generates the two CustomResourceDefinitions from the pydantic API models.

The output is a structural schema: every node typed, `$ref`s inlined, pydantic's Optional encoding
(`anyOf: [X, null]`) collapsed to X, and int-or-string fields marked the Kubernetes way. The models' validation
rules (api/cel.py) come along as `x-kubernetes-validations`, so the API server itself enforces them.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from .cel import CEL_KEY
from .v1alpha1 import GROUP, VERSION, LlamaModelSpec, LlamaModelStatus, LlamaServerSpec, LlamaServerStatus

_DROP_KEYS = {"title", "additionalProperties"}


def _key_rule(names: dict[str, Any]) -> dict[str, Any]:
    shortest, longest = names.get("minLength", 0), names["maxLength"]
    return {"rule": f"self.all(k, size(k) >= {shortest} && size(k) <= {longest})",
            "message": f"keys must be {shortest} to {longest} characters long"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve $refs and normalise one JSON-schema node into a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        # A field's own description beats the referenced model's docstring.
        target.update({k: v for k, v in node.items() if k == "description"})
        node = target
    if node.get("x-kubernetes-int-or-string"):
        return {
            k: v for k, v in node.items()
            if k in ("description", "x-kubernetes-int-or-string", "default", "maxLength", CEL_KEY)
        }
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [branch for branch in any_of if branch.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {any_of}")
        merged = _inline(non_null[0], defs)
        merged.update({k: v for k, v in node.items() if k == "description"})
        node = {**node, **merged}
    if node.get("default", "absent") is None:
        del node["default"]
    additional = node.get("additionalProperties")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "properties":
            out[key] = {name: _inline(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out[key] = _inline(value, defs)
        else:
            out[key] = value
    if isinstance(additional, dict):  # a map type keeps its value schema
        out["additionalProperties"] = _inline(additional, defs)
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), (int, float)) and not isinstance(out[bound], bool):
            # JSON Schema 2020's number (pydantic's gt/lt) is OpenAPI v3's boolean beside the bound.
            out[inclusive], out[bound] = out[bound], True
    names = out.pop("propertyNames", None)
    if names:
        # A structural schema cannot bound map keys: the bound becomes a CEL rule on the map.
        out.setdefault(CEL_KEY, []).append(_key_rule(names))
    if "properties" in out or "additionalProperties" in out:
        out.setdefault("type", "object")
    return out


def schema_for(model: type) -> dict[str, Any]:
    """The structural OpenAPI schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")  # type: ignore[attr-defined]
    defs = raw.pop("$defs", {})
    return _inline(raw, defs)


def _crd(
    *,
    kind: str,
    plural: str,
    short_name: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    columns: list[dict[str, Any]],
    subresources: dict[str, Any],
    description: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                "categories": ["llama"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version."},
                                "kind": {"type": "string", "description": "Kind."},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def llamamodel_crd() -> dict[str, Any]:
    spec = schema_for(LlamaModelSpec)
    return _crd(
        kind="LlamaModel",
        plural="llamamodels",
        short_name="lmodel",
        spec=spec,
        status=schema_for(LlamaModelStatus),
        subresources={"status": {}},
        description="A GGUF model for llama.cpp: its source, checksum and cache.",
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Arch", "type": "string", "jsonPath": ".status.gguf.architecture"},
            {"name": "Quant", "type": "string", "jsonPath": ".status.gguf.fileType"},
            {"name": "Size", "type": "integer", "format": "int64", "jsonPath": ".status.size"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def llamaserver_crd() -> dict[str, Any]:
    return _crd(
        kind="LlamaServer",
        plural="llamaservers",
        short_name="lserver",
        spec=schema_for(LlamaServerSpec),
        status=schema_for(LlamaServerStatus),
        subresources={
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
        description="A fleet of llama.cpp llama-server pods serving one LlamaModel behind an "
        "OpenAI-compatible Service.",
        columns=[
            {"name": "Model", "type": "string", "jsonPath": ".spec.modelRef.name"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
            {"name": "Download", "type": "string", "jsonPath": ".status.download.summary",
             "description": "While Downloading: percent, size and rate of the model download."},
            {"name": "Loaded", "type": "string", "jsonPath": ".status.modelsLoaded",
             "description": "With spec.models: models loaded/total."},
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
            {"name": "Memory", "type": "string", "jsonPath": ".status.memory.host", "priority": 1,
             "description": "Estimated host memory per replica (docs/memory-fit.md)."},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def all_crds() -> list[dict[str, Any]]:
    return [llamamodel_crd(), llamaserver_crd()]


CRD_FILES = {
    "llamacpp.dev_llamamodels.yaml": llamamodel_crd,
    "llamacpp.dev_llamaservers.yaml": llamaserver_crd,
}


def to_yaml(obj: dict[str, Any]) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=120)
