"""The Fits condition, the memory estimate in LlamaServer status, and the default memory request (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.api.v1beta1 import GgufInfo, LlamaModel, LlamaServer, ModelMemoryShape
from llama_operator.builders import build_deployment
from llama_operator.config import Settings, SettingsError
from llama_operator.fit import estimate_server, largest_context, request_quantity
from llama_operator.fit.estimate import GiB, MiB
from llama_operator.reconcile.fits import fits_condition, fits_event, memory_status

DENSE = ModelMemoryShape(
    weight_bytes=4 * GiB, layer_weight_bytes=3 * GiB + GiB // 2, embedding_weight_bytes=GiB // 4,
    output_weight_bytes=GiB // 4, layers=32, vocab_size=128_256, embedding_length=4096, feed_forward_length=14336,
    head_count=32, attention_layers=32, key_width=32 * 8 * 128, value_width=32 * 8 * 128,
)  # fmt: skip
GGUF = GgufInfo(architecture="llama", context_length=32768, memory=DENSE)


def _server(**spec: Any) -> LlamaServer:
    return LlamaServer.model_validate({
        "metadata": {"name": "s", "namespace": "ns", "generation": 3},
        "spec": {"modelRef": {"name": "m"}, **spec},
    })  # fmt: skip


def _model(gguf: GgufInfo | None = GGUF) -> LlamaModel:
    return LlamaModel.model_validate({
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"source": {"huggingFace": {"repo": "o/r", "file": "m.gguf"}}},
        "status": {"phase": "Ready", "cacheKey": "k", "gguf": gguf.to_wire() if gguf else None},
    })  # fmt: skip


def _fits(server: LlamaServer, **kwargs: Any) -> Any:
    fit = estimate_server(server.spec, GGUF)
    return fits_condition(server, fit, GGUF, generation=3, **kwargs)


def _gpu_node(name: str, mib: int, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": str(mib), **labels}}}


def test_a_memory_limit_below_the_estimate_says_both_numbers_and_what_fits() -> None:
    server = _server(contextSize=32768, resources={"limits": {"memory": "7Gi"}})
    fit = estimate_server(server.spec, GGUF)
    assert fit is not None and fit.host.total > 7 * GiB  # 4 GiB weights + 4 GiB KV cache
    cond = _fits(server)
    assert (cond.type, cond.status, cond.reason, cond.observed_generation) == ("Fits", "False", "MemoryLimitTooLow", 3)
    assert f"estimated host memory {fit.host.total / GiB:.2f} GiB" in cond.message
    assert "resources.limits.memory 7.00 GiB" in cond.message
    assert f"raise the limit to at least {request_quantity(fit.host.total)}" in cond.message
    # what would fit within 7 GiB instead: a smaller context (checked against the estimate) or a q8_0 cache
    context = largest_context(server.spec, GGUF, 7 * GiB)
    assert f"contextSize {context} or less" in cond.message
    assert 0 < context < 32768 and context % 256 == 0
    smaller = estimate_server(_server(contextSize=context).spec, GGUF)
    bigger = estimate_server(_server(contextSize=context + 256).spec, GGUF)
    assert smaller is not None and bigger is not None
    assert smaller.host.total <= 7 * GiB < bigger.host.total
    assert "cacheTypeK and cacheTypeV q8_0" in cond.message


def test_a_limit_that_holds_the_estimate_fits() -> None:
    cond = _fits(_server(contextSize=4096, resources={"limits": {"memory": "8Gi"}}))
    assert (cond.status, cond.reason) == ("True", "Fits")
    assert "within resources.limits.memory 8.00 GiB" in cond.message
    assert _fits(_server(contextSize=4096)).message.endswith("no memory limit set")


def test_gpu_memory_label_too_small_on_every_candidate_node() -> None:
    server = _server(contextSize=32768, gpu={"vendor": "nvidia", "count": 1}, nodeSelector={"pool": "gpu"})
    nodes = [_gpu_node("small", 8192, pool="gpu"), _gpu_node("big-elsewhere", 81920, pool="other")]
    cond = _fits(server, nodes=nodes)
    assert (cond.status, cond.reason) == ("False", "GpuMemoryTooSmall")
    assert "the 1 candidate node(s) (nvidia.com/gpu.memory=8192 MiB)" in cond.message
    assert "gpu.count" in cond.message and "contextSize" in cond.message


def test_gpu_memory_fitting_some_nodes() -> None:
    server = _server(contextSize=32768, gpu={"vendor": "nvidia", "count": 1})
    cond = _fits(server, nodes=[_gpu_node("a", 8192), _gpu_node("b", 24576)])
    assert (cond.status, cond.reason) == ("True", "Fits")
    assert "fits the GPUs of 1 of 2 candidate node(s)" in cond.message


def test_gpu_memory_not_checked_says_why() -> None:
    nvidia = _server(contextSize=8192, gpu={"vendor": "nvidia", "count": 1})
    assert "VRAM not checked: namespaced mode cannot read Nodes" in \
        _fits(nvidia, nodes_note="namespaced mode cannot read Nodes").message
    assert "no node matching the nodeSelector" in _fits(nvidia, nodes=[]).message
    amd = _fits(_server(contextSize=8192, gpu={"vendor": "amd", "count": 1}))
    assert "only NVIDIA nodes publish it" in amd.message


def test_context_beyond_the_trained_context_says_so() -> None:
    cond = _fits(_server(contextSize=65536))
    assert (cond.status, cond.reason) == ("True", "ContextExceedsTraining")
    assert "each slot gets 65536 tokens but the model was trained on 32768" in cond.message
    assert "set contextSize to at most 32768" in cond.message
    # with explicit slots every slot has its own share: 4 x 16384 is within the trained context
    assert _fits(_server(contextSize=65536, parallel=4)).reason == "Fits"


def test_no_memory_shape_no_estimate() -> None:
    server = _server()
    cond = fits_condition(server, None, None, generation=1)
    assert (cond.status, cond.reason) == ("Unknown", "NoEstimate")


def test_memory_status_in_quantities() -> None:
    fit = estimate_server(_server(contextSize=8192, gpu={"vendor": "nvidia", "count": 2}).spec, GGUF)
    assert fit is not None
    status = memory_status(fit).to_wire()
    assert status["host"] == request_quantity(fit.host.total)
    assert status["gpu"] == request_quantity(fit.gpu_max)
    assert (status["contextSize"], status["contextPerSlot"], status["slots"]) == (8192, 8192, 4)
    assert status["promptCacheMax"] == "8192Mi"
    assert all(value.endswith("Mi") for key, value in status.items() if isinstance(value, str))


def test_fits_event_once_per_new_problem() -> None:
    events: list[tuple[str, str]] = []

    class Ctx:
        def record_event(self, body: Any, *, type: str, reason: str, message: str) -> None:  # noqa: A002
            events.append((type, reason))

    bad = _fits(_server(contextSize=32768, resources={"limits": {"memory": "1Gi"}}))
    good = _fits(_server(contextSize=4096))
    fits_event(Ctx(), {}, [good], [bad])  # type: ignore[arg-type]
    fits_event(Ctx(), {}, [bad], [bad])  # type: ignore[arg-type]
    fits_event(Ctx(), {}, [bad], [good])  # type: ignore[arg-type]
    assert events == [("Warning", "MemoryLimitTooLow")]


# ------------------------------------------------------------------------------------------------ default request


def _container(server: LlamaServer, model: LlamaModel, settings: Settings) -> dict[str, Any]:
    deployment = build_deployment(server, model, settings)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_default_memory_request_is_the_estimate_plus_headroom() -> None:
    server = _server(contextSize=8192)
    fit = estimate_server(server.spec, GGUF)
    assert fit is not None
    resources = _container(server, _model(), Settings())["resources"]
    assert resources == {"requests": {"memory": request_quantity(fit.host.total, headroom_percent=10)}}
    expected = -(-int(fit.host.total * 1.25) // MiB)
    assert _container(server, _model(), Settings(memory_request_headroom_percent=25))["resources"] == \
        {"requests": {"memory": f"{expected}Mi"}}


@pytest.mark.parametrize("resources", [
    {"requests": {"memory": "2Gi"}},
    {"limits": {"memory": "3Gi"}},
])
def test_a_user_memory_setting_is_kept(resources: dict[str, Any]) -> None:
    got = _container(_server(contextSize=8192, resources=resources), _model(), Settings())["resources"]
    assert got == resources


def test_no_default_request_when_disabled_or_unknown() -> None:
    server = _server(contextSize=8192, resources={"requests": {"cpu": "2"}})
    assert _container(server, _model(), Settings(memory_request_from_estimate=False))["resources"] == \
        {"requests": {"cpu": "2"}}
    assert _container(server, _model(GgufInfo(architecture="llama")), Settings())["resources"] == \
        {"requests": {"cpu": "2"}}
    # a GPU server keeps its GPU limit next to the default memory request
    gpu = _container(_server(contextSize=8192, gpu={"vendor": "nvidia", "count": 1}), _model(), Settings())
    assert gpu["resources"]["limits"] == {"nvidia.com/gpu": 1} and "memory" in gpu["resources"]["requests"]


def test_settings_from_env() -> None:
    settings = Settings.from_env({"LLAMA_OPERATOR_MEMORY_REQUEST_FROM_ESTIMATE": "false",
                                  "LLAMA_OPERATOR_MEMORY_REQUEST_HEADROOM_PERCENT": "25"})
    assert (settings.memory_request_from_estimate, settings.memory_request_headroom_percent) == (False, 25.0)
    assert Settings.from_env({}).memory_request_from_estimate is True
    with pytest.raises(SettingsError, match="MEMORY_REQUEST_FROM_ESTIMATE"):
        Settings.from_env({"LLAMA_OPERATOR_MEMORY_REQUEST_FROM_ESTIMATE": "yes"})
    with pytest.raises(SettingsError, match="HEADROOM_PERCENT"):
        Settings.from_env({"LLAMA_OPERATOR_MEMORY_REQUEST_HEADROOM_PERCENT": "-5"})


def test_growth_beyond_the_limit_is_pointed_out() -> None:
    # 8 GiB of prompt cache (llama-server's default --cache-ram) does not fit in what an 8 GiB limit leaves
    cond = _fits(_server(contextSize=4096, resources={"limits": {"memory": "8Gi"}}))
    assert cond.reason == "Fits" and "bound them with --cache-ram (MiB) and --ctx-checkpoints" in cond.message
    bounded = _fits(_server(contextSize=4096, resources={"limits": {"memory": "8Gi"}},
                            args=["--cache-ram", "1024"]))
    assert "--cache-ram" not in bounded.message
    assert "--cache-ram" not in _fits(_server(contextSize=4096)).message  # no limit: nothing to OOM against


def test_an_oom_kill_outranks_the_estimate_and_names_the_limit_to_set() -> None:
    from llama_operator.reconcile.fits import oom_condition
    from llama_operator.reconcile.server_status import OomKill

    server = _server(contextSize=32768, resources={"limits": {"memory": "7Gi"}})
    fit = estimate_server(server.spec, GGUF)
    assert fit is not None
    cond = oom_condition(server, OomKill("s-abc", "7Gi"), fit, generation=3)
    assert (cond.status, cond.reason, cond.observed_generation) == ("False", "OOMKilled", 3)
    assert "OOM-killed at its memory limit 7Gi in pod s-abc" in cond.message
    assert f"set resources.limits.memory to at least {request_quantity(fit.host.total)}" in cond.message
    # within the estimate: the process grew at runtime, and the message says what bounds that
    roomy = _server(contextSize=4096, resources={"limits": {"memory": "64Gi"}})
    grew = oom_condition(roomy, OomKill("s-abc", "64Gi"), estimate_server(roomy.spec, GGUF), generation=3)
    assert "grew past the estimate" in grew.message and "--cache-ram" in grew.message
    unknown = oom_condition(server, OomKill("s-abc", None), None, generation=3)
    assert "no memory limit (the node ran out)" in unknown.message and "no estimate" in unknown.message
