"""Turns pydantic validation errors into one-line messages that name the field, as users wrote it."""

from __future__ import annotations

from pydantic import ValidationError


def field_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "union[")):
            path += f".{part}" if path else str(part)
    return path


def describe(exc: ValidationError, prefix: str = "") -> list[str]:
    """One message per problem, e.g. `spec.contextSize: Input should be a valid integer (got '4k')`."""
    messages = []
    for error in exc.errors(include_url=False):
        where = field_path(tuple(error["loc"]), prefix) or prefix or "object"
        text = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            text = "unknown field"
        elif error["type"] not in ("missing",) and "input" in error and not isinstance(error["input"], dict | list):
            text += f" (got {error['input']!r})"
        messages.append(f"{where}: {text}")
    return messages
