"""scan.quick_summary, the fast lane's json.loads reading of a small body: where it answers, `scan` must answer the
same (model, stream, lora); where they could differ it must say None. Checked on the bodies that differ in what
matters (twice-named fields, escapes, NaN, depth, long names, nesting, other types) and on random ones."""

from __future__ import annotations

import json
import random

import pytest

from llama_operator.gateway.scan import MAX_DEPTH, MAX_MODEL_BYTES, BadBody, quick_summary, scan


def _scanned(body: bytes) -> tuple[str, bool, bool] | None:
    try:
        summary = scan(body)
    except BadBody:
        return None
    return summary.model, summary.stream, summary.lora


def _agrees(body: bytes) -> tuple[str, bool, bool] | None:
    quick = quick_summary(body)
    if quick is not None:
        assert quick == _scanned(body), body[:200]
    return quick


CHAT = {"model": "default/chat", "messages": [{"role": "user", "content": "hi"}]}


def test_a_usual_request_is_read_quickly_and_the_same() -> None:
    assert _agrees(json.dumps(CHAT).encode()) == ("default/chat", False, False)
    assert _agrees(json.dumps({**CHAT, "stream": True, "lora": []}).encode()) == ("default/chat", True, True)
    assert _agrees(json.dumps({**CHAT, "stream": "yes"}).encode()) == ("default/chat", False, False)
    assert _agrees(json.dumps({**CHAT, "content": "ünïcode ✓"}, ensure_ascii=False).encode()) is not None
    assert _agrees(b'{"mod\\u0065l": "default/chat"}') == ("default/chat", False, False)  # scan decodes names too


@pytest.mark.parametrize("body", [
    b'{"model": "a", "model": "b"}',
    b'{"model": "a", "mod\\u0065l": "b"}',  # named twice, once with an escape
    b'{"model": "a", "x": {"k": 1, "k": 2}}',  # json.loads keeps the last of any twice-named field
    b'{"model": "a", "n": NaN}',
    b'{"model": "a", "n": -Infinity}',
    b'{"model": 1}', b'{"model": ""}', b'{"model": null}', b'["model"]', b'"model"', b'{}',
    b'{"model": "a"} {}', b'{"model": "a"',
    b'{"model": "' + b"m" * MAX_MODEL_BYTES + b'"}',
    b'{"model": "' + b"\\u006d" * 50 + b'"}',  # 50 characters, 300 bytes as written
    b'{"model": "a", "x": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
    b'{"model": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"model": "a", "x": "\xff"}',
])
def test_what_scan_may_read_otherwise_is_left_to_it(body: bytes) -> None:
    assert _agrees(body) is None


def _value(rng: random.Random, depth: int) -> object:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 3.5, 1e300, 12345678901234567890])
    if kind in (2, 3, 4):
        return "".join(rng.choice('ab"\\\n\u00e9\u2713\U0001f600 model') for _ in range(rng.randrange(12)))
    if kind in (5, 6):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["model", "stream", "lora", "x", "messages"]): _value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def test_random_bodies_agree() -> None:
    rng = random.Random(20261204)
    quick = 0
    for _ in range(3000):
        fields = {rng.choice(["model", "stream", "lora", "x", "messages", "prompt"]): _value(rng, 1)
                  for _ in range(rng.randrange(5))}
        if rng.random() < 0.7:
            fields["model"] = rng.choice(["a/b", "m", "\u00fcber", "x" * 600, ""])
        text = json.dumps(fields, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.2:  # a field named twice, as a client may write it
            text = text.replace("{", '{"model": "dup", ', 1)
        quick += _agrees(text.encode()) is not None
    assert quick > 1000  # most of them are read quickly
