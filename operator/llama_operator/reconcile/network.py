"""Keeps the NetworkPolicy next to a LlamaServer as the settings want it: applied, or removed when turned off."""

from __future__ import annotations

from ..api.v1alpha1 import LlamaServer
from ..builders.network_policy import build_network_policy
from ..builders.objects import MANAGED_BY
from ..kube import NETWORK_POLICIES
from .context import Context


async def converge_network_policy(ctx: Context, server: LlamaServer) -> None:
    """Apply the server's NetworkPolicy before its pods; with the setting off, delete the one we made earlier."""
    namespace, name = server.metadata.namespace, server.metadata.name
    desired = build_network_policy(server, ctx.settings)
    live = await ctx.kube.get(NETWORK_POLICIES, namespace, name)
    if desired is not None:
        await ctx.kube.apply(desired, live=live)
        return
    if live is None:
        return
    meta = live.get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    ours = (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY and any(
        owner.get("uid") == server.metadata.uid for owner in owners)
    if ours:  # a policy of the same name that someone else made is theirs to keep
        await ctx.kube.delete(NETWORK_POLICIES, namespace, name)
