"""Reconciles one LlamaServer: validate, find its model, apply Deployment + Service, write status.

Create, update, resume, drift repair and the periodic resync all run this same function; server-side
apply makes it idempotent, so running it twice changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..api.errors import describe
from ..api.v1alpha1 import (
    Condition,
    DownloadStatus,
    LlamaModel,
    LlamaServer,
    LlamaServerSpec,
    LlamaServerStatus,
    MemoryEstimate,
)
from ..builders import build_deployment, build_service
from ..builders.args import model_problems, server_args
from ..builders.naming import model_name
from ..builders.objects import label_selector, selector_labels
from ..builders.quantity import parse_quantity
from ..builders.service import endpoint_url
from ..config import Settings
from ..contract import FETCH_CONTAINER, FETCH_DRAFT_CONTAINER
from ..fit import estimate_server
from ..flags.validate import validate_server_spec
from ..kube import DEPLOYMENTS, LLAMA_MODELS, LLAMA_SERVERS, PODS, SERVICES, Invalid
from ..metrics import PHASES, export_download, observe_server
from ..policy import tenant_problems
from .boundary import reconciled
from .chat_template import CONDITION as CHAT_TEMPLATE
from .chat_template import QUIET as CHAT_TEMPLATE_QUIET
from .chat_template import ChatModel, chat_template_condition
from .conditions import condition, merge_conditions, now_rfc3339, problem_event
from .context import Context
from .download import observe_download
from .fits import fits_condition, fits_event, gpu_nodes, memory_status
from .network import converge_network_policy
from .server_status import FleetStatus, fleet_status
from .trust import record_first_use

log = logging.getLogger(__name__)


def spec_problems(spec: LlamaServerSpec, namespace: str, settings: Settings) -> list[str]:
    """Problems the CRD schema cannot express (references, flags, cross-field rules); each names the field.

    The reconcile loop, `render` and the admission webhook all ask this one function.
    """
    problems = []
    refs = [("spec.modelRef", spec.model_ref)] if spec.model_ref is not None else []
    refs += [(f"spec.models[{index}].modelRef", entry.model_ref) for index, entry in enumerate(spec.models or [])]
    if spec.speculative is not None:
        refs.append(("spec.speculative.draftModelRef", spec.speculative.draft_model_ref))
    for path, ref in refs:
        if ref.namespace is not None and ref.namespace != namespace:
            problems.append(
                f"{path}.namespace: must be omitted or {namespace!r}; a LlamaServer can only "
                f"use LlamaModels in its own namespace (got {ref.namespace!r})"
            )
    problems += [str(error) for error in validate_server_spec(spec)]
    problems += tenant_problems(spec, settings)
    return problems


def _selector(server_name: str) -> str:
    return label_selector(selector_labels(server_name))


async def _observe(ctx: Context, namespace: str, name: str, desired: int) -> FleetStatus:
    deployment = await ctx.kube.get(DEPLOYMENTS, namespace, name)
    pods = await ctx.kube.list(PODS, namespace, label_selector=_selector(name)) if deployment else []
    return fleet_status(desired, deployment, pods)


@dataclass(frozen=True)
class Outcome:
    """What one reconcile found: the phase and message to report, its conditions, and the fleet observed.

    `endpoint`, `model_name` and `args` are reported only once the Deployment was built from them; otherwise
    the previous values stay in status.
    """

    phase: str
    message: str
    conditions: list[Condition]
    fleet: FleetStatus
    endpoint: str | None = None
    model_name: str | None = None
    args: list[str] | None = None
    memory: MemoryEstimate | None = None
    download: DownloadStatus | None = None


def parse_server(body: Mapping[str, Any], settings: Settings) -> tuple[LlamaServer | None, list[str]]:
    """The typed LlamaServer and every problem with it (schema, references, flags); problems name the field."""
    try:
        server = LlamaServer.model_validate(body)
    except ValidationError as exc:
        return None, describe(exc)
    return server, spec_problems(server.spec, server.metadata.namespace, settings)


def desired_replicas(body: Mapping[str, Any]) -> int:
    replicas = body.get("spec", {}).get("replicas", 1)
    return replicas if isinstance(replicas, int) and replicas >= 0 else 0


async def reconcile_server(body: Mapping[str, Any], ctx: Context) -> LlamaServerStatus:
    """Bring the cluster in line with one LlamaServer and return the status written."""
    return await _write(ctx, body, await _reconcile(body, ctx))


async def _reconcile(body: Mapping[str, Any], ctx: Context) -> Outcome:
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    server, problems = parse_server(body, ctx.settings)
    if server is None or problems:
        # Nothing is applied: the pods of the last good spec keep running.
        message = "; ".join(problems)
        invalid = condition("ArgsValid", False, "InvalidSpec", message, generation=generation)
        return Outcome("Failed", message, [invalid], await _observe(ctx, namespace, name, desired_replicas(body)))
    args_ok = condition("ArgsValid", True, "Valid", generation=generation)
    if server.spec.models is not None:
        from .router import reconcile_router  # router.py builds on this module's Outcome and model checks

        return await reconcile_router(server, ctx, args_ok)
    assert server.spec.model_ref is not None

    models: list[LlamaModel] = []
    refs = [server.spec.model_ref.name]
    if server.spec.speculative is not None:
        refs.append(server.spec.speculative.draft_model_ref.name)
    for ref in refs:
        model_body = await ctx.kube.get(LLAMA_MODELS, namespace, ref)
        parsed, model_problem = _parse_model(model_body, namespace, ref)
        if parsed is None:
            reason, message = model_problem or ("ModelNotReady", f"LlamaModel {namespace}/{ref} is not ready")
            return Outcome("Pending", message,
                           [condition("ModelResolved", False, reason, message, generation=generation), args_ok],
                           await _observe(ctx, namespace, name, server.spec.replicas))
        models.append(parsed)
    model, draft = models[0], (models[1] if len(models) > 1 else None)
    unbuildable = model_problems(draft)
    if unbuildable:
        # A combination of models the pod cannot be built from: a bad spec, not a crash of the reconcile.
        message = "; ".join(unbuildable)
        return Outcome("Failed", message,
                       [condition("ModelResolved", False, "DraftNotDownloadable", message, generation=generation),
                        args_ok],
                       await _observe(ctx, namespace, name, server.spec.replicas))
    model_ok = condition("ModelResolved", True, "ModelReady", generation=generation)
    fit = estimate_server(server.spec, model.status.gguf, draft.status.gguf if draft is not None else None)
    fits = fits_condition(server, fit, model.status.gguf, **await gpu_nodes(ctx, server), generation=generation)
    chat = chat_template_condition([ChatModel(model.metadata.name, server.spec.chat_template, model.status.gguf,
                                              server.spec.mode)], generation=generation)
    memory = memory_status(fit) if fit is not None else None

    # Read before applying: the Deployment's status is needed anyway, and an unchanged desired object whose live
    # copy is still what we applied is not sent again (a pod event costs reads, not writes).
    await converge_network_policy(ctx, server)  # before the pods: none of them starts unprotected
    live = await ctx.kube.get(DEPLOYMENTS, namespace, name)
    try:
        deployment = await ctx.kube.apply(build_deployment(server, model, ctx.settings, draft), live=live)
    except Invalid as exc:
        # The API server refused what we built from this spec (e.g. a malformed node label): retrying the
        # same write cannot help, the spec must change.
        return Outcome("Failed", f"the API server rejected the Deployment: {exc}", [model_ok, args_ok, fits, chat],
                       await _observe(ctx, namespace, name, server.spec.replicas), memory=memory)
    service = build_service(server)
    await ctx.kube.apply(service, live=await ctx.kube.get(SERVICES, namespace, service["metadata"]["name"]))
    pods = await ctx.kube.list(PODS, namespace, label_selector=_selector(name))
    await record_first_use(ctx, {FETCH_CONTAINER: model, FETCH_DRAFT_CONTAINER: draft}, pods)
    fleet = fleet_status(server.spec.replicas, deployment, pods)
    download = await observe_download(ctx, namespace, pods) if fleet.phase == "Downloading" else None
    message = f"{fleet.message} ({download.summary})" if download is not None else fleet.message
    return Outcome(fleet.phase, message, [model_ok, args_ok, fits, chat], fleet, endpoint=endpoint_url(server),
                   model_name=model_name(server), args=server_args(server, model, draft), memory=memory,
                   download=download)


def _parse_model(
    model_body: Mapping[str, Any] | None, namespace: str, name: str
) -> tuple[LlamaModel | None, tuple[str, str] | None]:
    """The referenced LlamaModel, typed, when it is ready to serve; else (None, (reason, message))."""
    if model_body is None:
        return None, ("ModelNotFound", f"LlamaModel {namespace}/{name} not found; waiting for it to be created")
    try:
        model = LlamaModel.model_validate(model_body)
    except ValidationError as exc:
        # Stored before the CRD schema (or this operator version) rejected it: say what is wrong with it.
        return None, ("ModelInvalid", f"LlamaModel {namespace}/{name} is invalid: {'; '.join(describe(exc))}")
    phase = model.status.phase or "Pending"
    if phase != "Ready" or not model.status.cache_key:
        detail = f": {model.status.message}" if model.status.message else ""
        return None, ("ModelNotReady", f"LlamaModel {namespace}/{name} is {phase}{detail}")
    return model, None


def _previous_status(body: Mapping[str, Any]) -> LlamaServerStatus:
    try:
        return LlamaServerStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return LlamaServerStatus()


def _observe_metrics(namespace: str, name: str, status: LlamaServerStatus, desired: int) -> None:
    PHASES.observe("LlamaServer", namespace, name, status.phase)
    memory = status.memory
    observe_server(namespace, name, desired=desired, ready=status.ready_replicas or 0,
                   host_bytes=int(parse_quantity(memory.host)) if memory else None,
                   gpu_bytes=int(parse_quantity(memory.gpu)) if memory and memory.gpu else None)
    download = status.download
    export_download(namespace, name, file=download.file if download else None,
                    done=download.bytes_done if download else None, total=download.bytes_total if download else None,
                    rate=download.bytes_per_second if download else None)


def _fleet_conditions(fleet: FleetStatus, desired: int, generation: int | None) -> list[Condition]:
    available = fleet.ready_replicas >= desired
    progressing = not available or fleet.updated_replicas < desired
    return [
        condition("Available", available, "MinimumReplicasAvailable" if available else "ReplicasNotReady",
                  f"{fleet.ready_replicas}/{desired} replicas ready", generation=generation),
        condition("Progressing", progressing, "RollingOut" if progressing else "Complete",
                  fleet.message if progressing else "", generation=generation),
    ]


GATEWAY_STATUS_FIELDS = ("autoscaling",)
"""Status written by the gateway's autoscaler (docs/gateway.md), never by the operator: left out of the operator's
merge patch, so the gateway's latest view stays whatever (older) copy this reconcile read."""


MODEL_STATUS_FIELDS = ("models", "modelsLoaded", "modelsChangedTime")
"""Status of a router-mode server's models, written by the model status poller (reconcile/router_status.py)
from the pods' /models: left out of the reconcile's patch like the gateway's."""


def _without_gateway(wire: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in wire.items()
            if key not in GATEWAY_STATUS_FIELDS and key not in MODEL_STATUS_FIELDS}


async def _write(ctx: Context, body: Mapping[str, Any], outcome: Outcome) -> LlamaServerStatus:
    meta = body["metadata"]
    generation = meta.get("generation")
    previous = _previous_status(body)
    desired = desired_replicas(body)
    fleet = outcome.fleet
    status = LlamaServerStatus.model_validate(
        {
            **previous.to_wire(),
            **LlamaServerStatus(endpoint=outcome.endpoint, model_name=outcome.model_name,
                                args=outcome.args, memory=outcome.memory).to_wire(),
            "phase": outcome.phase,
            "message": outcome.message,
            "download": outcome.download.to_wire() if outcome.download is not None else None,
            "observedGeneration": generation,
            "replicas": fleet.replicas,
            "readyReplicas": fleet.ready_replicas,
            "ready": f"{fleet.ready_replicas}/{desired}",
            "selector": _selector(meta["name"]),
            "conditions": [],
        }
    )
    reported = outcome.conditions + _fleet_conditions(fleet, desired, generation) + [reconciled(generation)]
    merged = merge_conditions(previous.conditions, reported, now=now_rfc3339())
    # Conditions not reported this time (e.g. ModelResolved while the spec is invalid) keep their last value.
    kept = [c for c in previous.conditions or [] if c.type not in {c.type for c in merged}]
    status.conditions = merged + kept
    _observe_metrics(meta["namespace"], meta["name"], status, desired)
    if status == previous:
        return status
    phase, message = outcome.phase, outcome.message
    if phase != previous.phase or (phase in ("Failed", "Pending") and message != previous.message):
        event_type = "Warning" if phase in ("Failed", "Degraded") else "Normal"
        ctx.record_event(body, type=event_type, reason=phase, message=message or f"LlamaServer is {phase}")
    fits_event(ctx, body, previous.conditions, status.conditions)
    problem_event(ctx, body, previous.conditions, status.conditions, CHAT_TEMPLATE, quiet=CHAT_TEMPLATE_QUIET)
    await ctx.kube.patch_status(LLAMA_SERVERS, meta["namespace"], meta["name"], _without_gateway(status.to_wire()),
                                previous=_without_gateway(previous.to_wire()))
    log.info("LlamaServer %s/%s is %s%s", meta["namespace"], meta["name"], phase, f": {message}" if message else "")
    return status
