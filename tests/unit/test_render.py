"""`llama-operator render`: offline objects for the examples, valid against Kubernetes 1.31, pinned by golden files."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import kubernetes_validate
import pytest
import yaml

from llama_operator.cli import main
from llama_operator.config import Settings, TenantPolicy
from llama_operator.render import RenderError, render
from tests import pss

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# multi-gpu-amd.yaml shows a HostPath cache, which the chart value policy.hostPathCache turns on.
EXAMPLE_SETTINGS = Settings(policy=TenantPolicy(host_path_cache=True))
GOLDEN = pathlib.Path(__file__).parent / "golden"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_rendered_object_is_valid_kubernetes(example: pathlib.Path) -> None:
    objects = render([str(example)], EXAMPLE_SETTINGS)
    assert objects, "every example renders something"
    for obj in objects:
        kubernetes_validate.validate(obj, "1.31.0", strict=True)


@pytest.mark.parametrize("example", ["tiny-cpu.yaml", "nvidia-gpu.yaml"])
def test_golden(example: str) -> None:
    rendered = yaml.safe_dump_all(render([str(REPO / "examples" / example)], Settings()), sort_keys=False)
    golden = GOLDEN / example
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text(), "rendered objects changed; review, then UPDATE_GOLDEN=1 to accept"


def test_render_cli_prints_a_yaml_stream(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", str(REPO / "examples" / "tiny-cpu.yaml")]) == 0
    kinds = [obj["kind"] for obj in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["Deployment", "Service"]


def _write(tmp_path: pathlib.Path, docs: list[dict[str, Any]]) -> str:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


MODEL = {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaModel", "metadata": {"name": "m"},
         "spec": {"source": {"http": {"url": "https://h/m.gguf"}}}}


def _server(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "llamacpp.dev/v1beta1", "kind": "LlamaServer", "metadata": {"name": "s"},
            "spec": {"modelRef": {"name": "m"}, **spec}}


@pytest.mark.parametrize(("docs", "message"), [
    ([MODEL, _server(contextSize="4k")],
     "LlamaServer s: spec.contextSize: must be a number of tokens or 'auto' (got '4k')"),
    ([MODEL, _server(replicas=-2)], "spec.replicas: Input should be greater than or equal to 0"),
    ([_server()], "spec.modelRef.name: LlamaModel 'm' is not in the given files"),
    ([{**MODEL, "spec": {"source": {}}}, _server()], "LlamaModel m: spec.source: exactly one of"),
    ([MODEL, _server(modelRef={"name": "m", "namespace": "x"})], "spec.modelRef.namespace"),
])
def test_bad_input_names_the_field(tmp_path: pathlib.Path, docs: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(RenderError, match=None) as info:
        render([_write(tmp_path, docs)], Settings())
    assert message in str(info.value)


def test_cli_exits_nonzero_with_one_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", _write(tmp_path, [MODEL, _server(contextSize="4k")])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spec.contextSize" in err and "Traceback" not in err


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", "/nonexistent.yaml"]) == 2
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_operator_pods_pass_restricted_pod_security(example: pathlib.Path) -> None:
    settings = EXAMPLE_SETTINGS
    pods = pss.pod_specs(render([str(example)], settings))
    assert pods
    for name, spec in pods:
        assert pss.violations(spec, allowed_host_paths=[settings.host_path_root]) == [], name
