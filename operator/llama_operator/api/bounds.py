"""Bounds of every string, list and map a spec may hold (docs/api.md, "Bounds"), and of every message the
operator writes into status, said once.

The API server refuses a longer value at `kubectl apply` (maxLength, maxItems, maxProperties in the generated
CRDs) and estimates every CEL rule's cost from these bounds; the operator, `render` and the webhook check the
same bounds through pydantic. Map keys are bounded too: api/crd.py turns their bound into a CEL rule.

Messages (status.message, conditions[].message, per-model messages) echo what a tenant wrote and what a remote
host answered; `truncate_message` cuts each to MESSAGE_MAX_LENGTH when it is serialized, however the status
object was built, so a status write is never refused for its size (docs/security.md, "Strings, messages and
status").
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PlainSerializer

from .base import Quantity

NAME_MAX_LENGTH = 253
"""An object name (DNS subdomain): Secrets, PVCs, LlamaModels, classes."""
LABEL_VALUE_MAX_LENGTH = 63
KEY_MAX_LENGTH = 317
"""A label or annotation key, a node field: a DNS-subdomain prefix (253), '/', a name (63)."""
SHORT_TEXT_MAX_LENGTH = 256
"""Short free-form strings: a repository id, a revision, a field path, an environment variable name."""
PATH_MAX_LENGTH = 1024
"""A file path inside a repository, a volume or the HostPath root."""
URL_MAX_LENGTH = 2048
IMAGE_MAX_LENGTH = 512
"""A container image reference (registry/repository:tag@sha256:digest)."""
ENV_VALUE_MAX_LENGTH = 8192
"""An environment variable's literal value."""
ANNOTATION_VALUE_MAX_LENGTH = 4096
LIST_MAX_ITEMS = 32
"""Lists with no bound of their own (tolerations, affinity terms, selector values, ...)."""
ENV_MAX_ITEMS = 64
MAP_MAX_PROPERTIES = 64
"""Maps: node selector, pod labels and annotations, Service annotations, resources, match labels."""

Key = Annotated[str, Field(min_length=1, max_length=KEY_MAX_LENGTH)]
Value = Annotated[str, Field(max_length=LABEL_VALUE_MAX_LENGTH)]
Values = Annotated[list[Value], Field(max_length=LIST_MAX_ITEMS)]
Labels = Annotated[dict[Key, Value], Field(max_length=MAP_MAX_PROPERTIES)]
"""Label keys and values (node selector, pod labels, match labels)."""
Annotations = Annotated[dict[Key, Annotated[str, Field(max_length=ANNOTATION_VALUE_MAX_LENGTH)]],
                        Field(max_length=MAP_MAX_PROPERTIES)]
Resources = Annotated[dict[Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH)], Quantity],
                      Field(max_length=MAP_MAX_PROPERTIES)]
"""A resource list (cpu, memory, ...)."""
Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH,
                            pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")]
"""An object name: a DNS subdomain."""

MESSAGE_MAX_LENGTH = 2048
"""Characters of one message in status (and of one admission refusal); the rest is cut with a note."""


def truncate_message(text: str, limit: int = MESSAGE_MAX_LENGTH) -> str:
    """`text` if it fits in `limit` characters, else its head and how many characters were cut."""
    if len(text) <= limit:
        return text
    note = " ... ({} more characters)"
    keep = limit - len(note.format(len(text)))
    return text[:keep] + note.format(len(text) - keep)


Message = Annotated[str, PlainSerializer(truncate_message, return_type=str),
                    Field(json_schema_extra={"maxLength": MESSAGE_MAX_LENGTH})]
"""A message the operator writes into status: cut to MESSAGE_MAX_LENGTH when serialized."""
