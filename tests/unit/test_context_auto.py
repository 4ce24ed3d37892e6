"""contextSize auto: the plan renders the largest context whose memory estimate fits the memory limit (or one
GPU's memory), capped at the model's trained context, and refuses clearly when it cannot choose one."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llama_operator.api.v1beta1 import GgufInfo, LlamaServer, ModelMemoryShape
from llama_operator.builders.plan import PlanProblem, ServerPlan, plan_server
from llama_operator.config import Settings
from llama_operator.fit import estimate_server
from llama_operator.fit.estimate import GiB, MiB
from llama_operator.flags.spec import spec_problems
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, resolved_model, server, server_body
from tests.fakekube import Events, FakeKube

SHAPE = ModelMemoryShape(
    weight_bytes=GiB, layer_weight_bytes=GiB - GiB // 8, embedding_weight_bytes=GiB // 16,
    output_weight_bytes=GiB // 16, layers=24, vocab_size=32_000, embedding_length=2048, feed_forward_length=8192,
    head_count=16, attention_layers=24, key_width=24 * 4 * 128, value_width=24 * 4 * 128,
)  # fmt: skip
TRAINED = 32768
GGUF = GgufInfo(architecture="llama", context_length=TRAINED, memory=SHAPE)
STATUS = {"phase": "Ready", "cacheKey": "qwen-0123456789ab", "files": [{"name": "m.gguf"}], "gguf": GGUF.to_wire()}


def _auto(memory: str | None = "1536Mi", **spec: Any) -> LlamaServer:
    resources = {"resources": {"limits": {"memory": memory}}} if memory else {}
    return server(contextSize="auto", **resources, **spec)


def _plan(srv: LlamaServer) -> ServerPlan | PlanProblem:
    return plan_server(srv, {"qwen": resolved_model(status=STATUS)}, Settings())


def _ctx_size(plan: ServerPlan | PlanProblem) -> int:
    assert isinstance(plan, ServerPlan), plan
    return int(plan.args[plan.args.index("--ctx-size") + 1])


def _host(srv: LlamaServer, context: int) -> int:
    fit = estimate_server(srv.spec.model_copy(update={"context_size": context}), GGUF)
    assert fit is not None
    return fit.host.total


@pytest.mark.parametrize("limit", ["1280Mi", "1536Mi", "2Gi"])
def test_the_plan_renders_the_largest_context_that_fits_the_memory_limit(limit: str) -> None:
    srv = _auto(limit)
    plan = _plan(srv)
    context = _ctx_size(plan)
    budget = {"1280Mi": 1280 * MiB, "1536Mi": 1536 * MiB, "2Gi": 2 * GiB}[limit]
    assert context % 256 == 0 and 0 < context < TRAINED
    assert _host(srv, context) <= budget < _host(srv, context + 256)
    # The estimate in status is the one for that context, computed with the resolved spec.
    assert isinstance(plan, ServerPlan) and plan.estimate is not None
    assert plan.estimate.context_size == context and plan.estimate.host.total <= budget
    assert plan.context_auto and plan.server is not None and plan.server.spec.context_size == context


def test_a_parallel_server_gets_whole_slots_of_256() -> None:
    plan = _plan(_auto("1536Mi", parallel=3))
    context = _ctx_size(plan)
    assert context % (3 * 256) == 0 and context > 0


def test_the_context_is_capped_at_the_trained_context() -> None:
    assert _ctx_size(_plan(_auto("64Gi"))) == TRAINED
    # With a KV stream per slot, each slot may hold the trained context.
    assert _ctx_size(_plan(_auto("64Gi", parallel=2))) == 2 * TRAINED


def test_a_gpu_server_sizes_the_context_to_one_gpus_memory() -> None:
    srv = server(contextSize="auto", gpu={"vendor": "nvidia", "memory": "2Gi"})
    context = _ctx_size(_plan(srv))
    fit = estimate_server(srv.spec.model_copy(update={"context_size": context}), GGUF)
    above = estimate_server(srv.spec.model_copy(update={"context_size": context + 256}), GGUF)
    assert fit is not None and above is not None
    assert fit.gpu_max <= 2 * GiB < above.gpu_max
    # A host limit as well: the smaller of the two wins.
    both = server(contextSize="auto", gpu={"vendor": "nvidia", "memory": "2Gi"},
                  resources={"limits": {"memory": "480Mi"}})
    assert _ctx_size(_plan(both)) < context


def test_auto_without_a_limit_is_a_spec_problem_that_says_to_set_one() -> None:
    problems = spec_problems(_auto(None).spec, "default", Settings())
    assert problems == ["spec.contextSize: contextSize auto sizes the context to the memory: set "
                        "resources.limits.memory (with gpu: gpu.memory, the memory of one GPU), or give contextSize "
                        "a number"]
    # A GPU server needs gpu.memory: a host limit alone does not say how much VRAM there is.
    assert spec_problems(_auto("8Gi", gpu={"vendor": "nvidia"}).spec, "default", Settings())
    assert spec_problems(_auto("8Gi").spec, "default", Settings()) == []


def test_a_limit_nothing_fits_is_refused_with_the_numbers() -> None:
    plan = _plan(_auto("1000Mi"))
    assert isinstance(plan, PlanProblem)
    assert (plan.condition, plan.reason) == ("ArgsValid", "ContextDoesNotFit")
    assert plan.message.startswith("contextSize auto: not even 256 tokens fit resources.limits.memory 1000.0 MiB "
                                   "(the estimate with 256: host 1.")


def test_a_model_without_a_memory_shape_is_refused() -> None:
    plan = plan_server(_auto(), {"qwen": resolved_model()}, Settings())
    assert isinstance(plan, PlanProblem) and "has no memory shape" in plan.message


@pytest.mark.parametrize("value", ["autox", "Auto", "1024", -1, 16777217])
def test_other_values_are_refused(value: Any) -> None:
    with pytest.raises(ValidationError, match="contextSize"):
        server(contextSize=value)


def test_router_models_take_a_number_only() -> None:
    body = server_body(models=[{"modelRef": {"name": "a"}, "contextSize": "auto"}])
    del body["spec"]["modelRef"]
    with pytest.raises(ValidationError, match="contextSize"):
        LlamaServer.model_validate(body)


async def test_status_shows_the_chosen_context() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=STATUS))
    body = kube.put(LLAMA_SERVERS, server_body(contextSize="auto", resources={"limits": {"memory": "1536Mi"}}))
    status = await reconcile_server(body, Context(kube=kube, settings=Settings(), record_event=Events()))
    assert status.args is not None and status.memory is not None and status.conditions is not None
    context = int(status.args[status.args.index("--ctx-size") + 1])
    assert status.memory.context_size == context
    fits = next(c for c in status.conditions if c.type == "Fits")
    assert (fits.status, fits.reason) == ("True", "Fits")
    assert f"contextSize auto: {context} tokens, the largest that fits (trained context {TRAINED})" in fits.message


async def test_status_says_why_no_context_fits() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=STATUS))
    body = kube.put(LLAMA_SERVERS, server_body(contextSize="auto", resources={"limits": {"memory": "1000Mi"}}))
    status = await reconcile_server(body, Context(kube=kube, settings=Settings(), record_event=Events()))
    assert status.phase == "Failed" and status.conditions is not None
    args_valid = next(c for c in status.conditions if c.type == "ArgsValid")
    assert (args_valid.status, args_valid.reason) == ("False", "ContextDoesNotFit")
