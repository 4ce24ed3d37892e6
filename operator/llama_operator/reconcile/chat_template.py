"""The `ChatTemplate` condition of a LlamaServer (pure): will /v1/chat/completions be formatted the way the model
expects?

llama-server formats chat messages with spec.chatTemplate when it is set (llama.cpp's built-in formatter), else
with the GGUF's own `tokenizer.chat_template`; a GGUF without one (a converted or repackaged file, or a base
model) silently gets chatml, and a model trained on another format answers by echoing the prompt. That is a
working server giving bad answers, so the condition warns and does not hold the server back:
- `True/FromModel`: every model's GGUF carries a template; `True/BuiltIn`: spec.chatTemplate names one.
- `False/NoChatTemplate`: a model has neither; the message names it and what to set.
- `Unknown/NotRead`: the LlamaModel's status has no GGUF header (volume sources, or resolved before it was read).
- `True/NotUsed`: the server (or every model of a router) is in embedding or rerank mode: no chat to format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..api.v1beta1 import Condition, GgufInfo, LlamaModel, LlamaServer
from .conditions import condition

CONDITION = "ChatTemplate"
PROBLEM = "NoChatTemplate"

_SUGGESTED = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma", "phi3": "phi3",
              "qwen2": "chatml", "qwen3": "chatml", "command-r": "command-r", "cohere2": "command-r"}
"""Built-in templates that fit an architecture's instruction-tuned models, for the hint only."""


@dataclass(frozen=True)
class ChatModel:
    """One model a server formats chat for: its LlamaModel name, the template set for it, what its GGUF says."""

    name: str
    chat_template: str | None
    gguf: GgufInfo | None
    mode: str = "chat"


def chat_models(server: LlamaServer, models: Mapping[str, LlamaModel]) -> list[ChatModel]:
    """What the server formats chat for: its model, or each entry of spec.models; `models` by name, resolved."""
    spec = server.spec
    if spec.models is not None:
        return [ChatModel(entry.model_ref.name, entry.chat_template, models[entry.model_ref.name].status.gguf,
                          entry.mode) for entry in spec.models]
    assert spec.model_ref is not None  # LlamaServerSpec: exactly one of modelRef and models
    return [ChatModel(spec.model_ref.name, spec.chat_template, models[spec.model_ref.name].status.gguf, spec.mode)]


QUIET = ("FromModel", "BuiltIn", "NotRead", "NotUsed")
"""Reasons that are no problem: no Warning Event."""


def chat_template_condition(models: Sequence[ChatModel], *, generation: int | None) -> Condition:
    models = [m for m in models if m.mode == "chat"]
    if not models:
        return condition(CONDITION, True, "NotUsed", "embedding or rerank mode: no chat to format",
                         generation=generation)
    missing = [m for m in models if m.chat_template is None and m.gguf is not None
               and m.gguf.has_chat_template is False]
    if missing:
        return condition(CONDITION, False, PROBLEM, "; ".join(_missing_message(m) for m in missing),
                         generation=generation)
    unread = [m.name for m in models if m.chat_template is None
              and (m.gguf is None or m.gguf.has_chat_template is None)]
    if unread:
        return condition(CONDITION, None, "NotRead", f"not known whether the GGUF of LlamaModel "
                         f"{', '.join(unread)} has a chat template (its status has no GGUF header)",
                         generation=generation)
    built_in = [f"{m.name}: {m.chat_template}" for m in models if m.chat_template is not None]
    if built_in:
        return condition(CONDITION, True, "BuiltIn", f"llama.cpp's built-in template ({', '.join(built_in)})",
                         generation=generation)
    return condition(CONDITION, True, "FromModel", "the GGUF's own template", generation=generation)


def _missing_message(model: ChatModel) -> str:
    architecture = model.gguf.architecture if model.gguf is not None else None
    suggested = _SUGGESTED.get(architecture or "")
    hint = f" (for {architecture}: {suggested})" if suggested else " (e.g. chatml, llama3, gemma)"
    return (f"the GGUF of LlamaModel {model.name} has no chat template: llama-server formats chat requests as "
            f"chatml, which the model may not have been trained on; set chatTemplate{hint}, or send "
            "/v1/completions")
