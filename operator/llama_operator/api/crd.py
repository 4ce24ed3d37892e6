"""Generates the two CustomResourceDefinitions from the pydantic API models.

The output is a structural schema: every node typed, `$ref`s inlined, pydantic's Optional encoding
(`anyOf: [X, null]`) collapsed to X, and int-or-string fields marked the Kubernetes way. The models' validation
rules (api/cel.py) come along as `x-kubernetes-validations`, so the API server itself enforces them.

Each CRD serves two versions: v1beta1 (stored) and the deprecated v1alpha1, each with its own models' schema and
columns. As generated they have no conversion section (strategy None); `with_webhook_conversion` adds the
webhook that converts between them (api/conversion.py): the chart adds it, and so does `llama-operator crds
--conversion-*`. docs/api.md#versions says why the plain crds/ carry none.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import yaml

from . import v1alpha1, v1beta1
from .cel import CEL_KEY
from .v1beta1 import GROUP, LlamaServerSpec, LlamaServerStatus

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


def _version(
    name: str, *, spec: dict[str, Any], status: dict[str, Any], columns: list[dict[str, Any]],
    subresources: dict[str, Any], description: str,
) -> dict[str, Any]:
    version: dict[str, Any] = {"name": name, "served": True, "storage": name == v1beta1.VERSION}
    if name == v1alpha1.VERSION:
        version["deprecated"] = True
        version["deprecationWarning"] = (f"{GROUP}/{name} is deprecated; use {v1beta1.API_VERSION} "
                                         "(docs/api.md#versions)")
    version.update({
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
    })
    return version


def _crd(*, kind: str, plural: str, short_name: str, versions: list[dict[str, Any]]) -> dict[str, Any]:
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
            "versions": versions,
        },
    }


def _model_columns(size: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Arch", "type": "string", "jsonPath": ".status.gguf.architecture"},
        {"name": "Quant", "type": "string", "jsonPath": ".status.gguf.fileType"},
        {"name": "Size", **size},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def llamamodel_crd() -> dict[str, Any]:
    spec = schema_for(v1beta1.LlamaModelSpec)
    common = {"spec": spec, "subresources": {"status": {}},
              "description": "A GGUF model for llama.cpp: its source, checksum and cache."}
    return _crd(
        kind="LlamaModel",
        plural="llamamodels",
        short_name="lmodel",
        versions=[
            _version(v1beta1.VERSION, status=schema_for(v1beta1.LlamaModelStatus), **common,
                     columns=_model_columns({"type": "string", "jsonPath": ".status.humanSize"})),
            _version(v1alpha1.VERSION, status=schema_for(v1alpha1.LlamaModelStatus), **common,
                     columns=_model_columns({"type": "integer", "format": "int64", "jsonPath": ".status.size"})),
        ],
    )


_SERVER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.modelRef.name"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
    {"name": "Download", "type": "string", "jsonPath": ".status.download.summary",
     "description": "While Downloading: percent, size and rate of the model download."},
    {"name": "Loaded", "type": "string", "jsonPath": ".status.modelsLoaded",
     "description": "With spec.models: models loaded/total."},
    {"name": "Workers", "type": "string", "jsonPath": ".status.distributed.readyWorkers",
     "description": "With spec.distributed: RPC workers running/total (docs/distributed.md)."},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Memory", "type": "string", "jsonPath": ".status.memory.host", "priority": 1,
     "description": "Estimated host memory per replica (docs/memory-fit.md)."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def llamaserver_crd() -> dict[str, Any]:
    # Both versions share one schema: v1beta1 changed nothing in LlamaServer but its apiVersion.
    common = {
        "spec": schema_for(LlamaServerSpec),
        "status": schema_for(LlamaServerStatus),
        "columns": _SERVER_COLUMNS,
        "subresources": {
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
        "description": "A fleet of llama.cpp llama-server pods serving one LlamaModel behind an "
        "OpenAI-compatible Service.",
    }
    return _crd(kind="LlamaServer", plural="llamaservers", short_name="lserver",
                versions=[_version(v1beta1.VERSION, **common), _version(v1alpha1.VERSION, **common)])


def with_webhook_conversion(crd: dict[str, Any], client_config: dict[str, Any]) -> dict[str, Any]:
    """`crd` converting between its versions through the operator's webhook at `client_config` (the CRD's
    `spec.conversion.webhook.clientConfig`: a `service` or `url`, and the `caBundle` that signed its certificate)."""
    converted = copy.deepcopy(crd)
    converted["spec"]["conversion"] = {
        "strategy": "Webhook",
        "webhook": {"conversionReviewVersions": ["v1"], "clientConfig": client_config},
    }
    return converted


def conversion_client_config(*, ca_pem: bytes, service: str | None = None, url: str | None = None) -> dict[str, Any]:
    """The clientConfig of the operator's conversion webhook: behind `service` (NAMESPACE/NAME, port 443, the
    chart's webhook Service) or at `url`, with the CA (PEM) that signed the webhook certificate."""
    if (service is None) == (url is None):
        raise ValueError("give exactly one of a service (NAMESPACE/NAME) or a URL")
    config: dict[str, Any] = {"caBundle": base64.b64encode(ca_pem).decode("ascii")}
    if url is not None:
        config["url"] = url.rstrip("/") + "/convert"
    else:
        namespace, _, name = (service or "").partition("/")
        if not namespace or not name:
            raise ValueError(f"service {service!r}: expected NAMESPACE/NAME")
        config["service"] = {"namespace": namespace, "name": name, "path": "/convert", "port": 443}
    return config


def all_crds(client_config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Both CRDs; with `client_config`, converting through the operator's webhook there."""
    crds = [llamamodel_crd(), llamaserver_crd()]
    return crds if client_config is None else [with_webhook_conversion(crd, client_config) for crd in crds]


CRD_FILES = {
    "llamacpp.dev_llamamodels.yaml": llamamodel_crd,
    "llamacpp.dev_llamaservers.yaml": llamaserver_crd,
}


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a node shared by both versions (LlamaServer's schema) out twice rather than as a YAML alias: the
    chart edits the CRD text, and people read it."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, width=120)
