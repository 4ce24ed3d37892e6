"""Removes an object next to a LlamaServer that its plan no longer wants (the plan applies it when it does:
builders/plan.py): the NetworkPolicy once the settings stop asking for one, the PodDisruptionBudget once the
server is down to one replica, the InferencePool once the setting turns pools off."""

from __future__ import annotations

from ..api.v1beta1 import LlamaServer
from ..contract import MANAGED_BY, MANAGED_BY_LABEL
from ..kube import INFERENCE_POOLS, NETWORK_POLICIES, POD_DISRUPTION_BUDGETS, ResourceKind
from .context import Context


async def remove_unwanted(ctx: Context, server: LlamaServer, kind: ResourceKind) -> None:
    """Delete the server's object of this kind (same name as the server) if we made it earlier."""
    namespace, name = server.metadata.namespace, server.metadata.name
    if ctx.kube.known_absent(kind, namespace, name):
        return  # gone since this process last looked, and not applied since
    live = await ctx.kube.get(kind, namespace, name)
    if live is None:
        return
    meta = live.get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    ours = (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY and any(
        owner.get("uid") == server.metadata.uid for owner in owners)
    if ours:  # an object of the same name that someone else made is theirs to keep
        await ctx.kube.delete(kind, namespace, name)


async def remove_network_policy(ctx: Context, server: LlamaServer) -> None:
    """Delete the server's NetworkPolicy if we made one earlier (the setting was on)."""
    await remove_unwanted(ctx, server, NETWORK_POLICIES)


async def remove_disruption_budget(ctx: Context, server: LlamaServer) -> None:
    """Delete the server's PodDisruptionBudget if we made one earlier (it had more than one replica)."""
    await remove_unwanted(ctx, server, POD_DISRUPTION_BUDGETS)


async def remove_inference_pool(ctx: Context, server: LlamaServer) -> None:
    """Delete the server's InferencePool if we made one earlier, where the cluster serves them but the setting
    turned them off (elsewhere there is nothing to read: no request is spent)."""
    if ctx.settings.inference_pool.served:
        await remove_unwanted(ctx, server, INFERENCE_POOLS)
