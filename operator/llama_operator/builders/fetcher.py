"""The fetcher init containers (`llama-operator fetch`): one per model file set, Secrets only as env refs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..api.v1beta1 import LlamaModel
from ..config import Settings
from ..contract import (
    FETCH_CONTAINER,
    FETCH_MMPROJ_CONTAINER,
    HEADER_ENV_PREFIX,
    TMP_MOUNT,
    TMP_VOLUME,
    TOKEN_ENV,
    TRUSTED_ENV,
)
from ..fetch.command import FetchCommand
from ..fetch.http import same_origin
from .cache import CACHE_MOUNT, CACHE_VOLUME, require_cache_key
from .quantity import parse_quantity
from .security import container_security_context
from .trust import needs_trust, trusted_env


def _source_command(model: LlamaModel, settings: Settings, file: str | None = None) -> FetchCommand:
    """The fetch command line of `model`'s source into its cache directory (see docs/model-sources.md); `file`
    replaces the Hugging Face file (the projector's)."""
    source = model.spec.source
    size = model.spec.cache.size if model.spec.cache is not None else None
    # A file whose server declares no size may fill the cache up to cache.size (else the fetcher's default).
    command = FetchCommand(cache_dir=CACHE_MOUNT, cache_key=require_cache_key(model),
                           max_size=int(parse_quantity(size)) if size is not None else None)
    if source.hugging_face is not None:
        hf = source.hugging_face
        return replace(command, hf_repo=hf.repo, hf_file=file or hf.file, hf_revision=hf.revision,
                       hf_endpoint=settings.huggingface_endpoint)
    if source.http is not None:
        return replace(command, url=source.http.url)
    return command


def _fetch_args(model: LlamaModel, settings: Settings, make_dirs: tuple[str, ...] = ()) -> list[str]:
    command = _source_command(model, settings)
    return replace(command, sha256=model.status.sha256 or model.spec.sha256,
                   trust_on_first_use=needs_trust(model), make_dirs=make_dirs).to_args()


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
                         volume: str = CACHE_VOLUME, make_dirs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fetcher of one model into the cache volume named `volume` (mounted at CACHE_MOUNT); `make_dirs`:
    directories it also creates there for the pod (the kept prompt caches: builders/prompt_cache.py)."""
    env, env_from = _fetch_env(model)
    container: dict[str, Any] = {
        "name": name,
        "image": settings.fetcher_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["llama-operator"],
        "args": _fetch_args(model, settings, make_dirs),
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
    command = _source_command(model, settings, file=mmproj.file)
    if model.spec.source.hugging_face is None:
        if model.status.mmproj is None or not model.status.mmproj.url:
            raise ValueError(f"LlamaModel {model.metadata.name} has no status.mmproj.url yet (not resolved)")
        command = replace(command, url=model.status.mmproj.url)
    sha256 = (model.status.mmproj.sha256 if model.status.mmproj else None) or mmproj.sha256
    return replace(command, sha256=sha256).to_args()


def mmproj_fetch_container(model: LlamaModel, settings: Settings, *, name: str = FETCH_MMPROJ_CONTAINER,
                           volume: str = CACHE_VOLUME) -> dict[str, Any]:
    """The fetcher of a downloaded model's multimodal projector: same source credentials, its own sha256 (a
    projector is never trusted on first use, so the model's trust record is not passed)."""
    container = fetch_init_container(model, settings, name=name, volume=volume)
    container["args"] = _mmproj_fetch_args(model, settings)
    container["env"] = [env for env in container["env"] if env["name"] != TRUSTED_ENV]
    http, resolved = model.spec.source.http, model.status.mmproj
    if http is not None and resolved is not None and not same_origin(http.url, resolved.url or ""):
        container.pop("envFrom", None)  # headers go only to the origin they were given for (docs/security.md)
    return container
