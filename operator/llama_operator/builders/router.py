"""A router-mode LlamaServer (spec.models): the preset ConfigMap and the Deployment of llama-server's router.

Pure. The router (llama-server without `--model`) reads the preset file, lists every section in /models and
/v1/models, starts one llama-server instance per model on the first request naming it (or at start with
`load-on-startup`) and stops the least recently used idle one beyond `--models-max`. Its own arguments are
passed on to every instance, so only settings common to all models are arguments (threads, split mode, the
user's `args`); each model's typed settings are its section (flags/preset.py).

Files. Every distinct LlamaModel is fetched by its own init containers (`fetch-model-<i>`, and
`fetch-mmproj-<i>` for a projector) into its cache volume, exactly as for one model; identical cache volumes
(one PVC, one host path) are one volume, each EmptyDir cache is its own volume; a host path is mounted once per
model directory (subPath), never whole. The preset names files by
absolute path, so everything it refers to is mounted below `/run/llama-server`: paths inside a file are not
rewritten by anything, and /run is where every runtime this project runs pods in binds volumes at their real
container paths (every kubelet: the real nodes' too).

The pod template carries the sha256 of the preset, so a change of any model's settings rolls the pods.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api.v1beta1 import LlamaModel, LlamaServer, ServedModel
from ..config import Settings
from ..contract import GROUP, TMP_MOUNT, TMP_VOLUME, router_fetch_container
from ..flags import render
from ..flags.dryrun import dry_run_init_container
from ..flags.preset import Section, render_ini, section
from .cache import cache_mounts, cache_volume, require_cache_key
from .deployment import deployment_object
from .fetcher import fetch_init_container, mmproj_fetch_container
from .objects import object_meta, server_labels
from .pod import assemble_pod, llama_server_container, with_ephemeral_storage
from .prompt_cache import KeptSlots, model_key, model_slot_path, router_kept_slots
from .resources import container_resources, derived_threads

ROUTER_ROOT = "/run/llama-server"
PRESET_VOLUME = "models-preset"
PRESET_MOUNT = f"{ROUTER_ROOT}/preset"
PRESET_KEY = "models.ini"
PRESET_PATH = f"{PRESET_MOUNT}/{PRESET_KEY}"
PRESET_ANNOTATION = f"{GROUP}/models-preset-sha256"
SLOT_SAVE_PATH = "slot-save-path"


def preset_configmap_name(server: LlamaServer) -> str:
    return f"{server.metadata.name}-models"


def distinct_models(server: LlamaServer) -> list[str]:
    """The LlamaModels of spec.models, each once, in order of first use (two entries may share one)."""
    assert server.spec.models is not None  # router mode references nothing but its entries' models
    return list(dict.fromkeys(ref.name for _, ref in server.spec.model_refs()))


@dataclass
class _Storage:
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    fetchers: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """LlamaModel name -> its preset lines (`model`, `mmproj`)."""
    kept: KeptSlots | None = None
    """spec.promptCache.persist: the kept prompt caches, on the home model's cache volume."""
    _by_source: dict[str, str] = field(default_factory=dict)

    def volume(self, kind: str, source: dict[str, Any], *, share: bool, mount: bool = True) -> tuple[str, str]:
        """(volume name, mount path in llama-server) for a volume source, mounting identical ones once
        (`mount=False`: the caller mounts parts of it)."""
        key = json.dumps(source, sort_keys=True)
        if share and key in self._by_source:
            name = self._by_source[key]
        else:
            name = f"{kind}-{sum(1 for v in self.volumes if v['name'].startswith(kind + '-'))}"
            self._by_source[key] = name
            self.volumes.append({"name": name, **source})
            if mount:
                self.mounts.append({"name": name, "mountPath": f"{ROUTER_ROOT}/{name}", "readOnly": True})
        return name, f"{ROUTER_ROOT}/{name}"

    def mount_once(self, mounts: list[dict[str, Any]]) -> None:
        self.mounts += [mount for mount in mounts if mount not in self.mounts]


def _storage(server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings) -> _Storage:
    storage = _Storage()
    for index, name in enumerate(distinct_models(server)):
        model = models[name]
        source, mmproj = model.spec.source, model.spec.mmproj
        if source.volume is not None:
            claim = {"claimName": source.volume.persistent_volume_claim, "readOnly": True}
            _, root = storage.volume("model-source", {"persistentVolumeClaim": claim}, share=True)
            files = [("model", f"{root}/{source.volume.path}")]
            if mmproj is not None:
                files.append(("mmproj", f"{root}/{mmproj.file}"))
        else:
            cache = {k: v for k, v in cache_volume(model, settings).items() if k != "name"}
            # An EmptyDir is sized for its one model; a PVC or host path is the same cache for every model on it.
            # A host path is mounted per model directory (subPath): the node's cache holds other models too.
            volume, root = storage.volume("model-cache", cache, share="emptyDir" not in cache,
                                          mount="hostPath" not in cache)
            storage.mount_once(cache_mounts(model, [require_cache_key(model)], settings, volume=volume, mount=root))
            if index == 0:  # the home model (flags/spec.py: a claim when prompt caches are kept)
                storage.kept = router_kept_slots(server, models, volume)
            storage.fetchers.append(fetch_init_container(
                model, settings, name=router_fetch_container(index), volume=volume,
                make_dirs=storage.kept.make_dirs if index == 0 and storage.kept else ()))
            directory = f"{root}/{require_cache_key(model)}"
            files = [("model", f"{directory}/{model.first_file}")]
            if mmproj is not None:
                storage.fetchers.append(mmproj_fetch_container(
                    model, settings, name=router_fetch_container(index, mmproj=True), volume=volume))
                files.append(("mmproj", f"{directory}/{mmproj.file_name}"))
        storage.files[name] = files
    return storage


def preset_sections(server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings) -> list[Section]:
    """One section per entry of spec.models, named by the served name, in spec order."""
    assert server.spec.models is not None
    storage = _storage(server, models, settings)
    gpu = server.spec.gpu is not None

    def lines(entry: ServedModel) -> list[tuple[str, str]]:
        files = storage.files[entry.model_ref.name]
        if storage.kept is None:
            return files
        # Each model saves into and restores from its own directory only (builders/prompt_cache.py).
        return [*files, (SLOT_SAVE_PATH, model_slot_path(model_key(models[entry.model_ref.name])))]

    return [section(entry.served_name, lines(entry), entry, gpu=gpu) for entry in server.spec.models]


def build_preset(server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings) -> str:
    """The `--models-preset` INI file."""
    return render_ini(preset_sections(server, models, settings))


def build_preset_configmap(
    server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings
) -> dict[str, Any]:
    """The ConfigMap holding the preset, owned by the LlamaServer."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(server, name=preset_configmap_name(server), labels=server_labels(server)),
        "data": {PRESET_KEY: build_preset(server, models, settings)},
    }


def router_args(server: LlamaServer) -> list[str]:
    """The router's arguments: the preset, the limit, listening, and what every model instance shares."""
    spec = server.spec
    args = ["--models-preset", PRESET_PATH, "--host", "0.0.0.0", "--port", str(render.SERVER_PORT), "--metrics"]
    if spec.max_loaded is not None:
        args += ["--models-max", str(spec.max_loaded)]
    args += render.split_mode(spec) + render.tensor_split(spec) + render.threads_arg(derived_threads(server))
    if spec.keeps_prompt_cache() and "--swa-full" not in (spec.args or []):
        args.append("--swa-full")  # every instance: a restored sliding-window slot needs it (flags/render.py)
    return args + render.slots_arg(spec) + list(spec.args or [])


def build_router_deployment(
    server: LlamaServer, models: Mapping[str, LlamaModel], settings: Settings
) -> dict[str, Any]:
    """The Deployment of a router-mode server; `models` maps every referenced LlamaModel's name to it (resolved)."""
    spec = server.spec
    storage = _storage(server, models, settings)
    preset = build_preset(server, models, settings)
    mounts = [*storage.mounts, {"name": PRESET_VOLUME, "mountPath": PRESET_MOUNT, "readOnly": True},
              {"name": TMP_VOLUME, "mountPath": TMP_MOUNT}]
    # No default memory request: which models are loaded together changes at run time (docs/multi-model.md).
    if storage.kept is not None:
        mounts.append(storage.kept.mount)
    main = llama_server_container(server, settings, args=router_args(server),
                                  resources=container_resources(server, memory=None), volume_mounts=mounts)
    # Each downloaded model has an EmptyDir of its own (shared PVCs and host paths are not ephemeral storage).
    cached = [(models[name],) for name in distinct_models(server) if models[name].spec.source.volume is None]
    init = with_ephemeral_storage(list(storage.fetchers), cached, settings)
    if spec.image:
        init.append(dry_run_init_container(image=main["image"], args=main["args"],
                                           security_context=main["securityContext"], volume_mounts=mounts))
    # No Prometheus scrape annotations: the router's /metrics needs ?model=<name> (one series per instance).
    annotations = {**(spec.pod_annotations or {}),
                   PRESET_ANNOTATION: hashlib.sha256(preset.encode()).hexdigest()}
    preset_volume = {"name": PRESET_VOLUME, "configMap": {"name": preset_configmap_name(server)}}
    template = assemble_pod(server, settings, annotations=annotations, main=main, init_containers=init,
                            volumes=[*storage.volumes, preset_volume], kept=storage.kept)
    return deployment_object(server, template)
