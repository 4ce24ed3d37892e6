"""The bounded scan of a request body (pure): the few fields the gateway routes by, read without building the tree.

The gateway needs four things of a POST body: `model` (the route), `stream` (the replica closes the connection
after a streamed answer), whether it sets `lora` (adapters.py) and, for PrefixAffinity, the start of the
conversation. `json.loads` would build every value in Python objects (a 30 MiB body of `[]` costs about 570 MB)
and recurse once per level (a body nested 100,000 deep raises RecursionError). `scan` walks the body instead and
keeps byte offsets: strings are skipped with memchr (`bytes.find`) when they hold no escape, everything else with
regular expressions over windows of _WINDOW bytes (a C call holds the GIL: in a worker thread the scan lets the
event loop in between), and one Python step per string, array and object, at most MAX_TOKENS of them. Its memory
is the nesting stack, MAX_DEPTH bytes.

Checked (else BadBody, one line, answered 400): the body is one JSON object (strings closed, brackets balanced
and matched, nothing after it), at most MAX_DEPTH levels deep, at most MAX_FIELDS top-level fields; `model` a
string of at most MAX_MODEL_BYTES, given once. For PrefixAffinity (`affinity_payload`, a second step once the
route is known): `messages`, when present, an array of objects with a string `role` and a `content` that is a
string, null or an array of objects whose `text`, where present, is a string, up to the first user message
(what is hashed; at most MAX_MESSAGES messages and MAX_PARTS parts each).
Numbers and literals are checked at the top level only: the replica parses the whole body and refuses the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 128
"""Nesting levels of a body (the top-level object is level 1); deeper is 400 (replicas parse recursively too)."""
MAX_FIELDS = 1024
"""Top-level fields of a body (OpenAI's requests have a few dozen)."""
MAX_MODEL_BYTES = 512
"""Longest `model` accepted, as JSON text (`<namespace>/<name>` is at most 317 characters)."""
MAX_MESSAGES = 64
"""Messages read (and checked) for the prompt prefix: up to the first user message, at most this many."""
MAX_PARTS = 64
"""Content parts read (and checked) per message."""

MAX_TOKENS = 250_000
"""Strings, arrays and objects in a body, all levels together: each costs the scan a Python step (about 1 us)."""
_WINDOW = 1 << 18
"""Bytes one regular-expression call looks at: a C call holds the GIL, so a scan in a worker thread lets the event
loop run at least every few milliseconds."""

_STRUCTURE = re.compile(rb'["\[\]{}]')
_STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_WS = re.compile(rb'[ \t\n\r]*+')
_SCALAR = re.compile(rb'-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?|true|false|null')
_CLOSES = {ord("["): ord("]"), ord("{"): ord("}")}
_QUOTE, _COLON, _COMMA = ord('"'), ord(":"), ord(",")
_OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT = ord("["), ord("]"), ord("{"), ord("}")
_NOT_AN_OBJECT = "The request body must be a JSON object with a 'model' field."

Span = tuple[int, int]
"""A value's [start, end) byte offsets in the body."""


class BadBody(ValueError):
    """The body is not what the gateway can route; the message is one line for the client (400)."""

    def __init__(self, message: str, *, code: str = "invalid_json", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True)
class Summary:
    """What routing reads of a body: offsets into it, never copies of its large values."""

    model: str
    stream: bool
    messages: Span | None
    """`messages` (chat)."""
    prompt: Span | None
    """`prompt`, else `input` (completions, embeddings)."""
    lora: bool = False
    """The body has a top-level `lora` field (llama-server's per-request adapters)."""


def _at(buf: bytes | bytearray, i: int) -> int:
    return buf[i] if i < len(buf) else -1


def _is(buf: bytes | bytearray, span: Span, literal: bytes) -> bool:
    """Whether the value at `span` is `literal` (never slices a value that may be megabytes)."""
    return span[1] - span[0] == len(literal) and buf.startswith(literal, span[0])


def _ws(buf: bytes | bytearray, i: int) -> int:
    if i >= len(buf) or buf[i] > 32:  # JSON's whitespace is all <= 32: the usual case needs no regex
        return i
    return _WS.match(buf, i).end()  # type: ignore[union-attr]  # matches the empty string at worst


def _string_end(buf: bytes | bytearray, i: int) -> int:
    """buf[i] opens a string; the offset after its closing quote (found with memchr when it has no escape)."""
    quote = buf.find(b'"', i + 1)
    if quote >= 0 and buf.find(b"\\", i + 1, quote) < 0:
        return quote + 1
    j = i + 1
    while True:
        body = _STRING_BODY.match(buf, j, j + _WINDOW)
        assert body is not None  # it matches the empty string at worst
        k = body.end()
        if k < len(buf) and buf[k] == _QUOTE:
            return k + 1
        if k >= len(buf) or k == j:  # the end, or a backslash that ends the body
            raise BadBody(f"The request body is not valid JSON (unterminated string at byte {i}).")
        j = k  # the window ended (before a character or inside an escape): go on from there


class _Walk:
    """Counts the steps of one scan (MAX_TOKENS)."""

    def __init__(self, buf: bytes | bytearray) -> None:
        self.buf = buf
        self.tokens = 0

    def step(self) -> None:
        self.tokens += 1
        if self.tokens > MAX_TOKENS:
            raise BadBody(f"The request body has more than {MAX_TOKENS} strings, arrays and objects.")

    def skip_container(self, pos: int, level: int) -> int:
        """buf[pos] opens an array or object at nesting `level`; the offset after its end."""
        buf, n = self.buf, len(self.buf)
        stack = bytearray()
        i = pos
        while True:
            found = _STRUCTURE.search(buf, i, min(n, i + _WINDOW))
            if found is None:
                if i + _WINDOW >= n:
                    raise BadBody("The request body is not valid JSON (it ends inside an array or object).")
                i += _WINDOW
                continue
            i = found.start()
            c = buf[i]
            self.step()
            if c == _QUOTE:
                i = _string_end(buf, i)
                continue
            i += 1
            if c in _CLOSES:
                stack.append(c)
                # A container at level L holding another one at L + 1: at MAX_DEPTH, one level too deep.
                if level + len(stack) - 1 > MAX_DEPTH:
                    raise BadBody(f"The request body is nested more than {MAX_DEPTH} levels deep.")
            elif not stack or _CLOSES[stack.pop()] != c:
                raise BadBody(f"The request body is not valid JSON (unmatched '{chr(c)}' at byte {i - 1}).")
            elif not stack:
                return i

    def skip_value(self, i: int, level: int) -> int:
        buf = self.buf
        c = _at(buf, i)
        if c == _QUOTE:
            self.step()
            return _string_end(buf, i)
        if c in (_OPEN_ARRAY, _OPEN_OBJECT):
            return self.skip_container(i, level)
        scalar = _SCALAR.match(buf, i)
        if scalar is None:
            raise BadBody(f"The request body is not valid JSON (unexpected {'end' if c < 0 else repr(chr(c))} at "
                          f"byte {i}).")
        return scalar.end()


def _expect(buf: bytes | bytearray, i: int, what: str) -> BadBody:
    found = _at(buf, i)
    return BadBody(f"The request body is not valid JSON (expected {what} at byte {i}, found "
                   f"{'the end' if found < 0 else repr(chr(found))}).")


def _decode(buf: bytes | bytearray, span: Span) -> Any:
    """The (short) JSON value at `span`; a string without escapes is decoded without json.loads (2 us a call)."""
    try:
        if buf[span[0]] == _QUOTE and buf.find(b"\\", span[0], span[1]) < 0:
            return bytes(buf[span[0] + 1:span[1] - 1]).decode()
        return json.loads(bytes(buf[span[0]:span[1]]))
    except ValueError:
        raise BadBody(f"The request body is not valid JSON (bad string or number at byte {span[0]}).") from None


def _key(buf: bytes | bytearray, start: int, end: int) -> str | None:
    """A field name, decoded; None for names too long to be one the gateway reads."""
    return _decode(buf, (start, end)) if end - start <= 64 else None


def members(walk: _Walk, start: int, level: int, end: list[int] | None = None) -> Iterator[tuple[str | None, Span]]:
    """(name, value span) of the object opening at `start`, at nesting `level`; `end` gets the offset after it."""
    buf = walk.buf
    i = _ws(buf, start + 1)
    if _at(buf, i) == _CLOSE_OBJECT:
        if end is not None:
            end.append(i + 1)
        return
    while True:
        if _at(buf, i) != _QUOTE:
            raise _expect(buf, i, "a field name")
        name_end = walk.skip_value(i, level + 1)
        name = _key(buf, i, name_end)
        i = _ws(buf, name_end)
        if _at(buf, i) != _COLON:
            raise _expect(buf, i, "':'")
        value_start = _ws(buf, i + 1)
        value_end = walk.skip_value(value_start, level + 1)
        yield name, (value_start, value_end)
        i = _ws(buf, value_end)
        if _at(buf, i) == _CLOSE_OBJECT:
            if end is not None:
                end.append(i + 1)
            return
        if _at(buf, i) != _COMMA:
            raise _expect(buf, i, "',' or '}'")
        i = _ws(buf, i + 1)


def elements(walk: _Walk, start: int, level: int) -> Iterator[Span]:
    """The value spans of the array opening at `start`, at nesting `level`."""
    buf = walk.buf
    i = _ws(buf, start + 1)
    if _at(buf, i) == _CLOSE_ARRAY:
        return
    while True:
        end = walk.skip_value(i, level + 1)
        yield i, end
        i = _ws(buf, end)
        if _at(buf, i) == _CLOSE_ARRAY:
            return
        if _at(buf, i) != _COMMA:
            raise _expect(buf, i, "',' or ']'")
        i = _ws(buf, i + 1)


def _bad_messages(message: str) -> BadBody:
    return BadBody(message, code="invalid_messages", param="messages")


def _content(walk: _Walk, span: Span, where: str) -> Span | None:
    buf = walk.buf
    c = buf[span[0]]
    if c == _QUOTE:
        return span
    if _is(buf, span, b"null"):
        return None
    if c != _OPEN_ARRAY:
        raise _bad_messages(f"{where}.content must be a string, an array of content parts or null.")
    for index, part in enumerate(elements(walk, span[0], 4)):
        if index >= MAX_PARTS:
            break
        if buf[part[0]] != _OPEN_OBJECT:
            raise _bad_messages(f"{where}.content[{index}] must be an object.")
        for name, value in members(walk, part[0], 5):
            if name == "text" and buf[value[0]] != _QUOTE:
                raise _bad_messages(f"{where}.content[{index}].text must be a string.")
    return span


def _messages(walk: _Walk, span: Span) -> tuple[tuple[str, Span | None], ...] | None:
    buf = walk.buf
    if _is(buf, span, b"null"):
        return None
    if buf[span[0]] != _OPEN_ARRAY:
        raise _bad_messages("'messages' must be an array of message objects.")
    read: list[tuple[str, Span | None]] = []
    for index, message in enumerate(elements(walk, span[0], 2)):
        if index >= MAX_MESSAGES:
            break
        where = f"messages[{index}]"
        if buf[message[0]] != _OPEN_OBJECT:
            raise _bad_messages(f"{where} must be an object.")
        role, content = "", None
        for name, value in members(walk, message[0], 3):
            if name == "role":
                if buf[value[0]] != _QUOTE or value[1] - value[0] > 66:
                    raise _bad_messages(f"{where}.role must be a string of at most 64 characters.")
                role = _decode(buf, value)
            elif name == "content":
                content = _content(walk, value, where)
        read.append((role, content))
        if role == "user":
            break
    return tuple(read)


def scan(buf: bytes | bytearray) -> Summary:
    """The routing fields of a request body; BadBody when it is not a JSON object the gateway can route."""
    start = _ws(buf, 0)
    if _at(buf, start) != _OPEN_OBJECT:
        raise BadBody(_NOT_AN_OBJECT)
    model: str | None = None
    stream = lora = False
    messages = prompt = fallback = None
    fields = 0
    end: list[int] = []
    walk = _Walk(buf)
    for name, span in members(walk, start, 1, end):
        fields += 1
        if fields > MAX_FIELDS:
            raise BadBody(f"The request body has more than {MAX_FIELDS} top-level fields.")
        if name == "model":
            if model is not None:
                raise BadBody("The request body names 'model' twice.", code="invalid_model", param="model")
            if buf[span[0]] != _QUOTE:
                raise BadBody("'model' must be a string.", code="invalid_model", param="model")
            if span[1] - span[0] > MAX_MODEL_BYTES:
                raise BadBody(f"'model' is longer than {MAX_MODEL_BYTES} bytes: no model has such a name.",
                              code="invalid_model", param="model")
            model = _decode(buf, span)
        elif name == "stream":
            stream = _is(buf, span, b"true")
        elif name == "messages":
            messages = span
        elif name == "prompt":
            prompt = span
        elif name == "input":
            fallback = span
        elif name == "lora":
            lora = True
    tail = _ws(buf, end[0])
    if tail != len(buf):
        raise BadBody(f"The request body is not valid JSON (more data after the object, at byte {tail}).")
    if not model:
        raise BadBody("You must provide a model parameter.", code="missing_model", param="model")
    return Summary(model=model, stream=stream, messages=messages, prompt=prompt or fallback, lora=lora)


def _no_constant(name: str) -> None:
    raise ValueError(name)


def _no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a field named twice")
    return found


def quick_summary(buf: bytes) -> tuple[str, bool, bool] | None:
    """(model, stream, lora) of a small body that `scan` would route the same way, read by json.loads in C (a few
    times faster than `scan` for a usual chat request); None when it cannot be sure, and the caller scans.

    Sure means: one JSON object that json.loads reads without NaN or Infinity and with no field named twice in
    any object (json.loads keeps the last, scan refuses a second `model`); at most MAX_DEPTH brackets in all (so
    no deeper than scan allows) and MAX_FIELDS top-level fields; `model` a non-empty string of at most
    MAX_MODEL_BYTES bytes. Field names are compared decoded, as scan compares them. Only for bodies the event
    loop may parse at once (the caller bounds the size)."""
    if buf.count(b"{") + buf.count(b"[") > MAX_DEPTH:
        return None
    try:
        body = json.loads(buf, parse_constant=_no_constant, object_pairs_hook=_no_twice)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or len(body) > MAX_FIELDS:
        return None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return None
    # scan bounds the name as written: without escapes it is the UTF-8 bytes and quotes, with them at most 12
    # bytes a character ("\ud83d\ude00").
    written = len(model.encode()) + 2 if b"\\" not in buf else 12 * len(model) + 2
    if written > MAX_MODEL_BYTES:
        return None
    return model, body.get("stream") is True, "lora" in body


def text(buf: bytes | bytearray, span: Span, chars: int) -> str:
    """The first `chars` characters of the JSON string at `span`, decoding only as many bytes as they can take."""
    inner_end = span[1] - 1
    cut = min(inner_end, span[0] + 1 + chars * 12)  # "\ud83d\ude00" is 12 bytes for one character
    raw = bytes(buf[span[0] + 1:cut])
    # A cut may split an escape or a UTF-8 sequence: give back up to 12 bytes until the rest decodes.
    for back in range(13 if cut < inner_end else 1):
        try:
            return str(json.loads(b'"' + raw[:len(raw) - back] + b'"'))[:chars]
        except ValueError:
            continue
    raise BadBody(f"The request body is not valid JSON (bad string at byte {span[0]}).")


def affinity_payload(buf: bytes | bytearray, summary: Summary, chars: int) -> dict[str, Any]:
    """A small stand-in for the body, with every text cut to `chars`: what balancer.prompt_prefix reads.

    BadBody when the messages it reads have the wrong shape."""
    walk = _Walk(buf)
    read = _messages(walk, summary.messages) if summary.messages is not None else None
    if read:
        messages = []
        for role, content in read:
            if content is None:
                value: Any = None
            elif buf[content[0]] == _QUOTE:
                value = text(buf, content, chars)
            else:
                value = []
                for index, part in enumerate(elements(walk, content[0], 4)):
                    if index >= MAX_PARTS:
                        break
                    found = dict(members(walk, part[0], 5)).get("text")
                    value.append({"text": text(buf, found, chars)} if found else {})
            messages.append({"role": role, "content": value})
        return {"messages": messages}
    if summary.prompt is None:
        return {}
    span = summary.prompt
    if buf[span[0]] == _QUOTE:
        return {"prompt": text(buf, span, chars)}
    if buf[span[0]] == _OPEN_ARRAY:
        first = next(elements(walk, span[0], 2), None)
        if first is None:
            return {}
        if buf[first[0]] == _QUOTE:
            return {"prompt": [text(buf, first, chars)]}
        return {"prompt": [bytes(buf[first[0]:min(first[1], first[0] + chars)]).decode("utf-8", "replace")]}
    return {}
