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
from ..contract import FETCH_CONTAINER, FETCH_DRAFT_CONTAINER, adapter_fetch_container, router_fetch_container
from ..errors import InvalidSpec
from ..fit import Estimate, estimate_server
from ..flags.spec import adapter_problems, model_problems, prompt_cache_problems
from .args import server_args
from .context import resolve_context
from .deployment import deployment_object
from .inference_pool import build_inference_pool, with_engine_type
from .naming import model_name, served_names
from .network_policy import build_network_policy
from .placement import build_disruption_budget
from .pod import pod_template
from .prompt_cache import room_problem
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

    def find(self, kind: str) -> dict[str, Any] | None:
        return next((obj for obj in self.objects if obj["kind"] == kind), None)

    @property
    def deployment(self) -> dict[str, Any]:
        found = self.find("Deployment")
        assert found is not None  # every plan has one
        return found


@dataclass(frozen=True)
class PlanProblem:
    """Why no plan could be made from the resolved models; the condition it sets to False and why."""

    condition: Literal["ModelResolved", "ArgsValid"]
    reason: str
    message: str


def plan_server(server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings) -> ServerPlan | PlanProblem:
    """The plan of a valid server; `models` maps the name of every LlamaModel it references (spec.model_refs())
    to that model, resolved (status Ready with a cache key)."""
    problems = model_problems(server.spec, models)
    if problems:
        return PlanProblem("ModelResolved", "DraftNotDownloadable", "; ".join(problems))
    problems = adapter_problems(server.spec, models)
    if problems:
        return PlanProblem("ModelResolved", "AdapterMismatch", "; ".join(problems))
    problems = prompt_cache_problems(server.spec, models, settings)
    if not problems and server.spec.model_ref is not None:
        problems = [p for p in [room_problem(server, models[server.spec.model_ref.name])] if p]
    if problems:
        return PlanProblem("ModelResolved", "PromptCacheNotKept", "; ".join(problems))
    if server.spec.models is not None:
        return _router_plan(server, models, settings)
    assert server.spec.model_ref is not None  # LlamaServerSpec: exactly one of modelRef and models
    speculative = server.spec.speculative
    draft = models[speculative.draft_model_ref.name] if speculative is not None else None
    adapters = tuple(models[adapter.name] for adapter in server.spec.adapters or [])
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
