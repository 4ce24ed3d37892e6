"""The plan of one LlamaServer: everything the operator wants for it, decided once, from the typed server, its
resolved LlamaModels and the settings. Pure.

`plan_server` is the one place that decides which objects a server gets (one model or router mode, the
NetworkPolicy or not, the PodDisruptionBudget or not, the InferencePool or not), their arguments, the names it
serves, its endpoint, its memory estimate and which of its fetchers record a trust-on-first-use checksum. The
reconcile applies and reports the plan, `render` prints its objects; neither builds anything itself. The spec has passed
`flags.spec.spec_problems` before it is planned; what the resolved models rule out comes back as a `PlanProblem`
instead of a plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..api.v1beta1 import LlamaModel, LlamaServer
from ..config import Settings
from ..contract import (
    FETCH_CONTAINER,
    FETCH_DRAFT_CONTAINER,
    RPC_WORKERS_ANNOTATION,
    adapter_fetch_container,
    router_fetch_container,
)
from ..errors import InvalidSpec
from ..fit import Estimate, estimate_server, settings_from_spec
from ..fit.split import NoPlacement, Placement, place
from ..flags.spec import adapter_problems, model_problems, prompt_cache_problems
from .args import server_args
from .context import memory_limit, resolve_context
from .deployment import deployment_object
from .distributed import (
    build_workers_network_policy,
    build_workers_service,
    build_workers_statefulset,
    leader_args,
    name_problem,
)
from .inference_pool import build_inference_pool, with_engine_type
from .naming import model_name, served_names
from .network_policy import build_network_policy
from .placement import build_disruption_budget
from .pod import pod_template
from .prompt_cache import home_model, room_problem
from .quantity import parse_quantity
from .resources import default_memory_request
from .router import build_preset_configmap, build_router_deployment, distinct_models, router_args
from .service import build_service, endpoint_url
from .trust import needs_trust


@dataclass(frozen=True)
class ServerPlan:
    """What one LlamaServer should be, as objects to apply and facts to report in its status."""

    objects: tuple[dict[str, Any], ...]
    """In apply order: the NetworkPolicy (when the operator makes one) before any pod can start, a router's preset
    ConfigMap before the Deployment whose pods mount it, the Deployment, its PodDisruptionBudget (more than one
    replica), the Service, its InferencePool (where the cluster serves them)."""
    args: list[str]
    """llama-server's arguments (status.args)."""
    served_names: list[str]
    """Every model name a request may use with this server."""
    model_name: str
    """status.modelName: what /v1/models lists (router mode: every served name, comma-separated)."""
    endpoint: str
    estimate: Estimate | None
    """The memory estimate (None in router mode, or when the model's status has no memory shape)."""
    trust: Mapping[str, LlamaModel]
    """Fetch container name -> the model it downloads, for each model verified by trust on first use."""
    server: LlamaServer | None = None
    """The server as planned, when it differs from the one given: contextSize auto replaced by its number."""
    context_auto: bool = False
    """contextSize was auto: `server.spec.context_size` is the largest that fits (builders/context.py)."""
    placement: Placement | None = None
    """With spec.distributed: the layers of the leader and of each worker (fit/split.py)."""

    def find(self, kind: str) -> dict[str, Any] | None:
        return next((obj for obj in self.objects if obj["kind"] == kind), None)

    @property
    def deployment(self) -> dict[str, Any]:
        found = self.find("Deployment")
        assert found is not None  # every plan has one, but a distributed server's while a worker does not run
        return found


@dataclass(frozen=True)
class Workers:
    """A distributed server's workers as the reconcile observed them (reconcile/workers.py)."""

    identity: str | None
    """Of the worker processes when every worker runs, else None: the leader's Deployment is then left out of the
    plan (unless the server is scaled to zero), so the leader is not created before its workers run, and a running
    leader is left as it is."""


@dataclass(frozen=True)
class PlanProblem:
    """Why no plan could be made from the resolved models; the condition it sets to False and why."""

    condition: Literal["ModelResolved", "ArgsValid", "Fits"]
    reason: str
    message: str


def plan_server(server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings,
                workers: Workers | None = None) -> ServerPlan | PlanProblem:
    """The plan of a valid server; `models` maps the name of every LlamaModel it references (spec.model_refs())
    to that model, resolved (status Ready with a cache key); `workers`: a distributed server's workers as observed
    (None: not observed, as `render` plans; the leader's Deployment is then in the plan)."""
    problems = model_problems(server.spec, models)
    if problems:
        return PlanProblem("ModelResolved", "DraftNotDownloadable", "; ".join(problems))
    problems = adapter_problems(server.spec, models)
    if problems:
        return PlanProblem("ModelResolved", "AdapterMismatch", "; ".join(problems))
    problems = prompt_cache_problems(server.spec, models, settings)
    if not problems:
        home = server.spec.model_ref.name if server.spec.model_ref is not None else home_model(server)
        problems = [p for p in [room_problem(server, models[home])] if p]
    if problems:
        return PlanProblem("ModelResolved", "PromptCacheNotKept", "; ".join(problems))
    if server.spec.models is not None:
        return _router_plan(server, models, settings)
    assert server.spec.model_ref is not None  # LlamaServerSpec: exactly one of modelRef and models
    speculative = server.spec.speculative
    draft = models[speculative.draft_model_ref.name] if speculative is not None else None
    adapters = tuple(models[adapter.name] for adapter in server.spec.adapters or [])
    if server.spec.distributed is not None:  # CEL: no draft, no adapters
        return _distributed_plan(server, models[server.spec.model_ref.name], settings, workers)
    return _one_model_plan(server, models[server.spec.model_ref.name], draft, settings, adapters)


def build_deployment(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None = None,
    adapters: tuple[LlamaModel, ...] = (),
) -> dict[str, Any]:
    """The Deployment of a one-model server as its plan has it; `draft` is the speculative draft model, if any,
    `adapters` its LoRA adapters (spec.adapters, in order)."""
    plan = _one_model_plan(server, model, draft, settings, adapters)
    if isinstance(plan, PlanProblem):
        raise InvalidSpec(plan.message)
    return plan.deployment


def _one_model_plan(
    server: LlamaServer, model: LlamaModel, draft: LlamaModel | None, settings: Settings,
    adapters: tuple[LlamaModel, ...] = (),
) -> ServerPlan | PlanProblem:
    resolved = resolve_context(server, model, draft)
    if isinstance(resolved, str):
        return PlanProblem("ArgsValid", "ContextDoesNotFit", resolved)
    auto = server.spec.context_size == "auto"
    server = resolved
    args = server_args(server, model, draft, adapters)
    fit = estimate_server(server.spec, model.status.gguf, draft.status.gguf if draft is not None else None,
                          adapter_bytes=sum(adapter.status.size or 0 for adapter in adapters))
    template = pod_template(server, model, settings, draft, args=args,
                            memory=default_memory_request(server, settings, fit), adapters=adapters)
    fetchers = {FETCH_CONTAINER: model, **({FETCH_DRAFT_CONTAINER: draft} if draft is not None else {}),
                **{adapter_fetch_container(index): adapter for index, adapter in enumerate(adapters)}}
    plan = _plan(server, settings, [deployment_object(server, template)], args=args, estimate=fit, fetchers=fetchers)
    return replace(plan, server=server, context_auto=auto)


def _distributed_plan(server: LlamaServer, model: LlamaModel, settings: Settings,
                      workers: Workers | None) -> ServerPlan | PlanProblem:
    """The leader's Deployment (once every worker runs), the workers and what guards them (builders/distributed.py)."""
    spec = server.spec.distributed
    assert spec is not None
    problem = name_problem(server)
    if problem is not None:
        return PlanProblem("ArgsValid", "NameTooLong", problem)
    leader_image = server.spec.image or settings.rpc_image_for(None)
    worker_image = server.spec.image or settings.rpc_image_for(spec.gpu.vendor if spec.gpu else None)
    if leader_image is None or worker_image is None:
        accel = spec.gpu.vendor if spec.gpu is not None and leader_image is not None else "cpu"
        return PlanProblem("ArgsValid", "NoRpcImage", f"spec.distributed needs llama.cpp built with GGML_RPC=ON, "
                           f"which upstream's images are not: the operator has no such image for {accel} (the "
                           f"chart's rpcImages.{accel}; the image scripts/build-images.sh makes has it), or set "
                           "spec.image to one (docs/distributed.md)")
    resolved = resolve_context(server, model, None)
    if isinstance(resolved, str):
        return PlanProblem("ArgsValid", "ContextDoesNotFit", resolved)
    auto, server = server.spec.context_size == "auto", resolved
    gguf = model.status.gguf
    if gguf is None or gguf.memory is None:
        return PlanProblem("Fits", "NoEstimate", f"LlamaModel {model.metadata.name} has no memory shape in its "
                           "status (read from the GGUF header when the model resolves; a volume source is not read): "
                           "its layers cannot be placed on the workers")
    worker_memory = spec.gpu.memory if spec.gpu is not None else spec.memory
    placement = place(gguf.memory, settings_from_spec(server.spec), workers=spec.workers,
                      worker_memory=int(parse_quantity(worker_memory)), leader_memory=memory_limit(server.spec),
                      trained_context=gguf.context_length, worker_memory_text=worker_memory,
                      gpu_workers=spec.gpu is not None)
    if isinstance(placement, NoPlacement):
        return PlanProblem("Fits", "WorkersTooSmall", placement.message)
    args = [*server_args(server, model), *leader_args(server, placement)]
    fit = estimate_server(server.spec, gguf)
    fit = replace(fit, devices=[placement.leader]) if fit is not None else None
    leader_settings = replace(settings, images={**settings.images, "cpu": leader_image})
    guard = [build_workers_network_policy(server), build_workers_service(server),
             build_workers_statefulset(server, worker_image, settings)]
    leader: list[dict[str, Any]] = []
    if workers is None or workers.identity is not None or server.spec.replicas == 0:
        template = pod_template(server, model, leader_settings, None, args=args,
                                memory=default_memory_request(server, settings, fit))
        if workers is not None and workers.identity is not None:
            annotations = template["metadata"].setdefault("annotations", {})
            annotations[RPC_WORKERS_ANNOTATION] = workers.identity
        leader = [deployment_object(server, template)]
    plan = _plan(server, settings, [*guard, *leader], args=args, estimate=fit,
                 fetchers={FETCH_CONTAINER: model})
    return replace(plan, server=server, context_auto=auto, placement=placement)


def _router_plan(server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings) -> ServerPlan | PlanProblem:
    try:
        # The preset first: the pods of the new template mount it.
        objects = [build_preset_configmap(server, models, settings), build_router_deployment(server, models, settings)]
    except InvalidSpec as exc:
        return PlanProblem("ArgsValid", "InvalidSpec", f"the preset cannot be written: {exc}")
    fetchers = {router_fetch_container(index): models[name] for index, name in enumerate(distinct_models(server))}
    # Which models are loaded together changes at run time: no one estimate holds (docs/multi-model.md).
    return _plan(server, settings, objects, args=router_args(server), estimate=None, fetchers=fetchers)


def _plan(
    server: LlamaServer, settings: Settings, workload: list[dict[str, Any]], *, args: list[str],
    estimate: Estimate | None, fetchers: Mapping[str, LlamaModel],
) -> ServerPlan:
    policy = build_network_policy(server, settings)
    budget = build_disruption_budget(server)
    pool = build_inference_pool(server, settings.inference_pool)
    if pool is not None:  # its endpoint picker finds llama.cpp's metric names by the pods' engine-type label
        workload = [with_engine_type(obj) if obj["kind"] == "Deployment" else obj for obj in workload]
    return ServerPlan(
        objects=(*([policy] if policy is not None else []), *workload, *([budget] if budget is not None else []),
                 build_service(server), *([pool] if pool is not None else [])),
        args=args,
        served_names=served_names(server),
        model_name=model_name(server),
        endpoint=endpoint_url(server),
        estimate=estimate,
        trust={container: model for container, model in fetchers.items() if needs_trust(model)},
    )
