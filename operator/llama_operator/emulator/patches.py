"""Pure document transformations the emulator applies on PATCH: merge patch, JSON patch, apply.

- `merge_patch`: RFC 7386 (null deletes a key; lists and scalars are replaced whole). Strategic merge
  patch is served with this too: list merging by keys and `$patch` directives are not modelled.
- `json_patch`: RFC 6902 (add, remove, replace, move, copy, test) on RFC 6901 pointers.
- `apply`: an approximation of server-side apply for a single field manager (see `apply` below).

Nothing here knows about HTTP or the store; inputs are never mutated.
"""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """A patch that cannot be applied to the document (answered 422 Unprocessable Entity)."""


class PatchTestFailed(PatchError):
    """A JSON-patch `test` operation did not match."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _split(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer: {pointer!r}")
    return [_unescape(token) for token in pointer[1:].split("/")]


def _index(container: list[Any], token: str, *, for_insert: bool) -> int:
    if token == "-" and for_insert:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"invalid array index: {token!r}")
    index = int(token)
    limit = len(container) if for_insert else len(container) - 1
    if index > limit:
        raise PatchError(f"array index out of range: {index}")
    return index


def _parent(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"path not found: /{'/'.join(tokens)}")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, for_insert=False)]
        else:
            raise PatchError(f"path not found: /{'/'.join(tokens)}")
    return node


def _get(doc: Any, pointer: str) -> Any:
    tokens = _split(pointer)
    if not tokens:
        return doc
    parent = _parent(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path not found: {pointer}")
        return parent[last]
    if isinstance(parent, list):
        return parent[_index(parent, last, for_insert=False)]
    raise PatchError(f"path not found: {pointer}")


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = _split(pointer)
    if not tokens:
        return value
    parent = _parent(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, for_insert=True), value)
    else:
        raise PatchError(f"cannot add to a scalar at {pointer}")
    return doc


def _remove(doc: Any, pointer: str) -> tuple[Any, Any]:
    tokens = _split(pointer)
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _parent(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"path not found: {pointer}")
        return doc, parent.pop(last)
    if isinstance(parent, list):
        return doc, parent.pop(_index(parent, last, for_insert=False))
    raise PatchError(f"path not found: {pointer}")


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; raises PatchTestFailed for a failed `test`, PatchError for other failures."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"{kind} needs a value: {op!r}")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            doc, _ = _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)  # must exist
            doc, _ = _remove(doc, path) if _split(path) else (doc, None)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "move":
            doc, value = _remove(doc, op["from"])
            doc = _add(doc, path, value)
        elif kind == "copy":
            doc = _add(doc, path, copy.deepcopy(_get(doc, op["from"])))
        elif kind == "test":
            try:
                actual = _get(doc, path)
            except PatchError as exc:
                raise PatchTestFailed(f"test failed: {path} is absent") from exc
            if actual != op["value"]:
                raise PatchTestFailed(f"test failed: {path} is {actual!r}, not {op['value']!r}")
        else:
            raise PatchError(f"unknown JSON patch operation: {kind!r}")
    return doc


def leaf_paths(doc: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths to every non-dict value (lists count as leaves: they are owned whole here)."""
    if isinstance(doc, dict) and doc:
        out: set[tuple[str, ...]] = set()
        for key, value in doc.items():
            out |= leaf_paths(value, (*prefix, key))
        return out
    return {prefix} if prefix else set()


def _drop(doc: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = doc
    parents: list[tuple[dict[str, Any], str]] = []
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        parents.append((node, key))
        node = node[key]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    # Prune maps left empty by the removal, as the real apply does with an emptied owned map.
    for parent, key in reversed(parents):
        if parent[key] == {}:
            del parent[key]
        else:
            break


def _deep_merge(base: Any, overlay: Any) -> Any:
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = _deep_merge(base.get(key), value)
        return out
    return copy.deepcopy(overlay)


def apply(current: dict[str, Any], applied: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """Server-side apply for one field manager, approximated.

    The applied configuration is deep-merged into the live object (maps merge, lists and scalars are
    replaced whole); fields this manager applied last time and omits now are removed. What is NOT
    modelled: per-field ownership across managers, conflicts (so `force` changes nothing), and list
    merging by key (a real server merges `containers` by name when several managers own items).
    """
    result = copy.deepcopy(current)
    if previous is not None:
        for path in leaf_paths(previous) - leaf_paths(applied):
            _drop(result, path)
    return _deep_merge(result, applied)
