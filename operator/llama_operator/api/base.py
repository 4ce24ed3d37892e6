"""Shared pydantic base for every API type: camelCase on the wire, unknown fields rejected."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, WithJsonSchema
from pydantic.alias_generators import to_camel

from .cel import Rule, cel_schema, check_value


class ApiModel(BaseModel):
    """Base of every API object: camelCase aliases, strict about unknown fields.

    `extra="forbid"` mirrors what a structural CRD does with `kubectl apply --validate=strict`: a typo is
    an error, never silently dropped.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as Kubernetes stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


_QUANTITY_RE = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


QUANTITY_MAX_LENGTH = 64
"""maxLength of a quantity string: on an int-or-string node it bounds the string (a CEL `size(self)` rule would
be unbounded to the API server's cost estimator, which refuses it)."""


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and len(value) > QUANTITY_MAX_LENGTH:
        raise ValueError(f"a quantity is at most {QUANTITY_MAX_LENGTH} characters")
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (examples: 500m, 2, 8Gi)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "maxLength": QUANTITY_MAX_LENGTH}),
]
"""A Kubernetes resource quantity (`500m`, `2`, `8Gi`)."""



GPU_LAYERS_RULES = (
    Rule("gpu-layers", "type(self) != int || self >= 0", lambda v: not isinstance(v, int) or v >= 0,
         "must be >= 0, 'auto' or 'all'"),
    Rule("gpu-layers", "type(self) == int || self in ['auto', 'all']",
         lambda v: isinstance(v, int) or v in ("auto", "all"), "must be a number, 'auto' or 'all'"),
)

GpuLayers = Annotated[
    int | str,
    AfterValidator(lambda value: check_value(GPU_LAYERS_RULES, value)),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    **cel_schema(GPU_LAYERS_RULES)}),
]
"""Layers offloaded to the GPU: a number, `auto` or `all`."""

CONTEXT_SIZE_MAX = 16777216
"""The largest contextSize the API accepts (2^24 tokens)."""

CONTEXT_SIZE_RULES = (
    Rule("context-size", f"type(self) != int || (self >= 0 && self <= {CONTEXT_SIZE_MAX})",
         lambda v: not isinstance(v, int) or 0 <= v <= CONTEXT_SIZE_MAX, f"must be 0-{CONTEXT_SIZE_MAX} or 'auto'"),
    Rule("context-size", "type(self) == int || self == 'auto'",
         lambda v: isinstance(v, int) or v == "auto", "must be a number of tokens or 'auto'"),
)

ContextSize = Annotated[
    int | str,
    AfterValidator(lambda value: check_value(CONTEXT_SIZE_RULES, value)),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "maxLength": 16, **cel_schema(CONTEXT_SIZE_RULES)}),
]
"""--ctx-size: tokens (0: the model's trained context) or `auto`: the largest that fits the memory
(docs/memory-fit.md#contextsize-auto)."""
