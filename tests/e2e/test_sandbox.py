"""The product end to end through `llama-operator sandbox`: the real operator, the exact objects it renders,
the real fetcher and the real llama-server, called with the official OpenAI client.

No code path of the operator or of the rendered objects knows about the sandbox; the only test-specific
input is LLAMA_OPERATOR_HF_ENDPOINT (an operator setting), pointing at a local fake Hugging Face.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from kubernetes.client.exceptions import ApiException

from tests.e2e.conftest import SandboxProcess, custom_object, tree_processes, wait_for
from tests.fakehub import FakeHub

pytestmark = [pytest.mark.e2e, pytest.mark.runtime]
GROUP, VERSION, NS = "llamacpp.dev", "v1alpha1", "default"


def _create(sandbox: SandboxProcess, plural: str, name: str, spec: dict[str, Any]) -> None:
    sandbox.custom.create_namespaced_custom_object(GROUP, VERSION, NS, plural, custom_object(plural, name, spec))


def _status(sandbox: SandboxProcess, plural: str, name: str) -> dict[str, Any]:
    try:
        return sandbox.custom.get_namespaced_custom_object(GROUP, VERSION, NS, plural, name).get("status") or {}
    except ApiException as exc:
        if exc.status == 404:
            return {}
        raise


def _wait_phase(sandbox: SandboxProcess, plural: str, name: str, phase: str, *, timeout: float = 90,
                check: Any = None) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = _status(sandbox, plural, name)
        return status if status.get("phase") == phase and (check is None or check(status)) else None
    try:
        return wait_for(reached, timeout=timeout, message=f"{plural}/{name} phase {phase}")
    except TimeoutError:
        raise AssertionError(f"last status of {name}: {_status(sandbox, plural, name)}\n{sandbox.log()}") from None


def _pods(sandbox: SandboxProcess, server: str) -> list[Any]:
    return sandbox.core.list_namespaced_pod(NS, label_selector=f"llamacpp.dev/server={server}").items


def _server_pid(pod: Any) -> int:
    status = next(s for s in pod.status.container_statuses if s.name == "llama-server")
    return int(status.container_id.removeprefix("sandbox://"))


def _chat(client: openai.OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, max_tokens=8,
                                           messages=[{"role": "user", "content": "Say hello"}])
    assert reply.choices[0].finish_reason in ("length", "stop")
    return reply.choices[0].message.content or ""


def test_tiny_model_lifecycle(sandbox_factory: Any, tiny_gguf: Path) -> None:
    hub = FakeHub()
    served = hub.add("test/tiny-GGUF", "tiny-q8_0.gguf", tiny_gguf)
    with hub.running():
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url})
        _create(sandbox, "llamamodels", "tiny", {"source": {"huggingFace": {
            "repo": "test/tiny-GGUF", "file": "tiny-q8_0.gguf"}}})
        model = _wait_phase(sandbox, "llamamodels", "tiny", "Ready", timeout=60)
        assert model["sha256"] == served.sha256
        resolved_bytes = hub.bytes_served.get(served.name, 0)  # the operator read the GGUF header

        # apply -> Ready: two replicas, each with its own (EmptyDir) cache
        started = time.monotonic()
        _create(sandbox, "llamaservers", "chat", {"modelRef": {"name": "tiny"}, "replicas": 2, "contextSize": 256})
        status = _wait_phase(sandbox, "llamaservers", "chat", "Ready", check=lambda s: s.get("readyReplicas") == 2)
        print(f"tiny model, cold cache: apply -> Ready in {time.monotonic() - started:.1f}s")
        assert status["modelName"] == "tiny"
        sandbox.wait_line(r"LlamaServer default/chat is Ready: http://127\.0\.0\.1:\d+/v1")

        # downloaded exactly once per cache, and verified
        pods = _pods(sandbox, "chat")
        assert len(pods) == 2
        assert hub.bytes_served[served.name] - resolved_bytes == 2 * served.size
        for pod in pods:
            pod_dir = next((sandbox.state_dir / "pods").glob(f"{NS}_{pod.metadata.name}_*"))
            cache = next((pod_dir / "volumes" / "model-cache").iterdir())
            assert (cache / "tiny-q8_0.gguf.verified").exists()
            assert "Verified tiny-q8_0.gguf" in (pod_dir / "fetch-model.log").read_text()
            fetch = next(s for s in pod.status.init_container_statuses if s.name == "fetch-model")
            assert fetch.state.terminated.exit_code == 0

        # the OpenAI API through the Service
        client = openai.OpenAI(base_url=sandbox.url("default/chat") + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert isinstance(_chat(client, "tiny"), str)
        chunks = list(client.chat.completions.create(model="tiny", max_tokens=8, stream=True,
                                                     messages=[{"role": "user", "content": "Count"}]))
        assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in (None, "length", "stop")

        # a setting change rolls the pods (new ones Ready before old ones go) and reaches Ready again
        old_names = {p.metadata.name for p in pods}
        sandbox.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", "chat",
                                                      {"spec": {"contextSize": 512}})
        _wait_phase(sandbox, "llamaservers", "chat", "Ready", timeout=120, check=lambda s: (
            s.get("observedGeneration") == 2 and s.get("readyReplicas") == 2
            and not old_names & {p.metadata.name for p in _pods(sandbox, "chat")}
            and len(_pods(sandbox, "chat")) == 2))
        for pod in _pods(sandbox, "chat"):
            args = (Path("/proc") / str(_server_pid(pod)) / "cmdline").read_bytes().split(b"\0")
            assert args[args.index(b"--ctx-size") + 1] == b"512"
        assert len(_chat(client, "tiny")) >= 0

        # a bad flag is rejected with a message, and nothing is started for it
        _create(sandbox, "llamaservers", "bad", {"modelRef": {"name": "tiny"}, "args": ["--no-such-flag", "1"]})
        bad = _wait_phase(sandbox, "llamaservers", "bad", "Failed", timeout=30)
        assert "--no-such-flag" in bad["message"]
        assert _pods(sandbox, "bad") == []

        # a killed llama-server is restarted and the fleet is Ready again
        victim = _pods(sandbox, "chat")[0]
        os.kill(_server_pid(victim), signal.SIGKILL)

        def restarted_and_ready() -> bool:
            pod = next(p for p in _pods(sandbox, "chat") if p.metadata.name == victim.metadata.name)
            status = pod.status.container_statuses[0]
            return status.restart_count == 1 and status.ready

        wait_for(restarted_and_ready, timeout=60, message="llama-server restarted and ready")
        _wait_phase(sandbox, "llamaservers", "chat", "Ready", timeout=60, check=lambda s: s.get("readyReplicas") == 2)
        restarted = next(p for p in _pods(sandbox, "chat") if p.metadata.name == victim.metadata.name)
        status = restarted.status.container_statuses[0]
        assert status.ready and status.last_state.terminated.exit_code == 137
        assert restarted.status.init_container_statuses[0].restart_count == 0  # no second download
        _chat(client, "tiny")

        # delete everything: no process is left
        for name in ("chat", "bad"):
            sandbox.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "llamaservers", name)
        sandbox.custom.delete_namespaced_custom_object(GROUP, VERSION, NS, "llamamodels", "tiny")
        wait_for(lambda: not [p for p in tree_processes(str(sandbox.state_dir / "pods"))], timeout=45,
                 message="every pod process to exit")
        assert _pods(sandbox, "chat") == []
        assert sandbox.stop() == 0
        assert tree_processes(str(sandbox.state_dir)) == []


def test_gemma_with_api_key(sandbox_factory: Any, gemma_gguf: Path) -> None:
    hub = FakeHub()
    hub.add("unsloth/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf", gemma_gguf)
    with hub.running():
        sandbox = sandbox_factory(env={"LLAMA_OPERATOR_HF_ENDPOINT": hub.url})
        sandbox.core.create_namespaced_secret(NS, {"metadata": {"name": "llama-key"}, "data": {
            "key": base64.b64encode(b"sk-sandbox-test").decode()}})
        _create(sandbox, "llamamodels", "gemma", {"source": {"huggingFace": {
            "repo": "unsloth/gemma-3-270m-it-GGUF", "file": "gemma-3-270m-it-Q4_K_M.gguf"}}})
        started = time.monotonic()
        _create(sandbox, "llamaservers", "gemma", {"modelRef": {"name": "gemma"}, "contextSize": 2048,
                                                   "apiKeySecretRef": {"name": "llama-key", "key": "key"}})
        _wait_phase(sandbox, "llamaservers", "gemma", "Ready", timeout=180)
        print(f"gemma3-270m, cold cache: apply -> Ready in {time.monotonic() - started:.1f}s")
        base = sandbox.url("default/gemma") + "/v1"

        assert httpx.get(base + "/models").status_code == 401  # no key at all
        anonymous = openai.OpenAI(base_url=base, api_key="wrong-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as denied:
            anonymous.models.list()
        assert denied.value.status_code == 401

        client = openai.OpenAI(base_url=base, api_key="sk-sandbox-test", max_retries=0)
        reply = client.chat.completions.create(model="gemma", max_tokens=16,
                                               messages=[{"role": "user", "content": "What is 2+2?"}])
        assert reply.choices[0].message.content
        assert sandbox.stop() == 0
        assert tree_processes(str(sandbox.state_dir)) == []
