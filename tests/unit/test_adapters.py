"""LoRA adapters on the operator's side: the spec's rules, what a resolved adapter must be to be planned, the pod
that fetches and loads them (llama-server numbers them in spec.adapters' order, none applied), and the header
check of a LlamaModel that is, or is not, an adapter. The gateway's side: test_gateway_adapters*.py; with the real
llama-server: tests/runtime/test_gateway_adapters.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from llama_operator.api.v1beta1 import GgufInfo, LlamaModel, LlamaServerSpec
from llama_operator.builders.plan import PlanProblem, ServerPlan, plan_server
from llama_operator.config import Settings
from llama_operator.contract import adapter_fetch_container, fetch_subject, is_fetch_container
from llama_operator.errors import WrongFileKind
from llama_operator.flags.spec import spec_problems
from llama_operator.gguf.header import GgufHeader
from llama_operator.llamacpp.ggml import TensorSummary
from llama_operator.sources import _check_kind
from tests.conftest import resolved_model, server

BASE = "qwen"


def _adapter(name: str, *, adapter_for: str | None = BASE, arch: str = "qwen2", kind: str | None = "lora",
             source: dict[str, Any] | None = None, file: str | None = None) -> LlamaModel:
    spec = {"source": source or {"huggingFace": {"repo": "me/adapters", "file": f"{name}.gguf"}},
            **({"adapterFor": adapter_for} if adapter_for else {})}
    return resolved_model(name=name, spec=spec, status={
        "cacheKey": f"{name}-0123456789ab", "files": [{"name": file or f"{name}.gguf"}],
        "gguf": {"architecture": arch, "adapterType": kind}})


def _models(*adapters: LlamaModel, base: LlamaModel | None = None) -> dict[str, LlamaModel]:
    base = base or resolved_model(status={"gguf": {"architecture": "qwen2"}})
    return {BASE: base, **{a.metadata.name: a for a in adapters}}


def _spec(**spec: Any) -> LlamaServerSpec:
    return LlamaServerSpec.model_validate({"modelRef": {"name": BASE}, **spec})


def test_two_adapters_are_fetched_into_the_models_cache_and_loaded_unapplied_in_order() -> None:
    plan = plan_server(server(adapters=[{"name": "sql"}, {"name": "poet", "scale": 0.5}]),
                       _models(_adapter("sql"), _adapter("poet")), Settings())
    assert isinstance(plan, ServerPlan)
    args = plan.args
    assert args[args.index("--lora-scaled") + 1] == \
        "/models/sql-0123456789ab/sql.gguf:0,/models/poet-0123456789ab/poet.gguf:0"
    assert args.count("--lora-scaled") == 1 and "--lora" not in args and "--lora-init-without-apply" not in args
    # llama-server's host prompt cache off: it would restore an adapter's KV for the base model's request.
    assert args[args.index("--cache-ram") + 1] == "0"
    own = plan_server(server(adapters=[{"name": "sql"}], args=["--cache-ram", "512"]), _models(_adapter("sql")),
                      Settings())
    assert isinstance(own, ServerPlan) and own.args.count("--cache-ram") == 1 and "512" in own.args
    pod = plan.deployment["spec"]["template"]["spec"]
    fetchers = {c["name"]: c for c in pod["initContainers"] if is_fetch_container(c["name"])}
    assert list(fetchers) == ["fetch-model", "fetch-adapter-0", "fetch-adapter-1"]
    assert "me/adapters" in fetchers["fetch-adapter-1"]["args"] and "poet.gguf" in fetchers["fetch-adapter-1"]["args"]
    # One cache volume holds the model and its adapters.
    assert [v["name"] for v in pod["volumes"] if v["name"] == "model-cache"] == ["model-cache"]


def test_on_a_hostpath_cache_each_adapter_directory_is_mounted_read_only() -> None:
    host = {"source": {"huggingFace": {"repo": "me/adapters", "file": "sql.gguf"}}, "adapterFor": BASE,
            "cache": {"type": "HostPath"}}
    base = resolved_model(spec={"source": {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
                                                            "file": "qwen2.5-0.5b-instruct-q4_k_m.gguf"}},
                                "cache": {"type": "HostPath"}}, status={"gguf": {"architecture": "qwen2"}})
    adapter = resolved_model(name="sql", spec=host, status={"cacheKey": "sql-0123456789ab",
                                                            "files": [{"name": "sql.gguf"}],
                                                            "gguf": {"architecture": "qwen2", "adapterType": "lora"}})
    plan = plan_server(server(adapters=[{"name": "sql"}]), _models(adapter, base=base), Settings())
    assert isinstance(plan, ServerPlan)
    mounts = plan.deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {m["subPath"] for m in mounts if "subPath" in m} == {base.status.cache_key, "sql-0123456789ab"}
    assert all(m["readOnly"] for m in mounts if "subPath" in m)


@pytest.mark.parametrize(("adapter", "says"), [
    (_adapter("sql", adapter_for="other"), "spec.adapters[0]: LlamaModel sql is not an adapter of qwen (its "
                                           "spec.adapterFor is other)"),
    (_adapter("sql", adapter_for=None), "is not an adapter of qwen (its spec.adapterFor is unset)"),
    (_adapter("sql", arch="llama"), "spec.adapters[0]: LlamaModel sql adapts llama models; qwen is qwen2"),
    (_adapter("sql", kind=None), "is not a LoRA adapter (its header says general.type model)"),
    (_adapter("sql", file="a,b.gguf"), "its file name 'a,b.gguf' has a ',' or ':'"),
    (_adapter("sql", source={"volume": {"persistentVolumeClaim": "pvc", "path": "sql.gguf"}}),
     "has a volume source; an adapter must be downloadable"),
])
def test_what_the_adapter_models_rule_out_is_a_condition_not_a_pod(adapter: LlamaModel, says: str) -> None:
    plan = plan_server(server(adapters=[{"name": "sql"}]), _models(adapter), Settings())
    assert isinstance(plan, PlanProblem)
    assert (plan.condition, plan.reason) == ("ModelResolved", "AdapterMismatch")
    assert says in plan.message


def test_a_volume_source_model_gets_no_adapters() -> None:
    base = resolved_model(spec={"source": {"volume": {"persistentVolumeClaim": "pvc", "path": "q.gguf"}}},
                          status={"gguf": {"architecture": "qwen2"}})
    plan = plan_server(server(adapters=[{"name": "sql"}]), _models(_adapter("sql"), base=base), Settings())
    assert isinstance(plan, PlanProblem) and "LlamaModel qwen has a volume source" in plan.message


@pytest.mark.parametrize(("spec", "says"), [
    ({"adapters": [{"name": "sql"}], "mode": "embedding"}, "adapters change generated text; mode embedding"),
    ({"adapters": [{"name": "sql"}, {"name": "sql"}]}, "an adapter is listed twice"),
    ({"adapters": [{"name": "sql"}], "args": ["--lora", "/x.gguf"]}, "LoRA adapters are LlamaModels with "
                                                                     "spec.adapterFor"),
    ({"args": ["--lora-init-without-apply"]}, "spec.adapters"),
])
def test_the_spec_rules_say_what_to_change(spec: dict[str, Any], says: str) -> None:
    problems = spec_problems(_spec(**spec), "default", Settings())
    assert any(says in problem for problem in problems), problems


def test_adapters_with_router_mode_are_refused() -> None:
    spec = LlamaServerSpec.model_validate({"models": [{"modelRef": {"name": "a"}}], "adapters": [{"name": "sql"}]})
    assert any("adapters are served with one model" in p for p in spec_problems(spec, "default", Settings()))


@pytest.mark.parametrize("bad", [{"name": "Not_A_Name"}, {"name": "sql", "scale": 0}, {"name": "sql", "scale": 101}])
def test_a_bad_adapter_entry_fails_to_parse(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _spec(adapters=[bad])


def test_the_adapters_are_references_of_the_server() -> None:
    refs = _spec(adapters=[{"name": "sql"}, {"name": "poet"}]).model_refs()
    assert [(path, ref.name) for path, ref in refs] == [
        ("spec.modelRef", BASE), ("spec.adapters[0].name", "sql"), ("spec.adapters[1].name", "poet")]


def test_adapter_fetchers_are_fetchers_and_say_which_adapter() -> None:
    assert is_fetch_container(adapter_fetch_container(3))
    assert fetch_subject(adapter_fetch_container(0)) == "adapter #1"
    assert fetch_subject(adapter_fetch_container(0), "sql-0123") == "adapter sql-0123"


def _header(metadata: dict[str, Any]) -> GgufHeader:
    return GgufHeader(version=3, tensor_count=0, metadata={"general.architecture": "qwen2", **metadata},
                      tensors=TensorSummary(), header_size=0, source="x.gguf")


def test_the_header_says_whether_a_file_is_an_adapter() -> None:
    assert _header({}).adapter_type is None
    assert _header({"general.type": "model"}).adapter_type is None
    assert _header({"general.type": "adapter", "adapter.type": "lora"}).adapter_type == "lora"
    assert _header({"general.type": "adapter"}).adapter_type == ""
    assert _header({"general.type": "adapter", "adapter.type": "lora"}).info().adapter_type == "lora"
    assert GgufInfo().adapter_type is None


def test_an_adapter_must_say_so_and_a_model_must_not_be_one() -> None:
    adapter_spec = _adapter("sql").spec
    model_spec = resolved_model().spec
    lora = _header({"general.type": "adapter", "adapter.type": "lora"})
    _check_kind(adapter_spec, lora, "sql.gguf")
    _check_kind(model_spec, _header({}), "q.gguf")
    with pytest.raises(WrongFileKind, match="sql.gguf: spec.adapterFor names qwen, but the file is a model"):
        _check_kind(adapter_spec, _header({}), "sql.gguf")
    with pytest.raises(WrongFileKind, match="an adapter of type cvec"):
        _check_kind(adapter_spec, _header({"general.type": "adapter", "adapter.type": "cvec"}), "sql.gguf")
    with pytest.raises(WrongFileKind, match="q.gguf: the file is a LoRA adapter .*set spec.adapterFor"):
        _check_kind(model_spec, lora, "q.gguf")


def test_the_estimate_counts_the_adapters_files() -> None:
    from tests.unit.test_plan import SHAPE

    gguf = {"architecture": "qwen2", "contextLength": 8192, "memory": SHAPE.to_wire()}
    base = resolved_model(status={"gguf": gguf})
    alone = plan_server(server(contextSize=4096), _models(base=base), Settings())
    adapted = plan_server(server(contextSize=4096, adapters=[{"name": "sql"}]),
                          _models(_adapter("sql").model_copy(update={"status": _adapter("sql").status.model_copy(
                              update={"size": 50 * 2**20})}), base=base), Settings())
    assert isinstance(alone, ServerPlan) and isinstance(adapted, ServerPlan)
    assert alone.estimate is not None and adapted.estimate is not None
    assert adapted.estimate.host.weights - alone.estimate.host.weights == 50 * 2**20
    assert alone.estimate.prompt_cache_max == 8192 * 2**20 and adapted.estimate.prompt_cache_max == 0
    assert any("1 LoRA adapter(s)" in note for note in adapted.estimate.notes)
