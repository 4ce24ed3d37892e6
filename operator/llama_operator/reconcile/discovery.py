"""What the cluster serves, asked once at startup: the settings that depend on it (the InferencePool of each
LlamaServer in `auto` mode, docs/inference-extension.md). An API installed later is seen after a restart."""

from __future__ import annotations

import logging
from dataclasses import replace

from ..config import Settings
from ..kube import INFERENCE_POOLS, Kube

log = logging.getLogger(__name__)


async def with_served_apis(kube: Kube, settings: Settings) -> Settings:
    """The settings with `inference_pool.served` as the API server answers discovery now."""
    pools = settings.inference_pool
    served = await kube.serves(INFERENCE_POOLS)
    resolved = replace(settings, inference_pool=replace(pools, served=served))
    where = "the cluster serves" if served else "the cluster does not serve"
    if pools.mode == "true" and not served:
        log.warning("InferencePools forced on but %s inference.networking.k8s.io/v1: applying them will fail until "
                    "the CRD is installed", where)
    else:
        log.info("InferencePools %s (mode %s; %s inference.networking.k8s.io/v1)",
                 "on" if resolved.inference_pool.enabled else "off", pools.mode, where)
    return resolved
