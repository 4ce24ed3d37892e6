"""Reconciles a router-mode LlamaServer (spec.models): every model ready, then preset, Deployment, Service.

The single-model reconcile (server.py) hands over here once the spec is valid; the outcome is reported the
same way. The per-model load state in status is not this module's: the model status poller reads it from the
pods (router_status.py).
"""

from __future__ import annotations

from ..api.v1alpha1 import Condition, LlamaModel, LlamaServer
from ..builders.naming import model_name
from ..builders.router import build_preset_configmap, build_router_deployment, distinct_models, router_args
from ..builders.service import build_service, endpoint_url
from ..contract import router_fetch_container
from ..errors import InvalidSpec
from ..kube import CONFIG_MAPS, DEPLOYMENTS, LLAMA_MODELS, PODS, SERVICES, Invalid
from .chat_template import ChatModel, chat_template_condition
from .conditions import condition
from .context import Context
from .network import converge_network_policy
from .server import Outcome, _observe, _parse_model, _selector
from .server_status import fleet_status
from .trust import record_first_use


async def reconcile_router(server: LlamaServer, ctx: Context, args_ok: Condition) -> Outcome:
    namespace, name = server.metadata.namespace, server.metadata.name
    generation = server.metadata.generation
    replicas = server.spec.replicas
    models: dict[str, LlamaModel] = {}
    for ref in distinct_models(server):
        parsed, problem = _parse_model(await ctx.kube.get(LLAMA_MODELS, namespace, ref), namespace, ref)
        if parsed is None:
            reason, message = problem or ("ModelNotReady", f"LlamaModel {namespace}/{ref} is not ready")
            return Outcome("Pending", message,
                           [condition("ModelResolved", False, reason, message, generation=generation), args_ok],
                           await _observe(ctx, namespace, name, replicas))
        models[ref] = parsed
    model_ok = condition("ModelResolved", True, "ModelReady", f"{len(models)} LlamaModel(s) ready",
                         generation=generation)
    # Which models are loaded together changes at run time: no one estimate holds (docs/multi-model.md).
    fits = condition("Fits", None, "NoEstimate", "router mode: the memory needed depends on which models are "
                     "loaded together (at most maxLoaded); not estimated", generation=generation)
    chat = chat_template_condition([ChatModel(entry.model_ref.name, entry.chat_template,
                                              models[entry.model_ref.name].status.gguf, entry.mode)
                                    for entry in server.spec.models or []], generation=generation)
    try:
        preset = build_preset_configmap(server, models, ctx.settings)
        desired = build_router_deployment(server, models, ctx.settings)
    except InvalidSpec as exc:
        message = f"the preset cannot be written: {exc}"
        return Outcome("Failed", message, [model_ok, condition("ArgsValid", False, "InvalidSpec", message,
                                                                generation=generation)],
                       await _observe(ctx, namespace, name, replicas))
    await converge_network_policy(ctx, server)  # before the pods: none of them starts unprotected
    try:
        # The preset first: the pods of the new template mount it.
        await ctx.kube.apply(preset, live=await ctx.kube.get(CONFIG_MAPS, namespace, preset["metadata"]["name"]))
        deployment = await ctx.kube.apply(desired, live=await ctx.kube.get(DEPLOYMENTS, namespace, name))
    except Invalid as exc:
        return Outcome("Failed", f"the API server rejected the preset or the Deployment: {exc}",
                       [model_ok, args_ok, fits, chat], await _observe(ctx, namespace, name, replicas))
    service = build_service(server)
    await ctx.kube.apply(service, live=await ctx.kube.get(SERVICES, namespace, service["metadata"]["name"]))
    pods = await ctx.kube.list(PODS, namespace, label_selector=_selector(name))
    fetchers = {router_fetch_container(index): models[ref] for index, ref in enumerate(distinct_models(server))}
    await record_first_use(ctx, fetchers, pods)
    fleet = fleet_status(replicas, deployment, pods)
    return Outcome(fleet.phase, fleet.message, [model_ok, args_ok, fits, chat], fleet, endpoint=endpoint_url(server),
                   model_name=model_name(server), args=router_args(server))
