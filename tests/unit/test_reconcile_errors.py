"""Failure paths of one reconcile, against an in-memory API: every one ends in a status, none escapes.

Each test here reproduces a bug found in review (issue 11) and failed before its fix.
"""

from __future__ import annotations

from typing import Any

import pytest

from llama_operator.builders import build_deployment
from llama_operator.config import Settings
from llama_operator.kube import DEPLOYMENTS, LLAMA_MODELS, LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.server import reconcile_server
from llama_operator.render import RenderError, render
from tests.conftest import model_body, resolved_model, server, server_body
from tests.fakekube import Events, FakeKube

READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}]}
VOLUME = {"source": {"volume": {"persistentVolumeClaim": "models", "path": "d/draft.gguf"}}}
HF_DRAFT = {"source": {"huggingFace": {"repo": "acme/draft-GGUF", "file": "draft.gguf"}}}


def _context(kube: FakeKube) -> Context:
    return Context(kube=kube, settings=Settings(), record_event=Events())  # type: ignore[arg-type]


def _status(kube: FakeKube, name: str = "chat") -> dict[str, Any]:
    return kube.objects[("llamaservers", "default", name)].get("status") or {}


async def test_draft_with_a_volume_source_is_a_clear_failed_status() -> None:
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    kube.put(LLAMA_MODELS, model_body("draft", spec=VOLUME, status=READY))
    body = kube.put(LLAMA_SERVERS, server_body(speculative={"draftModelRef": {"name": "draft"}}))
    ctx = _context(kube)
    await reconcile_server(body, ctx)
    status = _status(kube)
    assert status["phase"] == "Failed"
    assert "spec.speculative.draftModelRef" in status["message"] and "volume" in status["message"]
    resolved = {c["type"]: c for c in status["conditions"]}["ModelResolved"]
    assert (resolved["status"], resolved["reason"]) == ("False", "DraftNotDownloadable")
    assert ("deployments", "default", "chat") not in kube.objects  # nothing half-built is applied
    assert [e[1:3] for e in ctx.record_event] == [("Warning", "Failed")]  # type: ignore[attr-defined]


def test_render_names_the_draft_volume_problem_instead_of_a_traceback(tmp_path: Any) -> None:
    import yaml

    docs = [model_body("qwen", uid=None), model_body("draft", spec=VOLUME, uid=None),
            server_body(uid=None, speculative={"draftModelRef": {"name": "draft"}})]
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    with pytest.raises(RenderError, match=r"LlamaServer chat: spec\.speculative\.draftModelRef: .*volume"):
        render([str(path)], Settings())


async def test_a_referenced_model_that_does_not_parse_is_a_status_not_an_exception() -> None:
    kube = FakeKube()
    broken = model_body("qwen", status=READY)
    broken["spec"]["source"]["http"] = {"url": "https://h/m.gguf"}  # two sources: stored before validation
    kube.put(LLAMA_MODELS, broken)
    body = kube.put(LLAMA_SERVERS, server_body())
    await reconcile_server(body, _context(kube))
    status = _status(kube)
    assert status["phase"] == "Pending"
    resolved = {c["type"]: c for c in status["conditions"]}["ModelResolved"]
    assert resolved["reason"] == "ModelInvalid"
    assert "LlamaModel default/qwen" in resolved["message"] and "spec.source" in resolved["message"]
    assert kube.objects.get(("deployments", "default", "chat")) is None


def test_volume_model_with_a_downloaded_draft_mounts_only_volumes_that_exist(settings: Settings) -> None:
    model = resolved_model(spec={"source": {"volume": {"persistentVolumeClaim": "models", "path": "a/m.gguf"}}})
    draft = resolved_model(name="draft", spec=HF_DRAFT, status={"cacheKey": "draft-0123456789ab",
                                                                  "files": [{"name": "draft.gguf"}]})
    pod = build_deployment(server(speculative={"draftModelRef": {"name": "draft"}}), model, settings, draft)
    spec = pod["spec"]["template"]["spec"]
    volumes = {v["name"] for v in spec["volumes"]}
    for container in spec["initContainers"] + spec["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (container["name"], mount["name"], volumes)
    main = spec["containers"][0]
    draft_path = main["args"][main["args"].index("--spec-draft-model") + 1]
    mounted = [m["mountPath"] for m in main["volumeMounts"]]
    assert any(draft_path.startswith(path + "/") for path in mounted), (draft_path, mounted)
    fetch = next(c for c in spec["initContainers"] if c["name"] == "fetch-draft-model")
    assert draft_path.startswith(fetch["volumeMounts"][0]["mountPath"] + "/")


async def test_an_api_error_applying_the_deployment_becomes_status_and_event() -> None:
    from llama_operator.kube import Forbidden
    from llama_operator.reconcile.boundary import guarded

    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("qwen", status=READY))
    body = kube.put(LLAMA_SERVERS, server_body())
    kube.fail("apply", "chat", lambda: Forbidden(
        'PATCH deployments: deployments.apps "chat" is forbidden: cannot patch', status=403,
        permission="patch deployments.apps"))
    ctx = _context(kube)
    verdict = await guarded(LLAMA_SERVERS, body, ctx, reconcile_server)
    status = _status(kube)
    assert "patch deployments.apps" in status["message"]
    reconciled = {c["type"]: c for c in status["conditions"]}["Reconciled"]
    assert (reconciled["status"], reconciled["reason"]) == ("False", "Forbidden")
    assert verdict.retry_in is not None and verdict.retry_in >= 60
    assert [e[1:3] for e in ctx.record_event] == [("Warning", "Forbidden")]  # type: ignore[attr-defined]
    assert DEPLOYMENTS.plural not in {k[0] for k in kube.objects}
