"""Types both kinds share: the API group and version, name patterns, Secret references, conditions, metadata."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ...contract import GROUP, SPLIT_GGUF_RE  # noqa: F401 - SPLIT_GGUF_RE re-exported
from ..base import ApiModel
from ..bounds import NAME_MAX_LENGTH, Message

VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SHA256_HEX = r"^[a-f0-9]{64}$"
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""Every model name a LlamaServer serves (spec.alias, spec.models[].alias, and the LlamaModel name they default
to): no `/` (the gateway routes `<name>` and must not be squatted with `team-b/prod`), no `:` tag and no `]`
(router mode writes it as a preset section name that llama-server keeps as written)."""
SERVED_NAME_MAX_LENGTH = 253

ServedName = Annotated[str, Field(min_length=1, max_length=SERVED_NAME_MAX_LENGTH, pattern=SERVED_NAME_PATTERN)]


class SecretKeyRef(ApiModel):
    """A key of a Secret in the resource's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")
    key: str = Field(min_length=1, max_length=NAME_MAX_LENGTH, pattern=r"^[-._a-zA-Z0-9]+$",
                     description="Key inside the Secret.")


class SecretRef(ApiModel):
    """A whole Secret in the resource's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Secret name.")


class Condition(ApiModel):
    """A status condition in the Kubernetes convention."""

    type: str = Field(description="Condition type, e.g. Ready, ArgsValid, Available.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word for machines.")
    message: Message = Field("", description="What a person needs to know.")
    last_transition_time: str | None = Field(None, description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The metadata.generation this was computed for.")


class ObjectMeta(ApiModel):
    """The parts of metadata the operator reads."""

    model_config = {**ApiModel.model_config, "extra": "ignore"}

    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
