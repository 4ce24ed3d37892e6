"""Label and field selectors as the API server parses them from `?labelSelector=` / `?fieldSelector=`.

Label selectors: `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, comma-joined (AND).
Field selectors: `path=v`, `path==v`, `path!=v`, comma-joined. A real server accepts only a fixed set of
fields per resource (metadata.name, metadata.namespace, plus e.g. status.phase for pods); this one
accepts any dotted path and compares its value as a string.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Predicate = Callable[[dict[str, Any]], bool]

_SET_TERM = re.compile(r"^\s*(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(?P<neg>!?)\s*(?P<key>[^\s!=()]+)\s*$")


class SelectorError(ValueError):
    """An unparsable selector (answered 400 Bad Request)."""


def _split_terms(selector: str) -> list[str]:
    # Commas separate terms except inside the parentheses of `in (a,b)`.
    terms: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(selector):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [term for term in terms if term.strip()]


def parse_label_selector(selector: str | None) -> Predicate:
    """A predicate over an object body for a label selector string (empty/None matches everything)."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_terms(selector or ""):
        if match := _SET_TERM.match(term):
            key, values = match["key"], {v.strip() for v in match["values"].split(",") if v.strip()}
            if match["op"] == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := _EQ_TERM.match(term):
            key, value = match["key"], match["value"]
            if match["op"] == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif match := _EXISTS_TERM.match(term):
            key, negated = match["key"], bool(match["neg"])
            checks.append(lambda labels, k=key, n=negated: (k in labels) != n)
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")

    def predicate(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def _field_value(obj: dict[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def parse_field_selector(selector: str | None) -> Predicate:
    """A predicate over an object body for a field selector string (empty/None matches everything)."""
    checks: list[Predicate] = []
    for term in _split_terms(selector or ""):
        match = _EQ_TERM.match(term)
        if match is None:
            raise SelectorError(f"invalid field selector: {term!r}")
        path, value, negated = match["key"], match["value"], match["op"] == "!="
        checks.append(lambda obj, p=path, v=value, n=negated: (_field_value(obj, p) == v) != n)
    return lambda obj: all(check(obj) for check in checks)
