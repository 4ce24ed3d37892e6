"""Trust on first use: a source that publishes no sha256 is pinned by its first verified download (issue 11).

Before this, a plain-HTTP model without spec.sha256 was never verified by anything: every pod took whatever
bytes the server sent.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llama_operator import contract, fetch
from llama_operator.builders import build_deployment
from llama_operator.builders.trust import build_trust_configmap, needs_trust
from llama_operator.config import Settings
from llama_operator.fetch import FetchOptions
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS, PODS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.model import reconcile_model
from llama_operator.reconcile.server import reconcile_server
from tests.conftest import model_body, resolved_model, server, server_body
from tests.fakehub import FakeHub
from tests.fakekube import Events, FakeKube

MiB = 1024 * 1024
URL_SPEC = {"source": {"http": {"url": "https://h/m.gguf"}}}


def gguf_bytes(size: int, seed: int = 1) -> bytes:
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub().running() as running:
        yield running


def _run(opts: FetchOptions, tmp_path: Path, *, report: bool = True) -> tuple[int, str]:
    log = tmp_path / "termination-log"
    log.unlink(missing_ok=True)
    code = fetch.run(opts, termination_log=str(log), report=report)
    return code, log.read_text() if log.exists() else ""


# ------------------------------------------------------------------------------------------------- the fetcher


def test_first_download_reports_what_it_verified(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add_plain("m.gguf", gguf_bytes(MiB))
    opts = FetchOptions(cache_dir=tmp_path, cache_key="m-abc", url=f"{hub.url}/plain/m.gguf")
    code, message = _run(opts, tmp_path)
    assert code == 0
    assert contract.parse_verified(message) == ("m-abc", {"m.gguf": served.sha256})
    # a cache hit reports the same, from the marker, without the network
    requests = len(hub.requests)
    assert _run(opts, tmp_path) == (0, message) and len(hub.requests) == requests


def test_a_later_download_must_match_the_recorded_sha256(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add_plain("m.gguf", gguf_bytes(MiB, seed=2))  # the bytes changed at the source since
    opts = FetchOptions(cache_dir=tmp_path, cache_key="m-abc", url=f"{hub.url}/plain/m.gguf",
                        trusted={"m.gguf": "a" * 64})
    code, message = _run(opts, tmp_path)
    assert code == contract.EXIT_CHECKSUM
    assert message.startswith("ChecksumMismatch: m.gguf: sha256 mismatch: expected " + "a" * 64)
    assert served.sha256 in message and "trustOnFirstUse" in message and "spec.sha256" in message
    assert not (tmp_path / "m-abc" / "m.gguf").exists()


def test_the_recorded_sha256_makes_a_cached_file_a_hit_only_when_it_matches(hub: FakeHub, tmp_path: Path) -> None:
    served = hub.add_plain("m.gguf", gguf_bytes(MiB))
    opts = FetchOptions(cache_dir=tmp_path, cache_key="m-abc", url=f"{hub.url}/plain/m.gguf")
    assert _run(opts, tmp_path)[0] == 0
    pinned = FetchOptions(cache_dir=tmp_path, cache_key="m-abc", url=opts.url, trusted={"m.gguf": served.sha256})
    requests = len(hub.requests)
    assert _run(pinned, tmp_path)[0] == 0 and len(hub.requests) == requests


def test_trusted_sums_of_another_cache_key_are_ignored() -> None:
    text = contract.trusted_sums_text("old-key", {"m.gguf": "a" * 64})
    assert contract.parse_trusted_sums(text, "old-key") == {"m.gguf": "a" * 64}
    assert contract.parse_trusted_sums(text, "new-key") == {}
    assert contract.parse_trusted_sums(None, "new-key") == {}
    assert contract.parse_verified("ChecksumMismatch: no") is None


def test_split_shards_are_pinned_one_by_one(hub: FakeHub, tmp_path: Path) -> None:
    names = [f"big-0000{i}-of-00002.gguf" for i in (1, 2)]
    shards = [hub.add_plain(name, gguf_bytes(MiB, seed=i)) for i, name in enumerate(names)]
    opts = FetchOptions(cache_dir=tmp_path, cache_key="big-abc", url=f"{hub.url}/plain/{names[0]}",
                        trusted={names[0]: shards[0].sha256, names[1]: "b" * 64})
    code, message = _run(opts, tmp_path)
    assert code == contract.EXIT_CHECKSUM and names[1] in message
    assert (tmp_path / "big-abc" / names[0]).exists() and not (tmp_path / "big-abc" / names[1]).exists()


# ------------------------------------------------------------------------------------------------- the builder


@pytest.mark.parametrize(("spec", "status", "trusted"), [
    (URL_SPEC, {}, True),
    ({**URL_SPEC, "sha256": "c" * 64}, {}, False),                       # pinned in the spec
    (None, {"sha256": "d" * 64}, False),                                 # published by the hub
    ({"source": {"volume": {"persistentVolumeClaim": "p", "path": "m.gguf"}}}, {}, False),  # nothing downloaded
])
def test_which_fetchers_run_with_trust_on_first_use(spec: dict[str, Any] | None, status: dict[str, Any],
                                                     trusted: bool, settings: Settings) -> None:
    model = resolved_model(**({"spec": spec} if spec else {}), status=status)
    assert needs_trust(model) == trusted
    pod = build_deployment(server(), model, settings)["spec"]["template"]["spec"]
    fetchers = [c for c in pod["initContainers"] if c["name"] == "fetch-model"]
    if not fetchers:
        assert not trusted
        return
    env = {e["name"]: e for e in fetchers[0]["env"]}
    assert ("--trust-on-first-use" in fetchers[0]["args"]) == trusted
    assert (contract.TRUSTED_ENV in env) == trusted
    if trusted:
        ref = env[contract.TRUSTED_ENV]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": "qwen-sha256", "key": "sha256sum", "optional": True}


def test_recording_the_sha256_does_not_change_the_pod_template(settings: Settings) -> None:
    before = resolved_model(spec=URL_SPEC)
    record = {"cacheKey": before.status.cache_key, "files": [{"name": "m.gguf", "sha256": "e" * 64}]}
    after = resolved_model(spec=URL_SPEC, status={"trustOnFirstUse": record})
    assert build_deployment(server(), before, settings) == build_deployment(server(), after, settings)
    configmap = build_trust_configmap(after)
    assert configmap is not None and configmap["metadata"]["name"] == "qwen-sha256"
    assert contract.parse_trusted_sums(configmap["data"]["sha256sum"], after.status.cache_key) == {"m.gguf": "e" * 64}
    assert configmap["metadata"]["ownerReferences"][0]["kind"] == "LlamaModel"


# ------------------------------------------------------------------------------------------------- the operator

READY = {"phase": "Ready", "cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf"}]}


def _pod(name: str, message: str, container: str = "fetch-model") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "llama-server",
                                                  "llamacpp.dev/server": "chat"}},
            "status": {"phase": "Running", "initContainerStatuses": [
                {"name": container, "state": {"terminated": {"exitCode": 0, "message": message}}}]}}


async def test_the_first_verified_report_is_recorded_once() -> None:
    kube, events = FakeKube(), Events()
    kube.put(LLAMA_MODELS, model_body("qwen", spec=URL_SPEC, status=READY))
    kube.put(LLAMA_SERVERS, server_body())
    kube.put(PODS, _pod("chat-1", contract.verified_message("m-0123456789ab", {"m.gguf": "f" * 64})))
    kube.put(PODS, _pod("chat-2", contract.verified_message("old-cache-key", {"m.gguf": "0" * 64})))
    ctx = Context(kube=kube, settings=Settings(), record_event=events)
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")], ctx)
    record = kube.objects[("llamamodels", "default", "qwen")]["status"]["trustOnFirstUse"]
    assert record["cacheKey"] == "m-0123456789ab" and record["recordedFrom"] == "chat-1"
    assert record["files"] == [{"name": "m.gguf", "sha256": "f" * 64}]
    assert record["source"] == "url:https://h/m.gguf"
    configmap = kube.objects[("configmaps", "default", "qwen-sha256")]
    assert contract.parse_trusted_sums(configmap["data"]["sha256sum"], "m-0123456789ab") == {"m.gguf": "f" * 64}
    assert [e[2] for e in events if e[0] == "qwen"] == ["TrustOnFirstUse"]

    kube.calls.clear()
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")], ctx)
    assert kube.count("patch_status", "llamamodels") == 0 and kube.count("apply", "configmaps") == 0


async def test_a_report_that_differs_from_the_record_is_one_warning() -> None:
    record = {"cacheKey": "m-0123456789ab", "files": [{"name": "m.gguf", "sha256": "f" * 64}],
              "recordedFrom": "chat-1"}
    kube, events = FakeKube(), Events()
    kube.put(LLAMA_MODELS, model_body("qwen", spec=URL_SPEC, status={**READY, "trustOnFirstUse": record}))
    kube.put(LLAMA_SERVERS, server_body())
    kube.put(PODS, _pod("chat-9", contract.verified_message("m-0123456789ab", {"m.gguf": "9" * 64})))
    ctx = Context(kube=kube, settings=Settings(), record_event=events)
    for _ in range(3):
        await reconcile_server(kube.objects[("llamaservers", "default", "chat")], ctx)
    warnings = [e for e in events if e[2] == "ChecksumMismatch"]
    assert len(warnings) == 1 and "chat-9" in warnings[0][3] and warnings[0][0] == "qwen"
    assert kube.objects[("llamamodels", "default", "qwen")]["status"]["trustOnFirstUse"] == record


async def test_the_model_keeps_its_record_and_repairs_its_configmap(monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_operator import sources
    from llama_operator.api.v1beta1 import ModelFile

    async def resolve(spec: Any, **_: Any) -> sources.ResolvedModel:
        return sources.ResolvedModel([ModelFile(name="m.gguf", url="https://h/m.gguf", size=9)], 9, None, None,
                                     sources.cache_key(spec, None))

    monkeypatch.setattr(sources, "resolve", resolve)
    kube = FakeKube()
    key = sources.cache_key(resolved_model(spec=URL_SPEC).spec, None)
    record = {"cacheKey": key, "files": [{"name": "m.gguf", "sha256": "f" * 64}]}
    kube.put(LLAMA_MODELS, model_body("qwen", spec=URL_SPEC, status={"trustOnFirstUse": record}))
    ctx = Context(kube=kube, settings=Settings(), record_event=Events())
    await reconcile_model(kube.objects[("llamamodels", "default", "qwen")], ctx)  # resolves: same source
    status = kube.objects[("llamamodels", "default", "qwen")]["status"]
    assert status["phase"] == "Ready" and status["trustOnFirstUse"] == record
    assert ("configmaps", "default", "qwen-sha256") in kube.objects  # put back (it was never there)

    kube.edit("llamamodels", "qwen", lambda m: m["spec"]["source"]["http"].update(url="https://h/other.gguf"))
    await reconcile_model(kube.objects[("llamamodels", "default", "qwen")], ctx)  # another source: start over
    assert "trustOnFirstUse" not in kube.objects[("llamamodels", "default", "qwen")]["status"]


async def test_a_refused_record_does_not_hold_up_the_server_status() -> None:
    from llama_operator.kube import Forbidden

    kube, events = FakeKube(), Events()
    kube.put(LLAMA_MODELS, model_body("qwen", spec=URL_SPEC, status=READY))
    kube.put(LLAMA_SERVERS, server_body())
    kube.put(PODS, _pod("chat-1", contract.verified_message("m-0123456789ab", {"m.gguf": "f" * 64})))
    kube.fail("apply", "qwen-sha256", lambda: Forbidden("forbidden", status=403,
                                                        permission="create configmaps in namespace default"))
    ctx = Context(kube=kube, settings=Settings(), record_event=events)
    await reconcile_server(kube.objects[("llamaservers", "default", "chat")], ctx)
    # The fetch is done (the pod's only container status): the server goes on to Loading all the same.
    assert kube.objects[("llamaservers", "default", "chat")]["status"]["phase"] == "Loading"
    warning = next(e for e in events if e[0] == "qwen" and e[1] == "Warning")
    assert warning[2] == "Forbidden" and "create configmaps in namespace default" in warning[3]
