"""The gateway's bounded body scan (pure): the routing fields, one-line 400s, and hostile bodies in bounded time."""

from __future__ import annotations

import json
import time

import pytest

from llama_operator.gateway.balancer import prompt_prefix
from llama_operator.gateway.scan import MAX_DEPTH, MAX_TOKENS, BadBody, affinity_payload, scan

ROUTABLE = [
    b'{"model": "m"}',
    b' {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", '
    b'"text": "caf\\u00e9 \\"q\\""}]}, {"role": "assistant", "content": null}], "model": "team-a/chat", '
    b'"stream": true}\n',
    b'{"model": "m", "x": [[1, [2, {"a": "]"}]], {}], "y": {"z": "\\"}"}, "n": -1.5e3, "t": true, "f": null}',
    b'{"model": "m", "prompt": ["hello", 1]}',
    b'{"model": "m", "input": "embed me"}',
    b'{"model": "m", "messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": '
    b'"data:image/png;base64,AAAA"}}, {"type": "text", "text": "look"}]}, {"role": "user", "content": "hi"}]}',
]


@pytest.mark.parametrize("body", ROUTABLE)
def test_routing_fields_and_prefix_match_a_full_parse(body: bytes) -> None:
    parsed = json.loads(body)
    summary = scan(body)
    assert (summary.model, summary.stream) == (parsed["model"], parsed.get("stream") is True)
    for chars in (3, 2048):
        assert prompt_prefix(affinity_payload(body, summary, chars), chars) == prompt_prefix(parsed, chars)


@pytest.mark.parametrize(("body", "message"), [
    (b"[]", "must be a JSON object with a 'model' field"),
    (b"", "must be a JSON object"),
    (b'{"model": "m"', "expected ',' or '}' at byte 13, found the end"),
    (b'{"model": "m"} x', "more data after the object, at byte 15"),
    (b'{"model": "m",}', "expected a field name at byte 14"),
    (b'{"model": 1}', "'model' must be a string."),
    (b'{"model": "m", "model": "n"}', "names 'model' twice"),
    (b'{"stream": true}', "You must provide a model parameter."),
    (b'{"model": "' + b"x" * 600 + b'"}', "'model' is longer than 512 bytes"),
    (b'{"model": "m", "x": [}', "unmatched '}' at byte 21"),
    (b'{"model": "m", "x": "ab}', "unterminated string at byte 20"),
    (b'{"model": "m", "x": "ab\\', "unterminated string at byte 20"),
    (b'{"model": "m", "a": tru}', "unexpected 't' at byte 20"),
    (b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", f"nested more than {MAX_DEPTH} levels"),
])
def test_what_cannot_be_routed_is_one_line(body: bytes, message: str) -> None:
    with pytest.raises(BadBody) as caught:
        scan(body)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"model": "m", "messages": {}}', "'messages' must be an array of message objects."),
    (b'{"model": "m", "messages": [1]}', "messages[0] must be an object."),
    (b'{"model": "m", "messages": [{"role": 7}]}', "messages[0].role must be a string"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
     "messages[0].content must be a string, an array of content parts or null."),
    (b'{"model": "m", "messages": [{"role": "user", "content": ["hi"]}]}', "messages[0].content[0] must be an object."),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]}',
     "messages[0].content[0].text must be a string."),
])
def test_odd_messages_are_one_line_where_prefix_affinity_reads_them(body: bytes, message: str) -> None:
    summary = scan(body)  # routing alone does not read them: the replica judges its own body
    with pytest.raises(BadBody) as caught:
        affinity_payload(body, summary, 2048)
    assert message in str(caught.value) and caught.value.code == "invalid_messages"


def test_the_depth_limit_is_exact() -> None:
    def nested(levels: int) -> bytes:  # the top-level object is level 1, "x" holds levels 2 ..
        return b'{"model": "m", "x": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"

    assert scan(nested(MAX_DEPTH)).model == "m"
    with pytest.raises(BadBody, match="nested more than"):
        scan(nested(MAX_DEPTH + 1))


def test_a_large_string_is_skipped_fast_and_never_copied() -> None:
    head = b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "'
    body = bytearray(head + b"A" * (30 << 20) + b'"}}]}]}')
    started = time.perf_counter()
    summary = scan(body)
    assert summary.model == "m" and time.perf_counter() - started < 1.0


@pytest.mark.parametrize("unit", [b"[],", b'"",', b"[[0]],", b'{"a": [[]]},'])
def test_many_small_values_are_refused_in_bounded_time(unit: bytes) -> None:
    body = b'{"model": "m", "pad": [' + unit * ((8 << 20) // len(unit)) + b"[]]}"
    started = time.perf_counter()
    with pytest.raises(BadBody, match=f"more than {MAX_TOKENS} strings, arrays and objects"):
        scan(body)
    assert time.perf_counter() - started < 10  # about 1 us a step, on a busy machine
