"""Conversion between llamacpp.dev/v1alpha1 and v1beta1: pure functions on wire dicts, and the ConversionReview.

The API server stores v1beta1 and asks the operator's webhook server (`/convert`, admission.py serves it) to
convert whenever a client reads or writes the other version. Every conversion is lossless both ways:

- up (v1alpha1 -> v1beta1) sets apiVersion and derives LlamaModel's status.humanSize from status.size, the way
  the operator writes it;
- down (v1beta1 -> v1alpha1) drops status.humanSize, which v1alpha1 has no field for. When the dropped value is
  not what up-conversion would derive again (absent, or written by someone else), it is kept in the annotation
  FIELDS_ANNOTATION, as the Kubernetes guidance for fields a version lacks says, and up-conversion restores it.

A bad object is reported by `review` as the ConversionReview's `result.status: Failure` with one message per bad
object (the API server refuses the whole request with it); no exception leaves this module for a bad input.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from . import v1alpha1, v1beta1
from .bounds import truncate_message

KINDS = ("LlamaModel", "LlamaServer")
VERSIONS = (v1alpha1.API_VERSION, v1beta1.API_VERSION)
FIELDS_ANNOTATION = f"{v1beta1.GROUP}/v1beta1-fields"
"""On a v1alpha1 object: the v1beta1 fields it cannot hold, as JSON, when up-conversion could not derive them."""
REVIEW_API_VERSION = "apiextensions.k8s.io/v1"


class ConversionError(ValueError):
    """An object that cannot be converted; the message says which field and why."""


def _derived_human_size(status: dict[str, Any]) -> str | None:
    size = status.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return v1beta1.human_size(size)
    return None


def _annotations(obj: dict[str, Any]) -> dict[str, Any]:
    metadata = obj.setdefault("metadata", {})
    if not isinstance(metadata, dict):
        raise ConversionError("metadata must be an object")
    annotations = metadata.get("annotations")
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise ConversionError("metadata.annotations must be an object")
    return annotations


def _status(obj: dict[str, Any]) -> dict[str, Any] | None:
    status = obj.get("status")
    if status is not None and not isinstance(status, dict):
        raise ConversionError("status must be an object")
    return status


def _up(obj: dict[str, Any]) -> None:
    obj["apiVersion"] = v1beta1.API_VERSION
    if obj["kind"] != "LlamaModel":
        return
    annotations = _annotations(obj)
    kept = annotations.pop(FIELDS_ANNOTATION, None)
    status = _status(obj)
    if kept is None:
        derived = _derived_human_size(status or {})
        if derived is not None and status is not None:
            status["humanSize"] = derived
        return
    if not annotations:
        obj["metadata"].pop("annotations", None)
    try:
        fields = json.loads(kept)
    except (TypeError, ValueError):
        raise ConversionError(f"metadata.annotations[{FIELDS_ANNOTATION}] is not JSON") from None
    if not isinstance(fields, dict) or set(fields) - {"humanSize"}:
        raise ConversionError(f"metadata.annotations[{FIELDS_ANNOTATION}] may hold only humanSize")
    value = fields.get("humanSize")
    if value is not None and not isinstance(value, str):
        raise ConversionError(f"metadata.annotations[{FIELDS_ANNOTATION}]: humanSize must be a string")
    if value is not None:
        obj.setdefault("status", {})["humanSize"] = value


def _down(obj: dict[str, Any]) -> None:
    obj["apiVersion"] = v1alpha1.API_VERSION
    if obj["kind"] != "LlamaModel":
        return
    status = _status(obj)
    if status is None:
        return
    value = status.pop("humanSize", None)
    if value != _derived_human_size(status):
        annotations = _annotations(obj)
        obj["metadata"]["annotations"] = {**annotations, FIELDS_ANNOTATION: json.dumps({"humanSize": value})}


def convert(obj: Any, desired_api_version: str) -> dict[str, Any]:
    """`obj` (a LlamaModel or LlamaServer of either version, as a dict) in `desired_api_version`; a new dict."""
    if not isinstance(obj, dict):
        raise ConversionError("not an object")
    if obj.get("kind") not in KINDS:
        raise ConversionError(f"kind {obj.get('kind')!r} is not one of {', '.join(KINDS)}")
    for version in (obj.get("apiVersion"), desired_api_version):
        if version not in VERSIONS:
            raise ConversionError(f"apiVersion {version!r} is not one of {', '.join(VERSIONS)}")
    converted = copy.deepcopy(obj)
    if obj["apiVersion"] == desired_api_version:
        return converted
    if desired_api_version == v1beta1.API_VERSION:
        _up(converted)
    else:
        _down(converted)
    return converted


def _name(obj: Any, index: int) -> str:
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
        return f"object {index} ({obj.get('kind')} {metadata.get('namespace', '')}/{metadata['name']})"
    return f"object {index}"


def review(body: Any) -> dict[str, Any]:
    """The ConversionReview (apiextensions.k8s.io/v1) answering the request in `body`.

    All objects or none: the API server needs every object converted, so a bad one fails the review, and the
    message names each bad object (index, kind, namespace/name) with its problem."""
    request = body.get("request") if isinstance(body, dict) else None
    uid = request.get("uid", "") if isinstance(request, dict) else ""
    problems: list[str] = []
    converted: list[dict[str, Any]] = []
    if not isinstance(body, dict) or body.get("kind") != "ConversionReview":
        problems.append("not a ConversionReview")
    elif body.get("apiVersion") != REVIEW_API_VERSION:
        problems.append(f"ConversionReview apiVersion {body.get('apiVersion')!r}: only {REVIEW_API_VERSION}")
    elif not isinstance(request, dict) or not isinstance(request.get("objects"), list):
        problems.append("request.objects must be a list")
    else:
        desired = request.get("desiredAPIVersion")
        for index, obj in enumerate(request["objects"]):
            try:
                converted.append(convert(obj, desired))
            except ConversionError as exc:
                problems.append(f"{_name(obj, index)}: {exc}")
    result = {"status": "Failure", "message": truncate_message("; ".join(problems))} if problems else \
        {"status": "Success"}
    return {
        "apiVersion": REVIEW_API_VERSION,
        "kind": "ConversionReview",
        "response": {"uid": uid if isinstance(uid, str) else "",
                     "convertedObjects": [] if problems else converted, "result": result},
    }
