"""Reconciles one LlamaServer: observe -> resolve its models -> plan -> apply -> status.

Create, update, resume, drift repair and the periodic resync all run this same function; server-side apply makes
it idempotent, so running it twice changes nothing. The body is parsed once, at the edge (`observe`); what the
server should be is decided by one pure plan (builders/plan.py) for one model and router mode alike; this module
only reads, applies and reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..api.errors import describe
from ..api.v1beta1 import (
    Condition,
    DistributedStatus,
    DownloadStatus,
    LlamaModel,
    LlamaServer,
    LlamaServerStatus,
    MemoryEstimate,
)
from ..builders.helper_image import with_live_helper_image
from ..builders.objects import label_selector, selector_labels
from ..builders.plan import PlanProblem, ServerPlan, Workers, plan_server
from ..builders.quantity import parse_quantity
from ..builders.router_memory import served_estimates
from ..clock import now_rfc3339
from ..config import Settings
from ..flags.spec import spec_problems
from ..kube import DEPLOYMENTS, KINDS_BY_API, LLAMA_MODELS, LLAMA_SERVERS, PODS, SERVICES, Invalid, ResourceKind
from ..metrics import PHASES, export_download, observe_server
from .boundary import reconciled
from .chat_template import CONDITION as CHAT_TEMPLATE
from .chat_template import QUIET as CHAT_TEMPLATE_QUIET
from .chat_template import chat_models, chat_template_condition
from .conditions import condition, merge_conditions, problem_event
from .context import Context
from .download import observe_download
from .fits import fits_condition, fits_event, gpu_nodes, memory_status, oom_condition
from .network import remove_disruption_budget, remove_inference_pool, remove_network_policy
from .server_status import FleetStatus, fleet_status
from .trust import record_first_use
from .workers import distributed_status, identity, observe_workers, placement_note, waiting_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observed:
    """One LlamaServer as this reconcile read it, parsed once: its identity, the typed server (None when the body
    does not parse), every problem of its spec (empty: valid), the replicas it asks for and its previous status."""

    body: Mapping[str, Any]
    namespace: str
    name: str
    generation: int | None
    replicas: int
    server: LlamaServer | None
    problems: list[str]
    previous: LlamaServerStatus


def observe(body: Mapping[str, Any], settings: Settings) -> Observed:
    meta = body["metadata"]
    try:
        server: LlamaServer | None = LlamaServer.model_validate(body)
    except ValidationError as exc:
        server, problems = None, describe(exc)
    else:
        problems = spec_problems(server.spec, server.metadata.namespace, settings)
    replicas = (body.get("spec") or {}).get("replicas", 1)
    try:
        previous = LlamaServerStatus.model_validate(body.get("status") or {})
    except ValidationError:
        previous = LlamaServerStatus()
    return Observed(body=body, namespace=meta["namespace"], name=meta["name"], generation=meta.get("generation"),
                    replicas=replicas if isinstance(replicas, int) and replicas >= 0 else 0, server=server,
                    problems=problems, previous=previous)


def _selector(server_name: str) -> str:
    return label_selector(selector_labels(server_name))


async def _read(ctx: Context, kind: ResourceKind, namespace: str, name: str) -> dict[str, Any] | None:
    """An object the server owns as the watch last saw it (reconcile/watched.py); read from the API server only
    where no watch runs (the NetworkPolicy and the PodDisruptionBudget; unit tests without kopf)."""
    if ctx.watched.attached and kind in (DEPLOYMENTS, SERVICES):
        return ctx.watched.owned(kind.plural, namespace, name)
    return await ctx.kube.get(kind, namespace, name)


async def _pods(ctx: Context, namespace: str, server: str) -> list[dict[str, Any]]:
    """The pods the server's Deployment selects, from the watch (a LIST only where no watch runs)."""
    if ctx.watched.attached:
        return ctx.watched.server_pods(namespace, server)
    return await ctx.kube.list(PODS, namespace, label_selector=_selector(server))


async def _fleet(ctx: Context, observed: Observed) -> FleetStatus:
    deployment = await _read(ctx, DEPLOYMENTS, observed.namespace, observed.name)
    pods = await _pods(ctx, observed.namespace, observed.name) if deployment else []
    return fleet_status(observed.replicas, deployment, pods)


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
    distributed: DistributedStatus | None = None


async def reconcile_server(body: Mapping[str, Any], ctx: Context) -> LlamaServerStatus:
    """Bring the cluster in line with one LlamaServer and return the status written."""
    observed = observe(body, ctx.settings)
    return await _write(ctx, observed, await _reconcile(observed, ctx))


async def _reconcile(observed: Observed, ctx: Context) -> Outcome:
    generation = observed.generation
    server = observed.server
    if server is None or observed.problems:
        # Nothing is applied: the pods of the last good spec keep running.
        message = "; ".join(observed.problems)
        invalid = condition("ArgsValid", False, "InvalidSpec", message, generation=generation)
        return Outcome("Failed", message, [invalid], await _fleet(ctx, observed))
    args_ok = condition("ArgsValid", True, "Valid", generation=generation)
    models = await _resolve(ctx, server)
    if isinstance(models, tuple):
        reason, message = models
        return Outcome("Pending", message, [condition("ModelResolved", False, reason, message, generation=generation),
                                            args_ok], await _fleet(ctx, observed))
    ready = f"{len(models)} LlamaModel(s) ready" if server.spec.models is not None else ""
    model_ok = condition("ModelResolved", True, "ModelReady", ready, generation=generation)
    workers = await observe_workers(ctx, server) if server.spec.distributed is not None else None
    plan = plan_server(server, models, ctx.settings, Workers(identity(workers)) if workers is not None else None)
    if isinstance(plan, PlanProblem):
        # A combination the pods cannot be built from: a bad spec, not a crash of the reconcile.
        failed = condition(plan.condition, False, plan.reason, plan.message, generation=generation)
        reported = {"ModelResolved": [failed, args_ok], "ArgsValid": [model_ok, failed]}.get(
            plan.condition, [model_ok, args_ok, failed])
        return Outcome("Failed", plan.message, reported, await _fleet(ctx, observed))
    served = models[server.spec.model_ref.name] if server.spec.model_ref is not None else None
    nodes = await gpu_nodes(ctx, server) if plan.estimate is not None else {}
    fits = fits_condition(plan.server or server, plan.estimate, served.status.gguf if served else None, **nodes,
                          context_auto=plan.context_auto, generation=generation,
                          estimates=served_estimates(server, models) if server.spec.models is not None else None)
    if plan.placement is not None:  # the estimate is the leader's: say where the layers went
        fits = fits.model_copy(update={"message": "; ".join(filter(None, [
            f"leader: {fits.message}" if fits.message else "", placement_note(plan.placement, server)]))})
    chat = chat_template_condition(chat_models(server, models), generation=generation)
    memory = memory_status(plan.estimate) if plan.estimate is not None else None
    reported = [model_ok, args_ok, fits, chat]
    deployment = await _apply(ctx, server, plan)
    if isinstance(deployment, str):
        return Outcome("Failed", deployment, reported, await _fleet(ctx, observed), memory=memory)
    if plan.find("Deployment") is None:  # a distributed server's leader, left as it is until its workers run
        deployment = await _read(ctx, DEPLOYMENTS, observed.namespace, observed.name) or {}
    pods = await _pods(ctx, observed.namespace, observed.name)
    await record_first_use(ctx, plan.trust, pods)
    fleet = fleet_status(observed.replicas, deployment, pods)
    download = await observe_download(ctx, observed.namespace, pods) if fleet.phase == "Downloading" else None
    message = f"{fleet.message} ({download.summary})" if download is not None else fleet.message
    if fleet.oom is not None and server.spec.models is None:  # the kernel's verdict outranks the estimate's
        fits = oom_condition(plan.server or server, fleet.oom, plan.estimate, generation=generation)
        reported = [model_ok, args_ok, fits, chat]
        message = f"{message}; {fits.message}" if message else fits.message
    phase, split = fleet.phase, None
    if workers is not None:
        split = distributed_status(server, plan.placement, workers)
        waiting = waiting_message(workers)
        if waiting is not None and fleet.ready_replicas == 0 and observed.replicas > 0:
            phase, message = "Pending", waiting  # a leader without its workers crash-loops: the cause is theirs
    return Outcome(phase, message, reported, fleet, endpoint=plan.endpoint, model_name=plan.model_name,
                   args=plan.args, memory=memory, download=download, distributed=split)


async def _resolve(ctx: Context, server: LlamaServer) -> dict[str, LlamaModel] | tuple[str, str]:
    """Every LlamaModel the server references, by name, each ready to serve; else (reason, message) of the first
    that is not."""
    namespace = server.metadata.namespace
    models: dict[str, LlamaModel] = {}
    for _, ref in server.spec.model_refs():
        if ref.name not in models:
            body = (ctx.watched.model(namespace, ref.name) if ctx.watched.attached
                    else await ctx.kube.get(LLAMA_MODELS, namespace, ref.name))
            model = _ready_model(body, namespace, ref.name)
            if isinstance(model, tuple):
                return model
            models[ref.name] = model
    return models


async def _apply(ctx: Context, server: LlamaServer, plan: ServerPlan) -> dict[str, Any] | str:
    """Apply the plan's objects in order (each read first, from the watch where one runs: an unchanged one is not
    sent again, and a pod event costs no request); returns the Deployment as stored, or why the API server
    refused an object."""
    if plan.find("NetworkPolicy") is None:
        await remove_network_policy(ctx, server)  # made while the setting was on
    if plan.find("PodDisruptionBudget") is None:
        await remove_disruption_budget(ctx, server)  # made while it had more than one replica
    if plan.find("InferencePool") is None:
        await remove_inference_pool(ctx, server)  # made before the setting turned pools off
    stored: dict[str, Any] = {}
    for obj in plan.objects:
        kind = KINDS_BY_API[(obj["apiVersion"], obj["kind"])]
        live = await _read(ctx, kind, obj["metadata"]["namespace"], obj["metadata"]["name"])
        try:
            if obj["kind"] == "Deployment":
                obj = await _keep_helper_image(ctx, obj, live)
            applied = await ctx.kube.apply(obj, live=live)
        except Invalid as exc:
            # What we built from this spec was refused (e.g. a malformed node label): retrying the same write
            # cannot help, the spec must change.
            return f"the API server rejected the {obj['kind']}: {exc}"
        if obj["kind"] == "Deployment":
            stored = applied
    return stored


async def _keep_helper_image(ctx: Context, desired: dict[str, Any], live: Mapping[str, Any] | None
                             ) -> dict[str, Any]:
    """The Deployment to apply: with the operator image its pods run now, instead of this operator's, when nothing
    else in its pod template would change (builders/helper_image.py). The API server decides what "would change"
    means (defaults, quantities, fields no longer set): a dry-run apply, compared with the stored template; sent
    once per server after an operator upgrade, then our own apply record answers."""
    pinned = with_live_helper_image(desired, live, ctx.settings.fetcher_image)
    if pinned is None or live is None or ctx.kube.covers(pinned, live):
        return pinned or desired
    meta = desired["metadata"]
    stored = await ctx.kube.get(DEPLOYMENTS, meta["namespace"], meta["name"])
    would = await ctx.kube.apply(pinned, dry_run=True)
    if stored is None or (would.get("spec") or {}).get("template") != (stored.get("spec") or {}).get("template"):
        return desired
    log.info("LlamaServer %s/%s: its pods keep the operator image they run (nothing else in their template "
             "changed)", meta["namespace"], meta["name"])
    return pinned


MODEL_PROBLEMS = frozenset({"ModelFailed", "ModelInvalid"})
"""ModelResolved reasons that need a person: the server's event about them is a Warning."""


def _ready_model(
    model_body: Mapping[str, Any] | None, namespace: str, name: str
) -> LlamaModel | tuple[str, str]:
    """The referenced LlamaModel, typed, when it is ready to serve; else (reason, message)."""
    if model_body is None:
        return "ModelNotFound", f"LlamaModel {namespace}/{name} not found; waiting for it to be created"
    try:
        model = LlamaModel.model_validate(model_body)
    except ValidationError as exc:
        # Stored before the CRD schema (or this operator version) rejected it: say what is wrong with it.
        return "ModelInvalid", f"LlamaModel {namespace}/{name} is invalid: {'; '.join(describe(exc))}"
    phase = model.status.phase or "Pending"
    if phase != "Ready" or not model.status.cache_key:
        detail = f": {model.status.message}" if model.status.message else ""
        return ("ModelFailed" if phase == "Failed" else "ModelNotReady",
                f"LlamaModel {namespace}/{name} is {phase}{detail}")
    return model


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
                  "; ".join(filter(None, [fleet.message, fleet.rollout])) if progressing else "",
                  generation=generation),
    ]


GATEWAY_STATUS_FIELDS = ("autoscaling",)
"""Status written by the gateway's autoscaler (docs/gateway.md), never by the operator: left out of the operator's
merge patch, so the gateway's latest view stays whatever (older) copy this reconcile read."""


MODEL_STATUS_FIELDS = ("models", "modelsLoaded", "modelsMemory", "modelsChangedTime")
"""Status of a router-mode server's models, written by the model status poller (reconcile/router_status.py)
from the pods' /models: left out of the reconcile's patch like the gateway's."""


def _without_gateway(wire: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in wire.items()
            if key not in GATEWAY_STATUS_FIELDS and key not in MODEL_STATUS_FIELDS}


async def _write(ctx: Context, observed: Observed, outcome: Outcome) -> LlamaServerStatus:
    body, generation, previous, desired = observed.body, observed.generation, observed.previous, observed.replicas
    namespace, name = observed.namespace, observed.name
    fleet = outcome.fleet
    status = LlamaServerStatus.model_validate(
        {
            **previous.to_wire(),
            **LlamaServerStatus(endpoint=outcome.endpoint, model_name=outcome.model_name,
                                args=outcome.args, memory=outcome.memory,
                                distributed=outcome.distributed).to_wire(),
            "phase": outcome.phase,
            "message": outcome.message,
            "download": outcome.download.to_wire() if outcome.download is not None else None,
            "distributed": outcome.distributed.to_wire() if outcome.distributed is not None else None,
            "observedGeneration": generation,
            "replicas": fleet.replicas,
            "readyReplicas": fleet.ready_replicas,
            "ready": f"{fleet.ready_replicas}/{desired}",
            "selector": _selector(name),
            "conditions": [],
        }
    )
    reported = outcome.conditions + _fleet_conditions(fleet, desired, generation) + [reconciled(generation)]
    merged = merge_conditions(previous.conditions, reported, now=now_rfc3339())
    # Conditions not reported this time (e.g. ModelResolved while the spec is invalid) keep their last value.
    kept = [c for c in previous.conditions or [] if c.type not in {c.type for c in merged}]
    status.conditions = merged + kept
    _observe_metrics(namespace, name, status, desired)
    if status == previous:
        return status
    phase, message = outcome.phase, outcome.message
    if phase != previous.phase or (phase in ("Failed", "Pending") and message != previous.message):
        # A server Pending on a model that failed (or no longer parses) waits for someone to fix that model.
        waits_on_a_fix = any(c.status == "False" and c.reason in MODEL_PROBLEMS for c in outcome.conditions)
        event_type = "Warning" if phase in ("Failed", "Degraded") or waits_on_a_fix else "Normal"
        ctx.record_event(body, type=event_type, reason=phase, message=message or f"LlamaServer is {phase}")
    fits_event(ctx, body, previous.conditions, status.conditions)
    problem_event(ctx, body, previous.conditions, status.conditions, CHAT_TEMPLATE, quiet=CHAT_TEMPLATE_QUIET)
    await ctx.kube.patch_status(LLAMA_SERVERS, namespace, name, _without_gateway(status.to_wire()),
                                previous=_without_gateway(previous.to_wire()))
    log.info("LlamaServer %s/%s is %s%s", namespace, name, phase, f": {message}" if message else "")
    return status
