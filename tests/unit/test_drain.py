"""The drain sidecar (`llama-operator drain`) against a fake llama-server speaking the pinned build's /metrics
and router /models, its timing with a fake clock, and what the builders put into the pod for it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llama_operator import drain
from llama_operator.builders import build_deployment
from llama_operator.config import Settings
from llama_operator.contract import DRAIN_CONTAINER, DRAIN_PATH, DRAIN_PORT, SERVER_CONTAINER
from llama_operator.drain import Drain, ServerState, Timing, Unreadable, busy_from_metrics
from llama_operator.reconcile.server_status import summarize_pod
from tests.conftest import resolved_model, server

METRICS = """# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing {processing}
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred {deferred}
"""


class FakeLlama:
    """One-model (`/metrics`) or router (`/models`, `/metrics?model=&autoload=false`) llama-server."""

    def __init__(self, *, router: bool = False) -> None:
        self.router = router
        self.processing = 0
        self.deferred = 0
        self.models: dict[str, str] = {"a": "loaded", "b": "unloaded"}
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                fake.paths.append(self.path)
                status, body = fake.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def answer(self, path: str) -> tuple[int, bytes]:
        metrics = METRICS.format(processing=self.processing, deferred=self.deferred).encode()
        if path == "/metrics":
            return (400, b'{"error":{"message":"model name is missing"}}') if self.router else (200, metrics)
        if self.router and path == "/models":
            data = [{"id": name, "status": {"value": state}} for name, state in self.models.items()]
            return 200, json.dumps({"data": data, "object": "list"}).encode()
        if self.router and path.startswith("/metrics?"):
            name = path.split("model=")[1].split("&")[0]
            assert "autoload=false" in path, "a drain poll must never load a model"
            return (200, metrics) if self.models.get(name) == "loaded" else (400, b"model is not loaded")
        return 404, b"not found"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def one() -> Iterator[FakeLlama]:
    fake = FakeLlama()
    yield fake
    fake.close()


@pytest.fixture
def router() -> Iterator[FakeLlama]:
    fake = FakeLlama(router=True)
    yield fake
    fake.close()


def test_one_model_counts_processing_and_deferred(one: FakeLlama) -> None:
    state = ServerState(one.url)
    assert state.busy() == 0
    one.processing, one.deferred = 2, 1
    assert state.busy() == 3


def test_router_reads_only_loaded_instances_without_loading_any(router: FakeLlama) -> None:
    state = ServerState(router.url)
    router.processing = 1
    assert state.busy() == 1
    assert "/metrics?model=a&autoload=false" in router.paths
    assert not any("model=b" in path for path in router.paths)
    router.models["b"] = "loading"  # a request waits on it
    router.processing = 0
    assert state.busy() == 1


def test_a_server_that_is_gone_holds_nothing() -> None:
    fake = FakeLlama()
    url = fake.url
    fake.close()
    assert ServerState(url).busy() == 0


@pytest.mark.parametrize("text", ["", "llamacpp:requests_processing many\n", "other_metric 1\n"])
def test_an_unreadable_metrics_page_is_an_error_not_idle(text: str) -> None:
    with pytest.raises(Unreadable):
        busy_from_metrics(text)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _drain(busy: list[int | Exception], budget: float = 60, min_wait: float = 5) -> tuple[str, float]:
    fake = FakeTime()
    answers = iter(busy)

    def poll() -> int:
        value = next(answers, busy[-1])
        if isinstance(value, Exception):
            raise value
        return value

    outcome = Drain(poll, Timing(budget=budget, min_wait=min_wait), clock=fake.clock, sleep=fake.sleep).wait()
    return outcome, fake.now - 100.0


def test_an_idle_server_is_still_held_for_the_minimum_wait() -> None:
    outcome, took = _drain([0])
    assert outcome.startswith("idle") and took == 5


def test_the_answer_waits_for_two_idle_polls_in_a_row() -> None:
    outcome, took = _drain([2, 1, 0, 1, 0, 0])
    assert outcome.startswith("idle") and took == 6


def test_a_busy_server_is_answered_when_the_budget_is_spent() -> None:
    outcome, took = _drain([3], budget=20)
    assert took == 20 and outcome == "budget of 20 s spent: 3 request(s) still in progress"


def test_an_unreadable_state_counts_as_busy_until_the_budget() -> None:
    outcome, took = _drain([Unreadable("/metrics answered 500")], budget=12)
    assert took == 12 and "state unknown (/metrics answered 500)" in outcome


def test_a_budget_below_the_minimum_wait_wins() -> None:
    outcome, took = _drain([0], budget=3, min_wait=5)
    assert outcome.startswith("idle") and took == 3


def test_the_endpoint_answers_when_the_fake_server_goes_idle(one: FakeLlama) -> None:
    one.processing = 1
    state = ServerState(one.url)
    sidecar = drain.make_server(Drain(state.busy, Timing(budget=10, min_wait=0.2, poll=0.1)), 0, "127.0.0.1")
    threading.Thread(target=sidecar.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{sidecar.server_address[1]}"
    try:
        threading.Timer(0.6, lambda: setattr(one, "processing", 0)).start()
        start = time.monotonic()
        with urllib.request.urlopen(url + DRAIN_PATH, timeout=10) as response:
            body = response.read().decode()
        assert body.startswith("idle") and 0.6 <= time.monotonic() - start < 5
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + "/other", timeout=5)
        assert missing.value.code == 404
    finally:
        sidecar.shutdown()
        sidecar.server_close()


def test_the_drain_command_line_is_light_and_says_bad_arguments_in_one_line() -> None:
    probe = ("import sys\nfrom llama_operator.cli import build_parser\nbuild_parser('drain')\n"
             "print('\\n'.join(sys.modules))")
    modules = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                             check=True).stdout.split()
    assert not [m for m in modules if m.startswith(("pydantic", "llama_operator.api", "httpx", "kopf", "yaml"))]
    proc = subprocess.run([sys.executable, "-m", "llama_operator.cli", "drain", "--budget-seconds", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _pod(settings: Settings, **spec: Any) -> dict[str, Any]:
    return build_deployment(server(**spec), resolved_model(), settings)["spec"]["template"]["spec"]


def test_the_pod_waits_on_the_sidecar_within_the_servers_budget(settings: Settings) -> None:
    pod = _pod(settings, terminationGracePeriodSeconds=300)
    sidecar = pod["initContainers"][-1]
    main = next(c for c in pod["containers"] if c["name"] == SERVER_CONTAINER)
    assert pod["terminationGracePeriodSeconds"] == 300
    assert sidecar["name"] == DRAIN_CONTAINER and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == settings.fetcher_image
    assert sidecar["args"][sidecar["args"].index("--budget-seconds") + 1] == "295"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["resources"]["limits"]["memory"] == "64Mi"
    assert main["lifecycle"] == {"preStop": {"httpGet": {"path": DRAIN_PATH, "port": DRAIN_PORT}}}
    assert _pod(settings)["terminationGracePeriodSeconds"] == 120


def test_a_running_sidecar_does_not_hold_the_pod_in_loading() -> None:
    pod = {"metadata": {"name": "p"}, "status": {
        "initContainerStatuses": [{"name": "fetch-model", "state": {"terminated": {"exitCode": 0}}},
                                  {"name": DRAIN_CONTAINER, "state": {"running": {}}}],
        "containerStatuses": [{"name": SERVER_CONTAINER, "ready": True, "state": {"running": {}}}]}}
    assert summarize_pod(pod).phase == "Ready"


@pytest.mark.parametrize("seconds", [9, 3601])
def test_the_budget_is_bounded(seconds: int) -> None:
    with pytest.raises(ValueError, match="terminationGracePeriodSeconds"):
        server(terminationGracePeriodSeconds=seconds)
