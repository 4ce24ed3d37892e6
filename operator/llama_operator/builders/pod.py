"""The pod template of a LlamaServer: the llama-server container, its init containers, volumes, scheduling."""

from __future__ import annotations

import math
from typing import Any

from ..api.v1beta1 import LlamaModel, LlamaServer
from ..config import Settings
from ..contract import (
    API_KEY_ENV,
    FETCH_DRAFT_CONTAINER,
    GROUP,
    PORT_NAME,
    SERVER_CONTAINER,
    TMP_MOUNT,
    TMP_VOLUME,
    adapter_fetch_container,
    is_fetch_container,
)
from ..flags.dryrun import dry_run_init_container
from ..flags.render import SERVER_PORT
from .args import needs_draft_cache
from .cache import TMP_SIZE_LIMIT, cache_volume, fetcher_ephemeral_storage, model_volumes, server_model_mounts
from .drain import drain_hook, drain_sidecar
from .fetcher import fetch_init_container, mmproj_fetch_container
from .objects import server_labels
from .placement import topology_spread
from .prompt_cache import KeptSlots, kept_slots
from .resources import container_resources, pod_tolerations
from .security import container_security_context, pod_security_context

STARTUP_PROBE_PERIOD_SECONDS = 1
"""Probe loading often: /health is cheap, and a 10 s period would add up to 10 s to every start."""

MODEL_SHA_ANNOTATION = f"{GROUP}/model-sha256"
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(SERVER_PORT),
    "prometheus.io/path": "/metrics",
}


def _http_probe(*, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def server_container(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None, *, args: list[str],
    memory: str | None, adapters: tuple[LlamaModel, ...] = (), kept: KeptSlots | None = None,
) -> dict[str, Any]:
    return llama_server_container(
        server, settings, args=args, resources=container_resources(server, memory=memory),
        volume_mounts=[*server_model_mounts(model, settings, draft, adapters),
                       {"name": TMP_VOLUME, "mountPath": TMP_MOUNT}, *([kept.mount] if kept else [])])


def llama_server_container(
    server: LlamaServer, settings: Settings, *, args: list[str], resources: dict[str, Any],
    volume_mounts: list[dict[str, Any]],
) -> dict[str, Any]:
    """The llama-server container of any LlamaServer (one model or router mode): image, env, probes, security."""
    spec = server.spec
    env = [e.to_wire() for e in spec.env or []]
    if spec.api_key_secret_ref is not None:
        ref = spec.api_key_secret_ref
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    # /health answers 503 while the model loads: the startup probe gives loading its whole budget,
    # after which readiness reacts within seconds and liveness restarts a wedged server.
    startup_failures = max(1, math.ceil(spec.startup_timeout_seconds / STARTUP_PROBE_PERIOD_SECONDS))
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": spec.image or settings.image_for(spec.gpu.vendor if spec.gpu else None),
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["/app/llama-server"],
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}, *env],
        "ports": [{"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"}],
        "startupProbe": _http_probe(period=STARTUP_PROBE_PERIOD_SECONDS, failures=startup_failures, timeout=2),
        "readinessProbe": _http_probe(period=5, failures=3, timeout=3),
        "livenessProbe": _http_probe(period=20, failures=3, timeout=10),
        "resources": resources,
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": volume_mounts,
    }
    return container


def _init_containers(
    server: LlamaServer, model: LlamaModel, settings: Settings, main: dict[str, Any], draft: LlamaModel | None,
    adapters: tuple[LlamaModel, ...], kept: KeptSlots | None,
) -> list[dict[str, Any]]:
    containers = []
    if model.spec.source.volume is None:
        containers.append(fetch_init_container(model, settings, make_dirs=kept.make_dirs if kept else ()))
        if model.spec.mmproj is not None:
            containers.append(mmproj_fetch_container(model, settings))
    if draft is not None:
        containers.append(fetch_init_container(draft, settings, name=FETCH_DRAFT_CONTAINER))
    containers += [fetch_init_container(adapter, settings, name=adapter_fetch_container(index))
                   for index, adapter in enumerate(adapters)]
    if server.spec.image:
        # A custom image may carry another llama.cpp than the flag catalog: let it parse the arguments first.
        containers.append(dry_run_init_container(
            image=main["image"], args=main["args"], security_context=main["securityContext"],
            volume_mounts=main["volumeMounts"],
        ))
    return containers


def _draft_volumes(model: LlamaModel, settings: Settings, draft: LlamaModel | None) -> list[dict[str, Any]]:
    # With a downloaded served model the draft shares its cache; with a volume-source one it needs its own.
    return [cache_volume(draft, settings)] if draft is not None and needs_draft_cache(model, draft) else []


def pod_template(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None, *, args: list[str],
    memory: str | None, adapters: tuple[LlamaModel, ...] = (),
) -> dict[str, Any]:
    """The pod of a one-model server running llama-server with `args` (the plan's), `memory` its default memory
    request (None: none); `adapters` (spec.adapters, resolved) are fetched into the served model's cache (the plan
    has refused them with a volume-source model: flags/spec.py model_problems)."""
    spec = server.spec
    # Prometheus' annotation-based discovery scrapes llama-server's own metrics (it always runs with --metrics);
    # the user's podAnnotations win, e.g. prometheus.io/scrape: "false".
    annotations = {**SCRAPE_ANNOTATIONS, **(spec.pod_annotations or {})}
    sha256 = model.status.sha256 or model.spec.sha256
    if sha256:
        # A new model revision with the same file name must still roll the pods.
        annotations[MODEL_SHA_ANNOTATION] = sha256
    kept = kept_slots(server, model)
    main = server_container(server, model, settings, draft, args=args, memory=memory, adapters=adapters, kept=kept)
    init = _init_containers(server, model, settings, main, draft, adapters, kept)
    # A downloaded model's cache holds the draft and the adapters too; a volume-source model's draft has a cache of
    # its own.
    sharing = (*((draft,) if draft is not None else ()), *adapters) if model.spec.source.volume is None else ()
    caches = [(model, *sharing)] if model.spec.source.volume is None else [(draft,)] if draft is not None else []
    return assemble_pod(server, settings, annotations=annotations, main=main,
                        init_containers=with_ephemeral_storage(init, caches, settings),
                        volumes=[*model_volumes(model, settings, sharing=sharing),
                                 *_draft_volumes(model, settings, draft)], kept=kept)


def with_ephemeral_storage(init_containers: list[dict[str, Any]], caches: list[tuple[LlamaModel, ...]],
                           settings: Settings) -> list[dict[str, Any]]:
    """The init containers, each fetcher with the ephemeral-storage request and limit of the pod's caches
    (`caches`: each cache volume of the pod as the models fetched into it, its owner first)."""
    storage = fetcher_ephemeral_storage(caches, settings)
    for container in init_containers:
        if is_fetch_container(container["name"]):
            resources = container.setdefault("resources", {})
            for bucket in ("requests", "limits"):
                resources[bucket] = {**resources.get(bucket, {}), **storage[bucket]}
    return init_containers


def assemble_pod(
    server: LlamaServer, settings: Settings, *, annotations: dict[str, str], main: dict[str, Any],
    init_containers: list[dict[str, Any]], volumes: list[dict[str, Any]], kept: KeptSlots | None = None,
) -> dict[str, Any]:
    """A llama-server pod template: restricted security, scheduling from the spec, labels (one model or router),
    the drain (builders/drain.py): the sidecar after the fetchers, llama-server's preStop, the grace period; `kept`:
    the sidecar also keeps the prompt caches (builders/prompt_cache.py)."""
    spec = server.spec
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "initContainers": [*init_containers, drain_sidecar(server, settings, kept)],
        "containers": [{**main, "lifecycle": drain_hook()}],
        "volumes": [*volumes, {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}}],
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
    }
    optional = {
        "nodeSelector": spec.node_selector,
        "affinity": spec.affinity.to_wire() if spec.affinity else None,
        "tolerations": pod_tolerations(server) or None,
        "topologySpreadConstraints": topology_spread(server),
        "priorityClassName": spec.priority_class_name,
        "runtimeClassName": spec.runtime_class_name,
    }
    pod_spec.update({key: value for key, value in optional.items() if value})
    metadata: dict[str, Any] = {"labels": {**(spec.pod_labels or {}), **server_labels(server)}}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": pod_spec}
