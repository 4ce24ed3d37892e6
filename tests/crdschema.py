"""Validates custom objects against our generated CRD schemas, the way the API server would.

A JSON-schema validator stands in for the API server's structural-schema validation. Unknown fields are
made errors (the server prunes them; `kubectl apply` with strict field validation, its default, rejects
them), and int-or-string nodes accept both. Defaulting and CEL are not modelled (we use neither).
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

from llama_operator.api.crd import all_crds


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _strict(value) for key, value in node.items()}
    if node.pop("x-kubernetes-int-or-string", False):
        node.pop("anyOf", None)
        node["type"] = ["integer", "string"]
    if "properties" in node and "additionalProperties" not in node:
        node["additionalProperties"] = False
    return node


def schema_for(kind: str) -> dict[str, Any]:
    for crd in all_crds():
        if crd["spec"]["names"]["kind"] == kind:
            schema = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            return _strict(schema)
    raise KeyError(kind)


def errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema_for(obj["kind"]))
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
