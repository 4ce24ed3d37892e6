"""Download progress: the fetcher's progress lines, read back from the running fetch container's log, become
status.download, the message and a re-reconcile every progress interval while Downloading; nothing afterwards."""

from __future__ import annotations

from pathlib import Path

from llama_operator import contract
from llama_operator.config import Settings
from llama_operator.fit import model_info
from llama_operator.gguf import FileByteSource, read_header
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS, PODS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.download import download_status, running_fetchers
from llama_operator.reconcile.runtime import Runtime
from tests.conftest import model_body, server_body
from tests.fakekube import Events, FakeKube
from tests.tiny_gguf import write_tiny_llama

SERVER_LABELS = {"app.kubernetes.io/name": "llama-server", "llamacpp.dev/server": "chat",
                 "app.kubernetes.io/managed-by": "llama-operator"}


def _line(done: int, total: int, rate: float) -> str:
    return "2026-12-02 10:00:00,000 INFO " + contract.progress_line("m.gguf", done, total, rate, eta="1s",
                                                                     connections=1)


def _pod(name: str, fetch_state: dict, server_ready: bool = False) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                                           "labels": SERVER_LABELS},
            "status": {"phase": "Pending" if "running" in fetch_state else "Running",
                       "initContainerStatuses": [{"name": contract.FETCH_CONTAINER, "state": fetch_state}],
                       "containerStatuses": [{"name": contract.SERVER_CONTAINER, "ready": server_ready,
                                              "state": {"running": {}}}]}}


def test_progress_lines_round_trip_and_the_newest_wins() -> None:
    tail = "\n".join([_line(10, 100, 1e6), "some other line", _line(40, 100, 2.5e6), "Waiting for the lock"])
    progress = contract.parse_progress(tail)
    assert progress == contract.Progress("m.gguf", 40, 100, 2.5e6)
    status = download_status("chat-1", progress)
    assert (status.percent, status.bytes_done, status.bytes_total, status.bytes_per_second) == (40, 40, 100, 2500000)
    assert status.summary == "40% of 100 B, 2.5 MB/s"
    assert contract.parse_progress("Downloaded m.gguf: 1.0 MiB in 1s") is None


def test_only_running_fetch_containers_of_live_pods_are_read() -> None:
    running = _pod("a", {"running": {}})
    done = _pod("b", {"terminated": {"exitCode": 0}})
    deleting = _pod("c", {"running": {}})
    deleting["metadata"]["deletionTimestamp"] = "2026-12-02T10:00:00Z"
    assert running_fetchers([running, done, deleting]) == [("a", contract.FETCH_CONTAINER)]


async def test_downloading_server_reports_progress_and_is_polled_until_it_is_done(tmp_path: Path) -> None:
    gguf = model_info(await read_header(FileByteSource(write_tiny_llama(tmp_path / "tiny.gguf"))))
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body(status={"phase": "Ready", "cacheKey": "tiny-0123456789ab",
                                              "files": [{"name": "m.gguf"}], "gguf": gguf.to_wire()}))
    kube.put(LLAMA_SERVERS, server_body("chat", contextSize=512))
    runtime = Runtime(Context(kube=kube, settings=Settings(), record_event=Events()))  # type: ignore[arg-type]
    try:
        kube.put(PODS, _pod("chat-1", {"running": {}}))
        kube.logs[("default", "chat-1", contract.FETCH_CONTAINER)] = _line(30 * 2**20, 120 * 2**20, 12.5e6)
        assert (await runtime.reconcile_server("default", "chat")).ok
        status = kube.objects[("llamaservers", "default", "chat")]["status"]
        assert status["phase"] == "Downloading"
        assert status["download"] == {"pod": "chat-1", "file": "m.gguf", "bytesDone": 30 * 2**20,
                                      "bytesTotal": 120 * 2**20, "percent": 25, "bytesPerSecond": 12500000,
                                      "summary": "25% of 120.0 MiB, 12.5 MB/s"}
        assert status["message"] == "pod chat-1: downloading the model (25% of 120.0 MiB, 12.5 MB/s)"
        # Nothing else would wake the reconcile while bytes arrive: it is scheduled again by itself.
        retry = runtime._retries[("llamaservers", "default", "chat")]
        assert 0 < retry.when() - __import__("asyncio").get_running_loop().time() <= contract.PROGRESS_INTERVAL_SECONDS

        kube.put(PODS, _pod("chat-1", {"terminated": {"exitCode": 0}}, server_ready=True))
        assert (await runtime.reconcile_server("default", "chat")).ok
        status = kube.objects[("llamaservers", "default", "chat")]["status"]
        assert status["phase"] != "Downloading" and "download" not in status
        assert ("llamaservers", "default", "chat") not in runtime._retries
    finally:
        runtime.close()
