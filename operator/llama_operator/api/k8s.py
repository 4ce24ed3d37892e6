"""Embedded Kubernetes core/v1 types (resources, tolerations, affinity, topology spread, env), typed as
Kubernetes types.

Only the fields a LlamaServer pod can meaningfully use are modelled; each one keeps its upstream name and
meaning so the values pass straight into the rendered pod spec.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import ApiModel, Quantity
from .bounds import (
    ENV_VALUE_MAX_LENGTH,
    LIST_MAX_ITEMS,
    NAME_MAX_LENGTH,
    SHORT_TEXT_MAX_LENGTH,
    Key,
    Labels,
    Resources,
    Value,
    Values,
)
from .cel import Rule, cel_schema, check_value


class ResourceRequirements(ApiModel):
    """Compute resources of the llama-server container (core/v1 ResourceRequirements)."""

    limits: Resources | None = Field(
        None, description="Maximum resources, e.g. {cpu: '8', memory: 16Gi}. GPUs come from spec.gpu."
    )
    requests: Resources | None = Field(
        None, description="Minimum resources the scheduler reserves, e.g. {cpu: '4', memory: 8Gi}."
    )


TOLERATION_RULES = (
    Rule("exists-needs-key", "!has(self.operator) || self.operator != 'Exists' || (has(self.key) && self.key != '')",
         lambda t: t.operator != "Exists" or bool(t.key),
         "operator Exists needs a key: without one it tolerates every taint (control-plane nodes and other "
         "teams' dedicated nodes included)", field="key"),
)


class Toleration(ApiModel):
    """A core/v1 Toleration: lets the pods schedule onto nodes with matching taints."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(TOLERATION_RULES)}

    key: Key | None = Field(None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: Value | None = Field(None, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        None, description="For NoExecute: how long the pod stays bound after the taint appears."
    )

    @model_validator(mode="after")
    def _rules(self) -> Toleration:
        return check_value(TOLERATION_RULES, self)


class LabelSelectorRequirement(ApiModel):
    """One label-selector expression (key, operator, values)."""

    key: Key = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="How key and values relate.")
    values: Values | None = Field(None, description="Values for In/NotIn.")


class LabelSelector(ApiModel):
    """A core label selector."""

    match_labels: Labels | None = Field(None, description="Labels that must all match.")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=LIST_MAX_ITEMS, description="Expressions that must all match."
    )


class NodeSelectorRequirement(ApiModel):
    """One node-selector expression."""

    key: Key = Field(description="Node label (or field) key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(
        description="How key and values relate."
    )
    values: Values | None = Field(None, description="Values for In/NotIn/Gt/Lt.")


class NodeSelectorTerm(ApiModel):
    """A node-selector term: all of its expressions must match."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        None, max_length=LIST_MAX_ITEMS, description="Requirements on node labels."
    )
    match_fields: list[NodeSelectorRequirement] | None = Field(
        None, max_length=LIST_MAX_ITEMS, description="Requirements on node fields.")


class NodeSelector(ApiModel):
    """Terms ORed together."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        max_length=LIST_MAX_ITEMS, description="Any one term must match.")


class PreferredSchedulingTerm(ApiModel):
    """A weighted node preference."""

    weight: int = Field(ge=1, le=100, description="Weight 1-100.")
    preference: NodeSelectorTerm = Field(description="The preferred node term.")


class NodeAffinity(ApiModel):
    """Node affinity rules."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        None, description="Hard node requirements."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = Field(
        None, max_length=LIST_MAX_ITEMS, description="Soft node preferences."
    )


class PodAffinityTerm(ApiModel):
    """Co-location rule relative to pods matching a selector."""

    label_selector: LabelSelector | None = Field(None, description="Pods this term refers to.")
    namespaces: Values | None = Field(None, description="Namespaces of those pods (default: this one).")
    namespace_selector: LabelSelector | None = Field(None, description="Namespaces by label.")
    topology_key: Key = Field(description="Node label defining the topology domain, e.g. kubernetes.io/hostname.")


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod (anti-)affinity preference."""

    weight: int = Field(ge=1, le=100, description="Weight 1-100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The term.")


class PodAffinity(ApiModel):
    """Pod affinity or anti-affinity rules."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        None, max_length=LIST_MAX_ITEMS, description="Hard rules."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(
        None, max_length=LIST_MAX_ITEMS, description="Soft rules."
    )


class Affinity(ApiModel):
    """A core/v1 Affinity for the server pods."""

    node_affinity: NodeAffinity | None = Field(None, description="Node affinity.")
    pod_affinity: PodAffinity | None = Field(None, description="Pod affinity.")
    pod_anti_affinity: PodAffinity | None = Field(None, description="Pod anti-affinity, e.g. spread replicas.")


class TopologySpreadConstraint(ApiModel):
    """A core/v1 TopologySpreadConstraint: how the replicas spread over a topology (nodes, zones)."""

    max_skew: int = Field(ge=1, le=1000, description="Most replicas one domain may have above the least loaded.")
    topology_key: Key = Field(description="Node label defining the domains, e.g. kubernetes.io/hostname.")
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        description="DoNotSchedule (a hard rule) or ScheduleAnyway (a preference).")
    label_selector: LabelSelector | None = Field(
        None, description="The pods counted in each domain (usually the server's own: "
        "app.kubernetes.io/name=llama-server, llamacpp.dev/server=<name>).")
    min_domains: int | None = Field(None, ge=1, le=1000, description="With DoNotSchedule: fewest eligible domains.")
    match_label_keys: Values | None = Field(
        None, description="Pod label keys whose values narrow the selector (e.g. pod-template-hash).")
    node_affinity_policy: Literal["Honor", "Ignore"] | None = Field(
        None, description="Whether nodeAffinity/nodeSelector limit the domains counted (default Honor).")
    node_taints_policy: Literal["Honor", "Ignore"] | None = Field(
        None, description="Whether tainted nodes the pods do not tolerate are counted (default Ignore).")


class KeySelector(ApiModel):
    """A key of a Secret or ConfigMap."""

    name: str = Field(max_length=NAME_MAX_LENGTH, description="Name of the Secret or ConfigMap in the same namespace.")
    key: str = Field(max_length=NAME_MAX_LENGTH, description="Key inside it.")
    optional: bool | None = Field(None, description="Whether it may be absent.")


class ObjectFieldSelector(ApiModel):
    """A field of the pod, e.g. metadata.name."""

    field_path: str = Field(max_length=SHORT_TEXT_MAX_LENGTH, description="Path of the field, e.g. status.podIP.")
    api_version: str | None = Field(None, max_length=64, description="Schema version of the field path.")


class ResourceFieldSelector(ApiModel):
    """A resource of a container, e.g. limits.cpu."""

    resource: str = Field(max_length=64, description="limits.cpu, requests.memory, ...")
    container_name: Value | None = Field(None, description="Container name (default: this one).")
    divisor: Quantity | None = Field(None, description="Output unit.")


class EnvVarSource(ApiModel):
    """Where an environment variable's value comes from."""

    secret_key_ref: KeySelector | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(None, description="A key of a ConfigMap.")
    field_ref: ObjectFieldSelector | None = Field(None, description="A pod field.")
    resource_field_ref: ResourceFieldSelector | None = Field(None, description="A container resource.")


class EnvVar(ApiModel):
    """A core/v1 EnvVar for the llama-server container."""

    name: str = Field(min_length=1, max_length=SHORT_TEXT_MAX_LENGTH, description="Variable name.")
    value: str | None = Field(None, max_length=ENV_VALUE_MAX_LENGTH, description="Literal value.")
    value_from: EnvVarSource | None = Field(None, description="Value from a Secret, ConfigMap or field.")


__all__ = [
    "Affinity",
    "EnvVar",
    "ResourceRequirements",
    "Toleration",
    "TopologySpreadConstraint",
]
