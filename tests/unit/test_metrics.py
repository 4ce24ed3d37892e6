"""The operator's own metrics, scraped over HTTP after real reconciles (FakeKube), and the scrape annotations
that let Prometheus find every llama-server's metrics."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from llama_operator import metrics
from llama_operator.api.v1beta1 import LlamaServer
from llama_operator.builders import build_deployment
from llama_operator.config import Settings
from llama_operator.fit import model_info
from llama_operator.gguf import FileByteSource, read_header
from llama_operator.kube import LLAMA_MODELS, LLAMA_SERVERS
from llama_operator.reconcile.context import Context
from llama_operator.reconcile.runtime import Runtime
from tests.conftest import model_body, resolved_model, server_body
from tests.fakekube import Events, FakeKube
from tests.metric_names import OPERATOR
from tests.tiny_gguf import write_tiny_llama
from tests.watch_cache import watched_over

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def port() -> int:
    port = _free_port()
    metrics.serve(port)  # the operator's endpoint, as `llama-operator run` starts it
    return port


def _scrape(port: int) -> dict[tuple[str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match and not line.startswith("#"):
            samples[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return samples


def _value(samples: dict[tuple[str, str], float], metric_name: str, **labels: str) -> float | None:
    for (metric, label_text), value in samples.items():
        if metric == metric_name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            return value
    return None


async def test_phases_replicas_and_memory_are_scraped(port: int, tmp_path: Path) -> None:
    gguf = model_info(await read_header(FileByteSource(write_tiny_llama(tmp_path / "tiny.gguf"))))
    kube = FakeKube()
    model = model_body(status={"phase": "Ready", "cacheKey": "tiny-0123456789ab", "files": [{"name": "m.gguf"}],
                               "gguf": gguf.to_wire()})
    kube.put(LLAMA_MODELS, model)
    for name in ("metrics-a", "metrics-b"):
        kube.put(LLAMA_SERVERS, server_body(name, replicas=2, contextSize=2048))
    runtime = Runtime(Context(kube=kube, settings=Settings(), record_event=Events()))  # type: ignore[arg-type]
    # The tracker is the process's: operators that earlier tests ran in this process left their objects in it.
    for kind in metrics.KINDS:
        metrics.PHASES.retain(kind, None, [])
    try:
        for name in ("metrics-a", "metrics-b"):
            verdict = await runtime.reconcile_server("default", name)
            assert verdict.ok, verdict
        samples = _scrape(port)
        names = {metric for metric, _ in samples}
        assert OPERATOR <= names, f"not scraped: {sorted(OPERATOR - names)}"
        # both servers wait for pods; every phase of both kinds is exported, 0 included
        assert _value(samples, "llama_operator_objects", kind="LlamaServer", phase="Pending") == 2
        assert _value(samples, "llama_operator_objects", kind="LlamaServer", phase="Ready") == 0
        assert _value(samples, "llama_operator_objects", kind="LlamaModel", phase="Failed") == 0
        assert _value(samples, "llama_operator_reconciles_total", kind="LlamaServer", result="ok") >= 2  # type: ignore[operator]
        assert _value(samples, "llama_operator_server_replicas", name="metrics-a", state="desired") == 2
        assert _value(samples, "llama_operator_server_replicas", name="metrics-a", state="ready") == 0
        status = kube.objects[("llamaservers", "default", "metrics-a")]["status"]
        host = _value(samples, "llama_operator_server_memory_estimate_bytes", name="metrics-a", device="host")
        assert host == int(status["memory"]["host"][:-2]) * 1024 * 1024

        # a deleted server leaves the gauges at its next (empty) reconcile
        del kube.objects[("llamaservers", "default", "metrics-b")]
        await runtime.reconcile_server("default", "metrics-b")
        samples = _scrape(port)
        assert _value(samples, "llama_operator_objects", kind="LlamaServer", phase="Pending") == 1
        assert _value(samples, "llama_operator_server_replicas", name="metrics-b", state="desired") is None
    finally:
        runtime.close()
        metrics.PHASES.retain("LlamaServer", None, [])


async def test_resync_prunes_objects_deleted_without_an_event(port: int) -> None:
    metrics.PHASES.observe("LlamaModel", "default", "gone", "Ready")
    metrics.PHASES.observe("LlamaModel", "default", "kept", "Ready")
    kube = FakeKube()
    kube.put(LLAMA_MODELS, model_body("kept", spec={"source": {"volume": {"persistentVolumeClaim": "models",
                                                                          "path": "m.gguf"}}}))
    runtime = Runtime(Context(kube=kube, settings=Settings(), record_event=Events(),  # type: ignore[arg-type]
                              watched=watched_over(kube)))  # the resync's objects: what the watch holds
    task = asyncio.create_task(runtime.resync_forever(LLAMA_MODELS, 0.01))
    try:
        async with asyncio.timeout(2):
            while _value(_scrape(port), "llama_operator_objects", kind="LlamaModel", phase="Ready") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        runtime.close()
        metrics.PHASES.retain("LlamaModel", None, [])


def _pod_annotations(server: LlamaServer) -> dict[str, Any]:
    deployment = build_deployment(server, resolved_model(), Settings())
    return deployment["spec"]["template"]["metadata"]["annotations"]  # type: ignore[no-any-return]


def test_pods_carry_the_prometheus_scrape_annotations() -> None:
    annotations = _pod_annotations(LlamaServer.model_validate(server_body()))
    assert {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    opted_out = _pod_annotations(LlamaServer.model_validate(server_body(
        podAnnotations={"prometheus.io/scrape": "false", "team": "ml"})))
    assert opted_out["prometheus.io/scrape"] == "false" and opted_out["team"] == "ml"


def test_phase_counts_follow_each_objects_changes() -> None:
    tracker = metrics.PhaseTracker()

    def counts() -> dict[str, float]:
        return {phase: metrics.OBJECTS.labels("LlamaServer", phase)._value.get()
                for phase in metrics.PHASES_BY_KIND["LlamaServer"]}

    for name in ("a", "b", "c"):
        tracker.observe("LlamaServer", "ns", name, None)
    tracker.observe("LlamaServer", "ns", "a", "Loading")
    tracker.observe("LlamaServer", "ns", "a", "Ready")
    tracker.observe("LlamaServer", "ns", "b", "Ready")
    tracker.observe("LlamaServer", "ns", "b", "Ready")  # unchanged: counted once
    assert counts() == {"Pending": 1, "Downloading": 0, "Loading": 0, "Ready": 2, "Degraded": 0, "Failed": 0}
    tracker.forget("LlamaServer", "ns", "a")
    tracker.retain("LlamaServer", None, [("ns", "b")])
    assert counts() == {"Pending": 0, "Downloading": 0, "Loading": 0, "Ready": 1, "Degraded": 0, "Failed": 0}
    tracker.retain("LlamaServer", None, [])
