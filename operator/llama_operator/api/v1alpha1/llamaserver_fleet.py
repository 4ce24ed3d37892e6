"""How a LlamaServer's fleet is served and kept: its Service, scaling, disruption budget, the gateway's routing,
and the prompt cache kept across pod restarts. Parts of LlamaServerSpec (llamaserver_types.py)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, WithJsonSchema, model_validator

from ..base import ApiModel, Quantity
from ..bounds import Annotations
from ..cel import cel_schema, check_value
from .llamaserver_rules import BUDGET_RULES, DISRUPTION_RULES, SCALING_RULES


class ServiceSpec(ApiModel):
    """The Service in front of the replicas: the OpenAI-compatible endpoint."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(8080, ge=1, le=65535, description="Service port (the pods always listen on 8080).")
    annotations: Annotations | None = Field(None, description="Annotations for the Service.")


class ScalingSpec(ApiModel):
    """Replicas that follow the load, down to zero while idle: decided by the gateway (docs/gateway.md).

    With this set, the gateway is the one component that writes spec.replicas (through the scale subresource).
    A `kubectl scale` inside [minReplicas, maxReplicas] is kept for at least scaleDownDelaySeconds (and counts as
    activity for idleSeconds); a value outside is put back to the nearest bound.
    """

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SCALING_RULES)}

    min_replicas: int = Field(
        1, ge=0, le=1000, description="Fewest replicas; 0 lets the server scale to zero while idle (the gateway "
        "holds the first request while it scales up again).")
    max_replicas: int = Field(1, ge=1, le=1000, description="Most replicas the load may ask for.")
    target_in_flight: int | None = Field(
        None, ge=1, le=1024, description="In-flight requests per replica the autoscaler aims at (mean over "
        "windowSeconds); default: spec.parallel, else 4.")
    idle_seconds: int = Field(
        300, ge=1, le=604800, description="With minReplicas 0: seconds without any request before scaling to zero.")
    scale_down_delay_seconds: int = Field(
        60, ge=0, le=86400, description="A scale-down happens only when no higher replica count was wanted during "
        "this many seconds (no flapping); scale-ups are immediate.")
    window_seconds: int = Field(
        30, ge=1, le=3600, description="Seconds over which in-flight requests are averaged into the load.")


DisruptionBudget = Annotated[
    int | str,
    AfterValidator(lambda value: check_value(BUDGET_RULES, value)),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}],
                    "maxLength": 4, **cel_schema(BUDGET_RULES)}),
]
"""Pods (a number) or a percentage of spec.replicas (`50%`)."""


class DisruptionSpec(ApiModel):
    """The PodDisruptionBudget of a server with more than one replica: how many replicas a voluntary disruption
    (a node drain, a cluster upgrade) may take at once. Exactly one of the two."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(DISRUPTION_RULES)}

    max_unavailable: DisruptionBudget | None = Field(
        None, description="Replicas that may be down at once: a number or a percentage of spec.replicas.")
    min_available: DisruptionBudget | None = Field(
        None, description="Replicas that must stay up: a number or a percentage of spec.replicas.")

    @model_validator(mode="after")
    def _one_budget(self) -> DisruptionSpec:
        return check_value(DISRUPTION_RULES, self)


class RoutingSpec(ApiModel):
    """How the gateway spreads requests over this server's ready replicas."""

    strategy: Literal["LeastInFlight", "PrefixAffinity"] = Field(
        "LeastInFlight", description="LeastInFlight: the replica with the fewest requests in flight. "
        "PrefixAffinity: consistent hashing with bounded load over the prompt prefix, so one conversation keeps "
        "hitting the replica whose KV cache holds it, unless that replica is over loadBound times the mean load.")
    prefix_characters: int = Field(
        2048, ge=16, le=1048576, description="PrefixAffinity: characters of the prompt hashed (for chat: the "
        "messages up to and including the first user message).")
    load_bound: float = Field(
        1.25, ge=1.0, le=100.0, description="PrefixAffinity: no replica takes more than ceil(loadBound x mean "
        "in-flight) requests; past that the next replica on the ring gets the request.")


class PromptCacheSpec(ApiModel):
    """llama-server's prompt cache (the KV of each slot's last prompt) kept when a pod stops: saved to the served
    model's PersistentVolumeClaim cache when the pod drains (rollout, scale-down, scale to zero), restored into the
    next pod's slots before it is Ready, so a returning conversation does not pay its whole prefill again
    (docs/prompt-cache.md)."""

    persist: bool = Field(
        False, description="Save the slots' prompt caches when a pod drains and restore them when one starts. "
        "Needs one model (spec.modelRef) cached on a PersistentVolumeClaim (the LlamaModel's cache.type).")
    max_size: Quantity = Field(
        "1Gi", description="Most bytes of saved prompt caches kept for this server on the volume; the oldest "
        "files are deleted first. The model's cache must have this much room beyond the model (its cache.size; "
        "the default size leaves at least 1 GiB).")
