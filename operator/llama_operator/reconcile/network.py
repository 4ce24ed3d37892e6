"""Removes the NetworkPolicy next to a LlamaServer once the settings no longer want one (the plan applies it when
they do: builders/plan.py)."""

from __future__ import annotations

from ..api.v1alpha1 import LlamaServer
from ..contract import MANAGED_BY, MANAGED_BY_LABEL
from ..kube import NETWORK_POLICIES
from .context import Context


async def remove_network_policy(ctx: Context, server: LlamaServer) -> None:
    """Delete the server's NetworkPolicy if we made one earlier (the setting was on)."""
    namespace, name = server.metadata.namespace, server.metadata.name
    live = await ctx.kube.get(NETWORK_POLICIES, namespace, name)
    if live is None:
        return
    meta = live.get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    ours = (meta.get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY and any(
        owner.get("uid") == server.metadata.uid for owner in owners)
    if ours:  # a policy of the same name that someone else made is theirs to keep
        await ctx.kube.delete(NETWORK_POLICIES, namespace, name)
