"""LoRA adapters asked for by name (pure): a request for `<model>:<adapter>` gets llama-server's `lora` field.

A LlamaServer with spec.adapters starts llama-server with each adapter loaded at scale 0 (`--lora-scaled`,
flags/render.py); llama-server numbers them 0, 1, ... in spec.adapters' order and applies those a
request lists in its body's `lora` field (`[{"id": n, "scale": s}]`), for that request only, the others at
scale 0. The gateway serves each adapter as a model name of its own, `<model>:<adapter>` (routing.py), and
`with_adapter` writes that field into the body: `"lora":[{"id":n,"scale":s}],` right after the top-level
object's opening brace. The rest of the body, `model` included, goes on as the client sent it.

A request for `<model>:<adapter>` that sets `lora` itself is refused (BadBody, 400): the name already says which
adapter applies, and of two `lora` fields llama-server would read one. A request for `<model>` of a server with
adapters that sets no `lora` gets `"lora":[{"id":0,"scale":0}]` (`BASE`, every adapter off): llama-server b11312
clears a slot's prompt cache when a request's `lora` differs from the slot's last one, but not for a request
without `lora`, which then reused the KV cache an adapter computed for the same prompt and answered differently
from the base model (the e2e test through the sandbox found it). Its own `lora` is llama-server's feature, by
adapter id, and goes on untouched.
"""

from __future__ import annotations

import json
import re

from .scan import BadBody, Summary

_WS = re.compile(rb"[ \t\n\r]*+")


def lora_member(adapter_id: int, scale: float) -> bytes:
    """The member the gateway adds, with its trailing comma: `"lora":[{"id":0,"scale":1.0}],`."""
    return b'"lora":[{"id":%d,"scale":%s}],' % (adapter_id, json.dumps(scale).encode())


BASE = (0, 0.0)
"""The base model, explicitly: adapter 0 at scale 0, the others left out (llama-server sets them to 0)."""


def with_adapter(data: bytearray, summary: Summary, chosen: tuple[int, float]) -> None:
    """Apply adapter `chosen` ((id, scale): `Route.adapter` of the requested name) to the body `data`, in place.

    `summary` is scan(data): the body is whitespace, then one JSON object that has at least `model`, so the
    member and its comma after the opening brace keep it one valid object. Its offsets (messages, prompt) are
    stale afterwards. BadBody when the body sets `lora` itself."""
    if summary.lora:
        base, _, adapter = summary.model.rpartition(":")
        raise BadBody(f"The model '{summary.model}' names the adapter {adapter}; a request for it carries no "
                      f"'lora' field (ask for '{base}' to set adapters yourself).", code="invalid_lora",
                      param="lora")
    _insert(data, chosen)


def _insert(data: bytearray, chosen: tuple[int, float]) -> None:
    opening = _WS.match(data).end()  # type: ignore[union-attr]  # matches the empty string at worst
    # One memmove of the body (milliseconds for the largest); a few dozen bytes beyond the body's reservation
    # in the BodyBudget, which counts Content-Lengths.
    data[opening + 1:opening + 1] = lora_member(*chosen)


def with_base(data: bytearray, summary: Summary) -> None:
    """A request for the base model of a server with adapters: every adapter off, explicitly (see above); a body
    with its own `lora` is left as it is."""
    if not summary.lora:
        _insert(data, BASE)
