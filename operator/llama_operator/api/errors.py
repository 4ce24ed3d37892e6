"""Turns pydantic validation errors into one-line messages that name the field, as users wrote it."""

from __future__ import annotations

from pydantic import ValidationError

from .bounds import truncate_message

GOT_MAX_LENGTH = 120
"""Characters of a refused value quoted back: enough to recognise it, never a whole 2 KiB argument."""


def field_path(loc: tuple[int | str, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "union[")):
            path += f".{part}" if path else str(part)
    return path


def describe(exc: ValidationError, prefix: str = "") -> list[str]:
    """One message per problem, e.g. `spec.parallel: Input should be a valid integer (got '4k')`."""
    messages = []
    for error in exc.errors(include_url=False):
        where = field_path(tuple(error["loc"]), prefix) or prefix or "object"
        text = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            text = "unknown field"
        elif error["type"] not in ("missing",) and "input" in error and not isinstance(error["input"], dict | list):
            text += f" (got {truncate_message(repr(error['input']), GOT_MAX_LENGTH)})"
        messages.append(f"{where}: {text}")
    return messages
