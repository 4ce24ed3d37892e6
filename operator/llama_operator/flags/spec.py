"""The one validation of a LlamaServer beyond its schema: every reason it cannot run as written.

`spec_problems` is what the CRD schema cannot express: references to another namespace, the llama-server flags
and cross-field rules (validate.py), and the operator's tenant policy (policy.py). The admission webhook, every
reconcile and `render` ask it, and nothing else decides whether a spec is valid. `model_problems` is what the
resolved LlamaModels rule out (a combination no pod can be built from); the plan (builders/plan.py) asks it
before building. Each problem is one line that names the field.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..api.v1beta1 import LlamaModel, LlamaServerSpec
from ..config import Settings
from ..policy import tenant_problems
from .validate import validate_server_spec


def spec_problems(spec: LlamaServerSpec, namespace: str, settings: Settings) -> list[str]:
    """Every problem of a parsed spec (empty: it may be rolled out)."""
    problems = [
        f"{path}.namespace: must be omitted or {namespace!r}; a LlamaServer can only use LlamaModels in its own "
        f"namespace (got {ref.namespace!r})"
        for path, ref in spec.model_refs()
        if ref.namespace is not None and ref.namespace != namespace
    ]
    problems += [str(error) for error in validate_server_spec(spec)]
    problems += tenant_problems(spec, settings)
    return problems


def model_problems(spec: LlamaServerSpec, models: Mapping[str, LlamaModel]) -> list[str]:
    """What the referenced LlamaModels (by name, resolved) rule out; a bad combination is a status, not a crash."""
    draft = models.get(spec.speculative.draft_model_ref.name) if spec.speculative is not None else None
    if draft is not None and draft.spec.source.volume is not None:
        return [
            f"spec.speculative.draftModelRef: LlamaModel {draft.metadata.name} has a volume source; a draft model "
            "must be downloadable (huggingFace or http source): it is fetched into the served model's cache"
        ]
    return []


def adapter_problems(spec: LlamaServerSpec, models: Mapping[str, LlamaModel]) -> list[str]:
    """What the resolved LlamaModels of spec.adapters rule out: each must be a LoRA adapter (spec.adapterFor) of
    the served model, of its architecture, and downloadable like the served model (they share its cache)."""
    if not spec.adapters or spec.model_ref is None:
        return []
    base_name = spec.model_ref.name
    base = models.get(base_name)
    problems = []
    if base is not None and base.spec.source.volume is not None:
        problems.append(f"spec.adapters: LlamaModel {base_name} has a volume source; adapters are fetched into "
                        "the served model's cache, so it must be downloadable (huggingFace or http source)")
    base_arch = base.status.gguf.architecture if base is not None and base.status.gguf is not None else None
    for index, ref in enumerate(spec.adapters):
        adapter = models.get(ref.name)
        if adapter is None:
            continue
        where = f"spec.adapters[{index}]: LlamaModel {ref.name}"
        info = adapter.status.gguf
        if adapter.spec.adapter_for != base_name:
            problems.append(f"{where} is not an adapter of {base_name} (its spec.adapterFor is "
                            f"{adapter.spec.adapter_for or 'unset'})")
        elif any(mark in adapter.first_file for mark in ",:"):
            problems.append(f"{where}: its file name {adapter.first_file!r} has a ',' or ':', which llama-server's "
                            "--lora-scaled list cannot carry; rename the file")
        elif adapter.spec.source.volume is not None:
            problems.append(f"{where} has a volume source; an adapter must be downloadable (huggingFace or http "
                            "source): it is fetched into the served model's cache")
        elif info is not None and info.adapter_type != "lora":
            problems.append(f"{where} is not a LoRA adapter (its header says general.type "
                            f"{'adapter' if info.adapter_type is not None else 'model'})")
        elif info is not None and base_arch and info.architecture != base_arch:
            problems.append(f"{where} adapts {info.architecture} models; {base_name} is {base_arch}")
    return problems


def prompt_cache_problems(spec: LlamaServerSpec, models: Mapping[str, LlamaModel], settings: Settings) -> list[str]:
    """spec.promptCache.persist keeps the slots in the served model's cache (router mode: the first entry's model),
    which must be a PersistentVolumeClaim:
    an EmptyDir dies with the pod; a HostPath is the node's disk, which llama-server's POST /slots (open to every
    client that reaches the pod) could fill; a volume-source model has no cache to write to."""
    if spec.prompt_cache is None or not spec.prompt_cache.persist:
        return []
    # Router mode: every model's slots live on the first entry's claim (builders/prompt_cache.py).
    home = spec.model_ref or (spec.models[0].model_ref if spec.models else None)
    if home is None:
        return []
    model = models.get(home.name)
    if model is None:
        return []
    where = f"spec.promptCache.persist: LlamaModel {model.metadata.name}"
    if model.spec.source.volume is not None:
        return [f"{where} has a volume source, so no cache to keep prompt caches in; give it a huggingFace or http "
                "source with cache.type PersistentVolumeClaim, or set persist: false"]
    kind = model.spec.cache.type or settings.default_cache_type
    if kind == "EmptyDir":
        return [f"{where} is cached on an EmptyDir, which is deleted with the pod; set its cache.type to "
                "PersistentVolumeClaim, or set persist: false"]
    if kind == "HostPath":
        return [f"{where} is cached on a HostPath: prompt caches are kept only on a PersistentVolumeClaim (any "
                "client of llama-server could fill the node's disk through POST /slots); set its cache.type to "
                "PersistentVolumeClaim, or set persist: false"]
    return []
