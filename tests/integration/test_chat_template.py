"""The ChatTemplate condition end to end: a model resolved from a (fake) hub whose GGUF has no chat template gives
its LlamaServer `ChatTemplate=False/NoChatTemplate` and one Warning Event, as `kubectl describe` shows them; setting
spec.chatTemplate turns it True and the Deployment gets `--no-jinja --chat-template <name>`."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import model_body, server_body
from tests.fakehub import FakeHub
from tests.tiny_gguf import write_tiny_llama

CRD = "llamacpp.dev/v1beta1"
REPO_ID, FILE = "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf"


@pytest.fixture(autouse=True)
def hub(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub()
    fake.add(REPO_ID, FILE, write_tiny_llama(tmp_path / "tiny.gguf"))  # no tokenizer.chat_template
    with fake.running():
        monkeypatch.setenv("LLAMA_OPERATOR_HF_ENDPOINT", fake.url)
        yield fake


def _chat_template(apiserver: Any, reason: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        status = (apiserver.read(CRD, "llamaservers", apiserver.namespace, "chat") or {}).get("status") or {}
        cond = {c["type"]: c for c in status.get("conditions") or []}.get("ChatTemplate")
        return cond if cond is not None and cond["reason"] == reason else None

    return apiserver.wait_for(found, timeout=20, message=f"ChatTemplate {reason}")  # type: ignore[no-any-return]


def _warnings(apiserver: Any) -> list[str]:
    return [e.get("message", "") for e in apiserver.list("v1", "events", apiserver.namespace)
            if e["involvedObject"].get("name") == "chat" and e["reason"] == "NoChatTemplate"]


def test_a_gguf_without_a_template_is_flagged_until_chat_template_is_set(apiserver: Any, run_operator: Any,
                                                                          kubectl_admin: Any) -> None:
    with run_operator("llama_operator.handlers"):
        apiserver.create_llama("llamamodels", model_body())
        apiserver.create_llama("llamaservers", server_body())
        cond = _chat_template(apiserver, "NoChatTemplate")
        assert cond["status"] == "False" and "LlamaModel qwen has no chat template" in cond["message"]
        model = apiserver.read(CRD, "llamamodels", apiserver.namespace, "qwen")
        assert model["status"]["gguf"]["hasChatTemplate"] is False
        apiserver.wait_for(lambda: _warnings(apiserver) == [cond["message"]], timeout=20,
                           message="one Warning Event NoChatTemplate")
        described = kubectl_admin("describe", "llamaserver", "chat", check=True).stdout
        assert "NoChatTemplate" in described

        apiserver.patch(CRD, "llamaservers", apiserver.namespace, "chat", {"spec": {"chatTemplate": "chatml"}})
        assert "chatml" in _chat_template(apiserver, "BuiltIn")["message"]
        deployment = apiserver.wait_for(lambda: (d := apiserver.read("apps/v1", "deployments", apiserver.namespace,
                                                                     "chat")) and "--no-jinja" in str(d) and d,
                                        timeout=20, message="the Deployment with --no-jinja")
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--chat-template") - 1:args.index("--chat-template") + 2] == [
            "--no-jinja", "--chat-template", "chatml"]
        assert len(_warnings(apiserver)) == 1  # once per new problem, not per reconcile
