"""Memory of a router-mode server's models: each model's estimate and the budget used, for status.models. Pure.

Each model of spec.models runs as its own llama-server process with its own settings, so its estimate is the
single-model one (fit.estimate_server) for its LlamaModel's header and its entry's settings, with the server's
`gpu` and `args`. The budget is the container's memory limit (resources.limits.memory): the gateway keeps the
estimates of the models loaded on a replica within it (gateway/room.py, docs/multi-model.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..api.v1beta1 import LlamaModel, LlamaServer
from ..fit import estimate_server, request_quantity
from .context import memory_limit

RESIDENT = frozenset({"loaded", "loading"})
"""llama-server's model states that hold memory."""


def served_estimates(server: LlamaServer, models: Mapping[str, LlamaModel]) -> dict[str, int]:
    """Served name -> host bytes of its instance, for the entries whose LlamaModel has a memory shape."""
    out: dict[str, int] = {}
    for entry in server.spec.models or []:
        model = models.get(entry.model_ref.name)
        if model is None or model.status is None:
            continue
        settings = entry.model_dump(include={"context_size", "parallel", "flash_attention", "cache_type_k",
                                             "cache_type_v", "batch_size", "ubatch_size", "gpu_layers", "mode"})
        spec = server.spec.model_copy(update={**settings, "models": None, "model_ref": entry.model_ref})
        fit = estimate_server(spec, model.status.gguf)
        if fit is not None:
            out[entry.served_name] = fit.host.total
    return out


def quantity(size: int) -> str:
    """An estimate as status shows it: rounded up to whole MiB (the gateway adds these up, so never less)."""
    return request_quantity(size)


def budget_used(server: LlamaServer, answers: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                estimates: Mapping[str, int]) -> str | None:
    """`used/budget` over the pods' /models answers ((pod, data) pairs): the fullest pod's loaded estimates;
    None without a memory limit."""
    budget = memory_budget(server)
    if budget is None:
        return None
    used = 0
    for _, data in answers:
        loaded = {entry.get("id") for entry in data
                  if isinstance(entry.get("status"), dict) and entry["status"].get("value") in RESIDENT}
        used = max(used, sum(_whole_mib(estimates[name]) for name in loaded if name in estimates))
    return f"{used // 2**20}Mi/{quantity(budget)}"


def memory_budget(server: LlamaServer) -> int | None:
    """The budget of a router-mode server's models: resources.limits.memory in bytes; None when unset."""
    return memory_limit(server.spec) if server.spec.models is not None else None


def _whole_mib(size: int) -> int:
    return -(-size // 2**20) * 2**20
