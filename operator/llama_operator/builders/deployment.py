"""The Deployment of a LlamaServer: a model-fetch init container and the llama-server container."""

from __future__ import annotations

import math
from typing import Any

from ..api.v1alpha1 import LlamaModel, LlamaServer
from ..config import Settings
from ..contract import (
    API_KEY_ENV,
    FETCH_CONTAINER,
    FETCH_DRAFT_CONTAINER,
    FETCH_MMPROJ_CONTAINER,
    HEADER_ENV_PREFIX,
    SERVER_CONTAINER,
    TMP_MOUNT,
    TMP_VOLUME,
    TOKEN_ENV,
    TRUSTED_ENV,
)
from ..errors import InvalidSpec
from ..fit import estimate_server, request_quantity
from ..flags.dryrun import dry_run_init_container
from ..flags.render import SERVER_PORT, render_args
from .cache import (
    CACHE_MOUNT,
    CACHE_VOLUME,
    cache_volume,
    mmproj_path,
    model_path,
    model_volumes,
    require_cache_key,
    server_model_mount,
)
from .objects import object_meta, selector_labels, server_labels
from .quantity import parse_quantity
from .trust import needs_trust, trusted_env

RUN_AS_USER = 65532
"""A fixed non-root UID: the llama.cpp images default to root, which restricted pod security forbids."""

GPU_RESOURCES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu", "intel": "gpu.intel.com/i915"}
STARTUP_PROBE_PERIOD_SECONDS = 1
"""Probe loading often: /health is cheap, and a 10 s period would add up to 10 s to every start."""

MODEL_SHA_ANNOTATION = "llamacpp.dev/model-sha256"
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(SERVER_PORT),
    "prometheus.io/path": "/metrics",
}


def model_name(server: LlamaServer) -> str:
    """What /v1/models serves and clients put in `model` (router mode: every served name, comma-separated)."""
    if server.spec.models is not None:
        return ", ".join(served_names(server))
    assert server.spec.model_ref is not None  # LlamaServerSpec: exactly one of modelRef and models
    return server.spec.alias or server.spec.model_ref.name


def served_names(server: LlamaServer) -> list[str]:
    """Every model name a request may use with this server."""
    if server.spec.models is not None:
        return [model.served_name for model in server.spec.models]
    return [model_name(server)]


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        # fsGroup makes EmptyDir and most PVCs writable for the fetcher; hostPath is not chowned (docs).
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def derived_threads(server: LlamaServer) -> int | None:
    """--threads: the user's, else (CPU only) the CPU limit, else the request, rounded down, at least 1.

    llama-server's own default is the host's physical core count, which ignores the container's limit and
    makes throttled pods crawl.
    """
    spec = server.spec
    if spec.threads is not None:
        return spec.threads
    if spec.gpu is not None or spec.resources is None:
        return None
    for bucket in (spec.resources.limits, spec.resources.requests):
        if bucket and "cpu" in bucket:
            return max(1, math.floor(parse_quantity(bucket["cpu"])))
    return None


def model_problems(draft: LlamaModel | None) -> list[str]:
    """What cannot be built from the referenced models; each problem names the LlamaServer field.

    The reconcile and `render` ask this before building, so a bad combination is a status, not an exception.
    """
    if draft is not None and draft.spec.source.volume is not None:
        return [
            f"spec.speculative.draftModelRef: LlamaModel {draft.metadata.name} has a volume source; a draft model "
            "must be downloadable (huggingFace or http source): it is fetched into the served model's cache"
        ]
    return []


def draft_model_path(draft: LlamaModel) -> str:
    """The draft model is fetched into the served model's cache volume, under its own cache key."""
    problems = model_problems(draft)
    if problems:
        raise InvalidSpec(problems[0])
    return model_path(draft)


def _draft_cache(model: LlamaModel, draft: LlamaModel | None) -> bool:
    """Whether the pod needs a cache volume for the draft alone: the served model comes from a volume."""
    return draft is not None and model.spec.source.volume is not None


def server_args(server: LlamaServer, model: LlamaModel, draft: LlamaModel | None = None) -> list[str]:
    return render_args(
        server.spec,
        model_path=model_path(model),
        model_name=model_name(server),
        threads=derived_threads(server),
        draft_model_path=draft_model_path(draft) if draft is not None else None,
        mmproj_path=mmproj_path(model),
    )


def default_memory_request(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None = None
) -> str | None:
    """The memory request of a llama-server container whose spec sets neither a memory request nor a limit:
    the memory estimate plus headroom (docs/memory-fit.md), so the scheduler places it on a node that can
    hold the model. None when disabled or when the model's status has no memory shape."""
    resources = server.spec.resources
    for bucket in (resources.requests, resources.limits) if resources is not None else ():
        if bucket and "memory" in bucket:
            return None
    if not settings.memory_request_from_estimate:
        return None
    fit = estimate_server(server.spec, model.status.gguf, draft.status.gguf if draft is not None else None)
    if fit is None:
        return None
    return request_quantity(fit.host.total, headroom_percent=settings.memory_request_headroom_percent)


def _resources(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None = None
) -> dict[str, Any]:
    return container_resources(server, memory=default_memory_request(server, model, settings, draft))


def container_resources(server: LlamaServer, *, memory: str | None) -> dict[str, Any]:
    """The llama-server container's resources: the spec's, the default memory request, the GPU limit."""
    spec = server.spec
    resources: dict[str, Any] = spec.resources.to_wire() if spec.resources else {}
    if memory is not None:
        resources["requests"] = {**resources.get("requests", {}), "memory": memory}
    if spec.gpu is not None:
        gpu_key = GPU_RESOURCES[spec.gpu.vendor]
        # Extended resources must be set as limits (requests default to them).
        resources["limits"] = {**resources.get("limits", {}), gpu_key: spec.gpu.count}
    return resources


def _tolerations(server: LlamaServer) -> list[dict[str, Any]]:
    tolerations = [t.to_wire() for t in server.spec.tolerations or []]
    if server.spec.gpu is not None:
        gpu = {"key": GPU_RESOURCES[server.spec.gpu.vendor], "operator": "Exists", "effect": "NoSchedule"}
        if gpu not in tolerations:
            tolerations.append(gpu)
    return tolerations


def _fetch_args(model: LlamaModel, settings: Settings) -> list[str]:
    """The `llama-operator fetch` contract (see docs/model-sources.md)."""
    source = model.spec.source
    args = ["fetch", "--cache-dir", CACHE_MOUNT, "--cache-key", require_cache_key(model)]
    if source.hugging_face is not None:
        hf = source.hugging_face
        args += ["--hf-repo", hf.repo, "--hf-file", hf.file, "--hf-revision", hf.revision]
        args += ["--hf-endpoint", settings.huggingface_endpoint]
    elif source.http is not None:
        args += ["--url", source.http.url]
    sha256 = model.status.sha256 or model.spec.sha256
    if sha256:
        args += ["--sha256", sha256]
    if needs_trust(model):
        args.append("--trust-on-first-use")
    return args


def _fetch_env(model: LlamaModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Secrets reach the fetcher only as env vars from Secret references, never as arguments."""
    source = model.spec.source
    env: list[dict[str, Any]] = []
    env_from: list[dict[str, Any]] = []
    if source.hugging_face is not None and source.hugging_face.token_secret_ref is not None:
        ref = source.hugging_face.token_secret_ref
        env.append({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if source.http is not None and source.http.headers_secret_ref is not None:
        env_from.append({"prefix": HEADER_ENV_PREFIX, "secretRef": {"name": source.http.headers_secret_ref.name}})
    if needs_trust(model):
        env.append(trusted_env(model))
    return env, env_from


def fetch_init_container(model: LlamaModel, settings: Settings, *, name: str = FETCH_CONTAINER,
                         volume: str = CACHE_VOLUME) -> dict[str, Any]:
    """The fetcher of one model into the cache volume named `volume` (mounted at CACHE_MOUNT)."""
    env, env_from = _fetch_env(model)
    container: dict[str, Any] = {
        "name": name,
        "image": settings.fetcher_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["llama-operator"],
        "args": _fetch_args(model, settings),
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": volume, "mountPath": CACHE_MOUNT},
            {"name": TMP_VOLUME, "mountPath": TMP_MOUNT},
        ],
    }
    if env_from:
        container["envFrom"] = env_from
    return container


def _mmproj_fetch_args(model: LlamaModel, settings: Settings) -> list[str]:
    """The fetcher of the projector: the model's source with the projector's file, into the model's directory."""
    mmproj = model.spec.mmproj
    assert mmproj is not None
    source = model.spec.source
    args = ["fetch", "--cache-dir", CACHE_MOUNT, "--cache-key", require_cache_key(model)]
    if source.hugging_face is not None:
        hf = source.hugging_face
        args += ["--hf-repo", hf.repo, "--hf-file", mmproj.file, "--hf-revision", hf.revision]
        args += ["--hf-endpoint", settings.huggingface_endpoint]
    else:
        if model.status.mmproj is None or not model.status.mmproj.url:
            raise ValueError(f"LlamaModel {model.metadata.name} has no status.mmproj.url yet (not resolved)")
        args += ["--url", model.status.mmproj.url]
    sha256 = (model.status.mmproj.sha256 if model.status.mmproj else None) or mmproj.sha256
    if sha256:
        args += ["--sha256", sha256]
    return args


def mmproj_fetch_container(model: LlamaModel, settings: Settings, *, name: str = FETCH_MMPROJ_CONTAINER,
                           volume: str = CACHE_VOLUME) -> dict[str, Any]:
    """The fetcher of a downloaded model's multimodal projector: same source credentials, its own sha256 (a
    projector is never trusted on first use, so the model's trust record is not passed)."""
    container = fetch_init_container(model, settings, name=name, volume=volume)
    container["args"] = _mmproj_fetch_args(model, settings)
    container["env"] = [env for env in container["env"] if env["name"] != TRUSTED_ENV]
    return container


def _http_probe(*, period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def server_container(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None = None
) -> dict[str, Any]:
    container = llama_server_container(
        server, settings, args=server_args(server, model, draft),
        resources=_resources(server, model, settings, draft),
        volume_mounts=[server_model_mount(model), {"name": TMP_VOLUME, "mountPath": TMP_MOUNT}])
    if _draft_cache(model, draft):
        container["volumeMounts"].insert(1, {"name": CACHE_VOLUME, "mountPath": CACHE_MOUNT, "readOnly": True})
    return container


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
        "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
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
    server: LlamaServer, model: LlamaModel, settings: Settings, main: dict[str, Any], draft: LlamaModel | None
) -> list[dict[str, Any]]:
    containers = []
    if model.spec.source.volume is None:
        containers.append(fetch_init_container(model, settings))
        if model.spec.mmproj is not None:
            containers.append(mmproj_fetch_container(model, settings))
    if draft is not None:
        containers.append(fetch_init_container(draft, settings, name=FETCH_DRAFT_CONTAINER))
    if server.spec.image:
        # A custom image may carry another llama.cpp than the flag catalog: let it parse the arguments first.
        containers.append(dry_run_init_container(
            image=main["image"], args=main["args"], security_context=main["securityContext"],
            volume_mounts=main["volumeMounts"],
        ))
    return containers


def _draft_volumes(model: LlamaModel, settings: Settings, draft: LlamaModel | None) -> list[dict[str, Any]]:
    # With a downloaded served model the draft shares its cache; with a volume-source one it needs its own.
    return [cache_volume(draft, settings)] if draft is not None and _draft_cache(model, draft) else []


def pod_template(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None = None
) -> dict[str, Any]:
    spec = server.spec
    # Prometheus' annotation-based discovery scrapes llama-server's own metrics (it always runs with --metrics);
    # the user's podAnnotations win, e.g. prometheus.io/scrape: "false".
    annotations = {**SCRAPE_ANNOTATIONS, **(spec.pod_annotations or {})}
    sha256 = model.status.sha256 or model.spec.sha256
    if sha256:
        # A new model revision with the same file name must still roll the pods.
        annotations[MODEL_SHA_ANNOTATION] = sha256
    main = server_container(server, model, settings, draft)
    return assemble_pod(server, annotations=annotations, main=main,
                        init_containers=_init_containers(server, model, settings, main, draft),
                        volumes=[*model_volumes(model, settings), *_draft_volumes(model, settings, draft)])


def assemble_pod(
    server: LlamaServer, *, annotations: dict[str, str], main: dict[str, Any],
    init_containers: list[dict[str, Any]], volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    """A llama-server pod template: restricted security, scheduling from the spec, labels (one model or router)."""
    spec = server.spec
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "initContainers": init_containers,
        "containers": [main],
        "volumes": [*volumes, {"name": TMP_VOLUME, "emptyDir": {}}],
        "terminationGracePeriodSeconds": 30,
    }
    optional = {
        "nodeSelector": spec.node_selector,
        "affinity": spec.affinity.to_wire() if spec.affinity else None,
        "tolerations": _tolerations(server) or None,
        "priorityClassName": spec.priority_class_name,
        "runtimeClassName": spec.runtime_class_name,
    }
    pod_spec.update({key: value for key, value in optional.items() if value})
    metadata: dict[str, Any] = {"labels": {**(spec.pod_labels or {}), **server_labels(server)}}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": pod_spec}


def build_deployment(
    server: LlamaServer, model: LlamaModel, settings: Settings, draft: LlamaModel | None = None
) -> dict[str, Any]:
    """The Deployment; `draft` is the resolved speculative draft LlamaModel when spec.speculative is set."""
    return deployment_object(server, pod_template(server, model, settings, draft))


def deployment_object(server: LlamaServer, template: dict[str, Any]) -> dict[str, Any]:
    """The Deployment around a pod template (one model or router mode)."""
    # Two GPU pods rarely fit side by side during a rolling update: replace instead of surge.
    strategy: dict[str, Any] = (
        {"type": "Recreate"}
        if server.spec.gpu is not None
        else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(server, name=server.metadata.name, labels=server_labels(server)),
        "spec": {
            "replicas": server.spec.replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(server.metadata.name)},
            "strategy": strategy,
            "template": template,
        },
    }
