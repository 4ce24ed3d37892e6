"""The ChatTemplate condition: read from the GGUF header, judged with the server's chatTemplate and mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_operator.api.v1beta1 import Condition, GgufInfo
from llama_operator.gguf import FileByteSource, read_header
from llama_operator.reconcile.chat_template import QUIET, ChatModel, chat_template_condition
from llama_operator.reconcile.conditions import problem_event

from ..tiny_gguf import write_tiny_llama

WITH = GgufInfo(architecture="qwen2", has_chat_template=True)
WITHOUT = GgufInfo(architecture="gemma3", has_chat_template=False)


async def test_the_header_says_whether_the_gguf_has_a_template(tmp_path: Path) -> None:
    bare = write_tiny_llama(tmp_path / "bare.gguf")
    templated = write_tiny_llama(tmp_path / "templated.gguf", chat_template="{{ messages[0]['content'] }}")
    assert (await read_header(FileByteSource(bare))).info().has_chat_template is False
    assert (await read_header(FileByteSource(templated))).info().has_chat_template is True


@pytest.mark.parametrize(("models", "status", "reason", "in_message"), [
    ([ChatModel("qwen", None, WITH)], "True", "FromModel", "the GGUF's own template"),
    ([ChatModel("gemma", "gemma", WITHOUT)], "True", "BuiltIn", "gemma: gemma"),
    ([ChatModel("gemma", None, WITHOUT)], "False", "NoChatTemplate",
     "LlamaModel gemma has no chat template: llama-server formats chat requests as chatml, which the model may "
     "not have been trained on; set chatTemplate (for gemma3: gemma), or send /v1/completions"),
    ([ChatModel("odd", None, GgufInfo(architecture="mamba", has_chat_template=False))], "False", "NoChatTemplate",
     "set chatTemplate (e.g. chatml, llama3, gemma)"),
    ([ChatModel("shelf", None, None)], "Unknown", "NotRead", "LlamaModel shelf"),
    ([ChatModel("old", None, GgufInfo(architecture="llama"))], "Unknown", "NotRead", "LlamaModel old"),
    ([ChatModel("gemma", None, WITHOUT, mode="embedding")], "True", "NotUsed", "no chat"),
    # Router mode: one model without a template is enough, and it is named.
    ([ChatModel("qwen", None, WITH), ChatModel("gemma", None, WITHOUT), ChatModel("embed", None, WITHOUT,
                                                                                  mode="embedding")],
     "False", "NoChatTemplate", "LlamaModel gemma has"),
])
def test_condition(models: list[ChatModel], status: str, reason: str, in_message: str) -> None:
    found = chat_template_condition(models, generation=3)
    assert (found.type, found.status, found.reason, found.observed_generation) == ("ChatTemplate", status, reason, 3)
    assert in_message in found.message
    if reason == "NoChatTemplate":
        assert "embed" not in found.message


def test_a_warning_event_once_per_new_problem() -> None:
    events: list[tuple[str, str]] = []

    class Ctx:
        def record_event(self, body: object, *, type: str, reason: str, message: str) -> None:
            events.append((type, reason))

    good = chat_template_condition([ChatModel("qwen", None, WITH)], generation=1)
    bad = chat_template_condition([ChatModel("gemma", None, WITHOUT)], generation=2)
    fixed = chat_template_condition([ChatModel("gemma", "gemma", WITHOUT)], generation=3)
    sequence: list[tuple[list[Condition], list[Condition]]] = [([], [good]), ([good], [bad]), ([bad], [bad]),
                                                               ([bad], [fixed])]
    for before, after in sequence:
        problem_event(Ctx(), {}, before, after, "ChatTemplate", quiet=QUIET)  # type: ignore[arg-type]
    assert events == [("Warning", "NoChatTemplate")]
