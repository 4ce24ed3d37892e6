"""Kept prompt caches (spec.promptCache.persist) on the operator's side and in the drain sidecar, without
llama-server: the pod a server keeping them gets, what rules them out, the slot directory's choices (restore the
newest of this model, prune to the size), the save and restore loops and the sidecar's readiness. With the real
llama-server and the real sidecar: tests/runtime/test_prompt_cache.py."""

from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from llama_operator import slotstore
from llama_operator.api.v1beta1 import LlamaModel
from llama_operator.builders.plan import PlanProblem, ServerPlan, plan_server
from llama_operator.builders.prompt_cache import model_key
from llama_operator.config import Settings
from llama_operator.contract import DRAIN_CONTAINER, DRAIN_READY_PATH, FETCH_CONTAINER, SERVER_CONTAINER
from llama_operator.drain import Drain, Timing, make_server
from llama_operator.fetch.cli import make_dir
from llama_operator.fetch.command import parse
from llama_operator.fit import settings_from_spec
from llama_operator.flags.spec import spec_problems
from llama_operator.slotstore import (
    RouterSlotDirectory,
    SlotApiError,
    SlotDirectory,
    pod_tag,
    restore_all,
    save_all,
    save_router,
)
from tests.conftest import resolved_model, server

SHA = "ab" * 32
PVC = {"source": {"huggingFace": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "file": "q.gguf"}},
       "cache": {"type": "PersistentVolumeClaim"}}


def _model(spec: dict[str, Any] = PVC, sha256: str | None = SHA) -> LlamaModel:
    return resolved_model(spec=spec, status={"sha256": sha256, "files": [{"name": "q.gguf"}]})


def _containers(plan: ServerPlan) -> dict[str, dict[str, Any]]:
    pod = plan.deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod["initContainers"], *pod["containers"]]}


def test_a_server_keeping_its_prompt_caches_gets_the_directory_the_flag_and_the_sidecar() -> None:
    plan = plan_server(server(promptCache={"persist": True, "maxSize": "1Gi"}), {"qwen": _model()}, Settings())
    assert isinstance(plan, ServerPlan)
    containers = _containers(plan)
    main, sidecar, fetch = containers[SERVER_CONTAINER], containers[DRAIN_CONTAINER], containers[FETCH_CONTAINER]
    mount = {"name": "model-cache", "mountPath": "/slots", "subPath": "slots/chat"}
    assert main["args"][main["args"].index("--slot-save-path") + 1] == "/slots"
    assert "--swa-full" in main["args"]  # a restored sliding-window slot is reusable only with the full window
    assert settings_from_spec(plan.server.spec).swa_full  # and the memory estimate counts the full window
    assert mount in main["volumeMounts"] and sidecar["volumeMounts"] == [mount]  # read-write in both
    fetched = parse(fetch["args"])
    assert fetched is not None and fetched.make_dir == "slots/chat"  # created before llama-server mounts it
    args = sidecar["args"]
    assert args[args.index("--slot-key") + 1] == SHA[:16]
    assert args[args.index("--slots-max-bytes") + 1] == str(1 << 30)
    assert sidecar["readinessProbe"]["httpGet"]["path"] == DRAIN_READY_PATH


def test_a_server_keeping_nothing_gets_none_of_it() -> None:
    plan = plan_server(server(), {"qwen": _model()}, Settings())
    assert isinstance(plan, ServerPlan)
    containers = _containers(plan)
    assert "--slot-save-path" not in containers[SERVER_CONTAINER]["args"]
    assert "--swa-full" not in containers[SERVER_CONTAINER]["args"]
    assert "readinessProbe" not in containers[DRAIN_CONTAINER] and "volumeMounts" not in containers[DRAIN_CONTAINER]
    assert "--make-dir" not in containers[FETCH_CONTAINER]["args"]


def test_the_sidecar_sends_the_servers_api_key() -> None:
    plan = plan_server(server(apiKeySecretRef={"name": "keys", "key": "chat"}), {"qwen": _model()}, Settings())
    assert isinstance(plan, ServerPlan)
    assert _containers(plan)[DRAIN_CONTAINER]["env"] == [
        {"name": "LLAMA_API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "chat"}}}]


@pytest.mark.parametrize(("spec", "says"), [
    ({**PVC, "cache": {"type": "EmptyDir"}}, "is cached on an EmptyDir, which is deleted with the pod"),
    ({**PVC, "cache": {"type": "HostPath"}}, "prompt caches are kept only on a PersistentVolumeClaim"),
    ({"source": {"volume": {"persistentVolumeClaim": "models", "path": "q.gguf"}}}, "has a volume source"),
])
def test_a_cache_that_cannot_keep_them_is_a_condition_not_a_pod(spec: dict[str, Any], says: str) -> None:
    plan = plan_server(server(promptCache={"persist": True}), {"qwen": _model(spec)}, Settings())
    assert isinstance(plan, PlanProblem)
    assert (plan.condition, plan.reason) == ("ModelResolved", "PromptCacheNotKept")
    assert plan.message.startswith("spec.promptCache.persist: LlamaModel qwen ") and says in plan.message


OTHER_SHA = "cd" * 32


def _router(**spec: Any) -> Any:
    return server(modelRef=None, models=[{"modelRef": {"name": "qwen"}, "parallel": 2},
                                         {"modelRef": {"name": "gemma"}, "alias": "g"},
                                         {"modelRef": {"name": "qwen"}, "alias": "qwen-long", "contextSize": 8192}],
                  **{"promptCache": {"persist": True, "maxSize": "1Gi"}, **spec})


def _router_models(gemma: dict[str, Any] = PVC) -> dict[str, LlamaModel]:
    gemma_model = resolved_model(name="gemma", spec=gemma, status={
        "sha256": OTHER_SHA, "cacheKey": "gemma-key", "files": [{"name": "g.gguf"}]})
    return {"qwen": _model(), "gemma": gemma_model}


def test_router_mode_keeps_them_on_the_first_models_claim_a_directory_per_model() -> None:
    assert not spec_problems(_router().spec, "default", Settings())  # no longer refused (CEL, webhook)
    plan = plan_server(_router(), _router_models(), Settings())
    assert isinstance(plan, ServerPlan)
    containers = _containers(plan)
    main, sidecar = containers[SERVER_CONTAINER], containers[DRAIN_CONTAINER]
    home = {"name": "model-cache-0", "mountPath": "/slots", "subPath": "slots/chat"}
    assert home in main["volumeMounts"] and sidecar["volumeMounts"] == [home]
    assert "--swa-full" in main["args"] and "--slot-save-path" not in main["args"]  # per model, in the preset
    preset = next(o for o in plan.objects if o["kind"] == "ConfigMap")["data"]["models.ini"]
    sections = {block.split("]")[0]: block for block in preset.split("\n[")[1:]}
    assert f"slot-save-path = /slots/{SHA[:16]}\n" in sections["qwen"]
    assert f"slot-save-path = /slots/{SHA[:16]}\n" in sections["qwen-long"]  # same weights, same directory
    assert f"slot-save-path = /slots/{OTHER_SHA[:16]}\n" in sections["g"]
    fetched = parse(containers["fetch-model-0"]["args"])
    assert fetched is not None and fetched.make_dirs == (
        "slots/chat", f"slots/chat/{SHA[:16]}", f"slots/chat/{OTHER_SHA[:16]}")  # before llama-server starts
    assert "--make-dir" not in containers["fetch-model-1"]["args"]
    args = sidecar["args"]
    assert args[args.index("--model-keys") + 1] == f"{SHA[:16]},{OTHER_SHA[:16]}" and "--slot-key" not in args


def test_router_mode_keeps_them_with_an_api_key_too() -> None:
    """The gateway's slot calls carry the requester's key (gateway/room.py), the sidecar reads the Secret."""
    spec = _router(apiKeySecretRef={"name": "keys", "key": "fleet"}).spec
    assert not [p for p in spec_problems(spec, "default", Settings()) if "promptCache" in p]


def test_router_mode_needs_the_first_models_cache_to_be_a_claim() -> None:
    models = _router_models()
    models["qwen"] = _model({**PVC, "cache": {"type": "EmptyDir"}})
    plan = plan_server(_router(), models, Settings())
    assert isinstance(plan, PlanProblem) and plan.reason == "PromptCacheNotKept"
    assert "LlamaModel qwen is cached on an EmptyDir" in plan.message
    # Another model's cache does not matter: the slots live on the first one's claim.
    other = _router_models({**PVC, "cache": {"type": "EmptyDir"}})
    assert isinstance(plan_server(_router(), other, Settings()), ServerPlan)


def test_a_router_keeping_nothing_gets_none_of_it() -> None:
    plan = plan_server(_router(promptCache=None), _router_models(), Settings())
    assert isinstance(plan, ServerPlan)
    containers = _containers(plan)
    assert "--swa-full" not in containers[SERVER_CONTAINER]["args"]
    assert "slot-save-path" not in next(o for o in plan.objects if o["kind"] == "ConfigMap")["data"]["models.ini"]
    assert "--make-dir" not in containers["fetch-model-0"]["args"] and "--model-keys" not in containers[
        DRAIN_CONTAINER]["args"]


class FakeRouterApi:
    """SlotApi in router mode: loaded models, their slots, a save per slot."""

    def __init__(self, loaded: dict[str, dict[int, int]], slots: int = 2) -> None:
        self.loaded, self.slots, self.model, self.calls = loaded, slots, None, []

    def loaded_models(self, timeout: float = 5.0) -> list[str]:
        return list(self.loaded)

    def for_model(self, model: str) -> FakeRouterApi:
        one = FakeRouterApi(self.loaded, self.slots)
        one.model, one.calls = model, self.calls
        return one

    def total_slots(self, timeout: float = 5.0) -> int:
        return self.slots

    def save(self, slot: int, filename: str, timeout: float) -> int:
        self.calls.append((self.model, slot, filename))
        return self.loaded[self.model].get(slot, 0)


def test_the_router_drain_saves_every_loaded_models_slots_by_name(tmp_path: Path) -> None:
    api = FakeRouterApi({"qwen": {0: 700}, "g": {1: 30}})
    directory = RouterSlotDirectory(tmp_path, [KEY], 1 << 20)
    outcome = save_router(directory, api, deadline=100.0, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert api.calls == [("qwen", 0, "qwen-0.slot"), ("qwen", 1, "qwen-1.slot"), ("g", 0, "g-0.slot"),
                         ("g", 1, "g-1.slot")]
    assert outcome.startswith("saved 2 slot(s) of 2 loaded model(s), 730 tokens")


def test_the_router_directory_prunes_other_keys_files_and_the_oldest_but_keeps_directories(tmp_path: Path) -> None:
    for key, name, size, mtime in ((KEY, "qwen-0.slot", 400, 3000), (KEY, "qwen-1.slot", 400, 1000),
                                   (OTHER, "old-0.slot", 100, 5000), ("b" * 16, "g-0.slot", 300, 2000)):
        (tmp_path / key).mkdir(exist_ok=True)
        (tmp_path / key / name).write_bytes(b"x" * size)
        os.utime(tmp_path / key / name, (mtime, mtime))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.slot").write_bytes(b"x")  # not a key directory: not ours
    directory = RouterSlotDirectory(tmp_path, [KEY, "b" * 16], 800)
    assert directory.prune() == 100 + 400  # OTHER's file, then the oldest of ours beyond 800 bytes
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.slot"))
    assert left == [f"{KEY}/qwen-0.slot", f"{'b' * 16}/g-0.slot", "notes/keep.slot"]
    assert (tmp_path / OTHER).is_dir()  # a pod of the previous revision may still save there


def test_the_model_key_names_the_weights() -> None:
    assert model_key(_model()) == SHA[:16]
    unsigned = _model(sha256=None)
    assert len(model_key(unsigned)) == 16 and model_key(unsigned) != SHA[:16]
    moved = resolved_model(spec=PVC, status={"cacheKey": "other-key", "files": [{"name": "q.gguf"}]})
    assert model_key(moved) != model_key(unsigned)


def _file(directory: Path, key: str, ms: int, slot: int = 0, size: int = 100, pod: str = "chat-1") -> str:
    name = f"{key}-{ms}-{pod}-{slot}.slot"
    (directory / name).write_bytes(b"x" * size)
    return name


KEY, OTHER = "0123456789abcdef", "fedcba9876543210"


def test_the_newest_files_of_this_model_are_restored_one_per_slot(tmp_path: Path) -> None:
    old, new, newest = _file(tmp_path, KEY, 1000), _file(tmp_path, KEY, 2000), _file(tmp_path, KEY, 3000, slot=1)
    _file(tmp_path, OTHER, 9000)
    (tmp_path / "notes.txt").write_text("not ours")
    directory = SlotDirectory(tmp_path, KEY, 1 << 20, "chat-2")
    assert directory.to_restore(2) == [newest, new]
    assert directory.to_restore(8) == [newest, new, old]


def test_pruning_deletes_another_models_files_then_the_oldest(tmp_path: Path) -> None:
    old, new = _file(tmp_path, KEY, 1000, size=600), _file(tmp_path, KEY, 2000, size=600)
    other = _file(tmp_path, OTHER, 9000, size=10)
    directory = SlotDirectory(tmp_path, KEY, 1000, "chat-2")
    assert directory.prune() == 610
    assert sorted(p.name for p in tmp_path.iterdir()) == [new]
    assert not (tmp_path / old).exists() and not (tmp_path / other).exists()


def test_a_pod_name_is_safe_in_a_file_name() -> None:
    assert pod_tag("Chat-7D9F_x/..") == "chat-7d9f-x---"[:63].strip("-") and pod_tag("") == "pod"


class FakeApi:
    def __init__(self, saved: dict[int, int], fail: set[int] = frozenset(), slots: int = 3) -> None:
        self.saved, self.fail, self.slots, self.calls = saved, fail, slots, []
        self.health = iter([False, False, True])

    def healthy(self) -> bool:
        return next(self.health, True)

    def total_slots(self, timeout: float = 5.0) -> int:
        return self.slots

    def save(self, slot: int, filename: str, timeout: float) -> int:
        self.calls.append(("save", slot, filename))
        if slot in self.fail:
            raise SlotApiError("answered 500")
        return self.saved.get(slot, 0)

    def restore(self, slot: int, filename: str, timeout: float) -> int:
        self.calls.append(("restore", slot, filename))
        if slot in self.fail:
            raise SlotApiError("answered 400 Unable to restore slot")
        return 10


def test_saving_skips_empty_slots_and_stops_at_the_deadline(tmp_path: Path) -> None:
    directory = SlotDirectory(tmp_path, KEY, 1 << 20, "chat-1")
    api = FakeApi({0: 700, 2: 5}, fail={1})
    outcome = save_all(directory, api, deadline=100.0, clock=lambda: 0.0)  # type: ignore[arg-type]
    assert outcome.startswith("saved 2 slot(s), 705 tokens")
    assert [c[1] for c in api.calls] == [0, 1, 2]
    late = FakeApi({0: 700})
    assert save_all(directory, late, deadline=1.0, clock=lambda: 0.9).startswith("saved 0")  # type: ignore[arg-type]
    assert late.calls == []


def test_restoring_waits_for_health_and_skips_what_fails(tmp_path: Path) -> None:
    names = [_file(tmp_path, KEY, ms) for ms in (3000, 2000, 1000)]
    api = FakeApi({}, fail={1}, slots=2)
    outcome = restore_all(SlotDirectory(tmp_path, KEY, 1 << 20, "x"), api, sleep=lambda _: None)  # type: ignore[arg-type]
    assert outcome == "restored 1 of 2 saved slot(s), 10 tokens"
    assert api.calls == [("restore", 0, names[0]), ("restore", 1, names[1])]


def test_the_drain_saves_once_idle_within_its_budget() -> None:
    now = [0.0]
    seen = []
    drain = Drain(lambda: 0, Timing(budget=30, min_wait=0, poll=1), clock=lambda: now[0],
                  sleep=lambda s: now.__setitem__(0, now[0] + s), when_idle=lambda d: seen.append(d) or "saved 1")
    assert drain.wait().endswith("; saved 1") and seen == [30.0]
    busy = Drain(lambda: 1, Timing(budget=3, min_wait=0, poll=1), clock=lambda: now[0],
                 sleep=lambda s: now.__setitem__(0, now[0] + s), when_idle=lambda d: "never")
    assert "never" not in busy.wait()  # a busy server's slots would make the save wait: not saved


def test_the_sidecar_is_ready_once_restored() -> None:
    ready = threading.Event()
    httpd = make_server(Drain(lambda: 0, Timing(budget=1)), 0, host="127.0.0.1", ready=ready)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}{DRAIN_READY_PATH}"
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 503
        ready.set()
        assert urllib.request.urlopen(url, timeout=5).status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("relative", ["../up", "/abs", "a/../../b", ""])
def test_the_fetcher_makes_only_a_directory_below_the_cache(tmp_path: Path, relative: str) -> None:
    assert make_dir(tmp_path, relative) is not None


def test_the_fetcher_makes_the_servers_directory_private(tmp_path: Path) -> None:
    assert make_dir(tmp_path, "slots/chat") is None
    assert (tmp_path / "slots" / "chat").is_dir() and os.stat(tmp_path / "slots" / "chat").st_mode & 0o777 == 0o700
    assert make_dir(tmp_path, "slots/chat") is None  # again: the next pod


def test_the_claim_needs_room_for_the_kept_caches_beside_the_model() -> None:
    model = resolved_model(spec={**PVC, "cache": {"type": "PersistentVolumeClaim", "size": "4Gi"}},
                           status={"sha256": SHA, "size": 3 << 30, "files": [{"name": "q.gguf"}]})
    assert isinstance(plan_server(server(promptCache={"persist": True}), {"qwen": model}, Settings()), ServerPlan)
    plan = plan_server(server(promptCache={"persist": True, "maxSize": "2Gi"}), {"qwen": model}, Settings())
    assert isinstance(plan, PlanProblem) and plan.reason == "PromptCacheNotKept"
    assert plan.message == ("spec.promptCache.maxSize: 2Gi does not fit LlamaModel qwen's cache (4Gi, 3.0 GiB of it "
                            "the model's files): set its cache.size to at least 5Gi, or a smaller maxSize")
    derived = resolved_model(spec=PVC, status={"sha256": SHA, "size": 3 << 30, "files": [{"name": "q.gguf"}]})
    assert isinstance(plan_server(server(promptCache={"persist": True}), {"qwen": derived}, Settings()), ServerPlan)


def test_the_sidecar_sends_one_key_of_several(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Secret may hold several keys, comma-separated, as llama-server's --api-key reads them: the whole list in
    one header would be refused 401 and the slots never saved."""
    monkeypatch.setenv("LLAMA_API_KEY", "first,second")
    assert slotstore.authorization() == {"Authorization": "Bearer first"}
    monkeypatch.setenv("LLAMA_API_KEY", "only")
    assert slotstore.authorization() == {"Authorization": "Bearer only"}
    monkeypatch.delenv("LLAMA_API_KEY")
    assert slotstore.authorization() == {}
