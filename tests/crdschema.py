"""Validates custom objects against our generated CRD schemas, the way the API server would.

A JSON-schema validator stands in for the API server's structural-schema validation. Unknown fields are
made errors (the server prunes them; `kubectl apply` with strict field validation, its default, rejects
them), and int-or-string nodes accept both. The `x-kubernetes-validations` CEL rules are evaluated by a CEL
interpreter (cel-python) after applying the schema's defaults, as the API server does, with the two functions
of the Kubernetes CEL libraries our rules use (`format`, `indexOf`). The real API server's verdicts are in
tests/integration/test_bad_input_apply.py.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema
from celpy import celtypes

from llama_operator.api.cel import CEL_KEY
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


def raw_schema_for(kind: str) -> dict[str, Any]:
    """The openAPIV3Schema of one kind as generated (CEL rules included)."""
    for crd in all_crds():
        if crd["spec"]["names"]["kind"] == kind:
            return copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    raise KeyError(kind)


def schema_for(kind: str) -> dict[str, Any]:
    for crd in all_crds():
        if crd["spec"]["names"]["kind"] == kind:
            schema = copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            return _strict(schema)
    raise KeyError(kind)


def errors(obj: dict[str, Any]) -> list[str]:
    """Schema errors, then (when the object is well-typed, as the API server requires) CEL rule failures."""
    validator = jsonschema.Draft7Validator(schema_for(obj["kind"]))
    found = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]
    return found or cel_errors(obj)


def _format(template: celtypes.StringType, args: celtypes.ListType) -> celtypes.StringType:
    parts = str(template).split("%%")
    values = iter(args)
    out = []
    for part in parts:
        pieces = part.split("%s")
        out.append(pieces[0] + "".join(str(next(values)) + piece for piece in pieces[1:]))
    return celtypes.StringType("%".join(out))


def _index_of(items: celtypes.ListType, item: Any) -> celtypes.IntType:
    return celtypes.IntType(list(items).index(item) if item in items else -1)


_ENV = celpy.Environment()
_FUNCTIONS = {"format": _format, "indexOf": _index_of}
_PROGRAMS: dict[str, Any] = {}


def evaluate(expression: str, value: Any) -> Any:
    """One CEL expression with `self` bound to `value` (plain JSON, already defaulted and typed)."""
    if expression not in _PROGRAMS:
        _PROGRAMS[expression] = _ENV.program(_ENV.compile(expression), functions=_FUNCTIONS)
    result = _PROGRAMS[expression].evaluate({"self": celpy.json_to_cel(value)})
    if isinstance(result, celpy.CELEvalError):
        raise result
    return result


def _defaulted(node: dict[str, Any], value: Any) -> Any:
    """The value with the schema's defaults applied and integers in `number` fields made floats."""
    if node.get("type") == "number" and isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        value = dict(value)
        for name, prop in (node.get("properties") or {}).items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
        for name in list(value):
            child = (node.get("properties") or {}).get(name)
            if child is None and isinstance(node.get("additionalProperties"), dict):
                child = node["additionalProperties"]
            if child is not None:
                value[name] = _defaulted(child, value[name])
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [_defaulted(node["items"], item) for item in value]
    return value


def _walk_rules(node: dict[str, Any], value: Any, path: str) -> list[str]:
    found = []
    if isinstance(value, dict):
        for name, child_value in value.items():
            child = (node.get("properties") or {}).get(name)
            if child is None and isinstance(node.get("additionalProperties"), dict):
                child = node["additionalProperties"]
            if child is not None:
                found += _walk_rules(child, child_value, f"{path}.{name}" if path else name)
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            found += _walk_rules(node["items"], item, f"{path}[{index}]")
    for rule in node.get(CEL_KEY) or []:
        if not evaluate(rule["rule"], value):
            message = str(evaluate(rule["messageExpression"], value)) if "messageExpression" in rule \
                else rule["message"]
            found.append(f"{path}{rule.get('fieldPath', '')}: {message}")
    return found


def cel_errors(obj: dict[str, Any]) -> list[str]:
    """The messages of every CEL rule the object breaks, as `path: message` (the API server's path)."""
    schema = raw_schema_for(obj["kind"])
    return _walk_rules(schema, _defaulted(schema, obj), "")
