"""Parses llama-server arguments exactly as llama-server would, and checks one value of one flag.

`parse_args` splits a list of arguments into flags and their values (collecting every error: unknown flags,
bare values, removed flags, repeated flags, `--flag=value`); `check_value` says whether one value is
acceptable for one option (integers are integers, documented ranges and enums are exact, JSON and formats
llama.cpp checks itself are checked here). validate.py (a LlamaServer's args and env) and preset.py (a
router's per-model sections) both build on it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..llamacpp.catalog import Catalog, Option, load_catalog
from .policy import INT32, RANGES, REMOVED

TRUTHY = frozenset({"on", "enabled", "true", "1"})
FALSEY = frozenset({"off", "disabled", "false", "0"})

_INT_RE = re.compile(r"^-?\d+$")
# A leading digit: llama.cpp's stoul-parsed "numbers" (--seed) reject ".5".
_FLOAT_RE = re.compile(r"^-?\d+(\.\d+)?([eE][+-]?\d+)?$")
_FLOAT_LIMIT = 1e30  # well inside float range: std::stof throws out_of_range beyond it


@dataclass(frozen=True)
class FieldError:
    """One problem in a LlamaServer spec."""

    path: str
    """Where: spec.args[3], spec.env[0], spec.cacheTypeV ..."""
    message: str
    """What is wrong and what to do instead."""
    rule: str
    """Stable rule id (docs/flags.md lists them)."""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class ParsedFlag:
    """A flag found in args (or env) with its values."""

    option: Option
    negative: bool
    spelling: str
    values: tuple[str, ...]
    path: str


# ---------------------------------------------------------------------------------------------- values


def _number(text: str, *, integer: bool) -> float | None:
    if integer:
        return int(text) if _INT_RE.match(text) else None
    if not _FLOAT_RE.match(text):
        return None
    number = float(text)
    if not math.isfinite(number) or (number != 0 and not 1 / _FLOAT_LIMIT <= abs(number) <= _FLOAT_LIMIT):
        return None
    return number


def _check_number(option: Option, value: str, *, integer: bool) -> tuple[str, str] | None:
    """(rule, message) when `value` is not a valid number for the option."""
    if option.keywords and value in option.keywords:
        return None
    words = f" or one of {', '.join(option.keywords)}" if option.keywords else ""
    number = _number(value, integer=integer)
    if number is None:
        kind = "an integer" if integer else "a number"
        hint = " (no unit suffixes: write 4096, not 4k)" if re.match(r"^-?\d+[A-Za-z]+$", value) else ""
        return ("int" if integer else "float"), f"{option.canonical} expects {kind}{words}, got {value!r}{hint}"
    for low, high in (INT32 if integer else (None, None), RANGES.get(option.canonical, (None, None))):
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            return "range", f"{option.canonical} must be in {bounds}, got {value}"
    return None


def _check_enum(option: Option, value: str) -> tuple[str, str] | None:
    assert option.choices is not None
    items = value.split(",") if option.is_list else [value]
    bad = [item for item in items if item not in option.choices]
    if bad:
        return "enum", f"{option.canonical} must be {'a comma list of ' if option.is_list else ''}one of " \
            f"{', '.join(option.choices)} (exactly), got {value!r}"
    return None


def _json_object(option: Option, value: str) -> tuple[str, str] | None:
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        return "format", f"{option.canonical} expects a JSON object, got {value!r}"
    return None


def _cpu_range(option: Option, value: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"(\d+)-(\d+)", value)
    if not match or int(match.group(1)) > int(match.group(2)):
        return "format", f"{option.canonical} expects lo-hi CPU numbers with lo <= hi, e.g. 0-7, got {value!r}"
    return None


def _logit_bias(option: Option, value: str) -> tuple[str, str] | None:
    if not re.fullmatch(r"\d+[+-]\d+(\.\d+)?", value):
        return "format", f"{option.canonical} expects TOKEN_ID+BIAS or TOKEN_ID-BIAS, e.g. 15043+1, got {value!r}"
    return None


def _override_kv(option: Option, value: str) -> tuple[str, str] | None:
    checks = {
        "int": lambda v: bool(_INT_RE.match(v)),
        "float": lambda v: bool(_FLOAT_RE.match(v)),
        "bool": lambda v: v in ("true", "false"),
        "str": lambda v: 0 < len(v) < 128,
    }
    for item in value.split(","):
        match = re.fullmatch(r"([\w.-]+)=(int|float|bool|str):(.*)", item)
        if not match or not checks[match.group(2)](match.group(3)):
            return "format", f"{option.canonical} expects KEY=TYPE:VALUE[,...] with TYPE int, float, bool " \
                f"(true/false) or str, got {item!r}"
    return None


def _cpu_buffers(option: Option, value: str) -> tuple[str, str] | None:
    # Buffer types other than CPU (CUDA0, ROCm1 ...) depend on the node's GPUs and cannot be checked here.
    for item in value.split(","):
        if not re.fullmatch(r"[^=,\s]+=CPU", item):
            return "format", f"{option.canonical} expects <tensor regex>=CPU[,...] (GPU buffer types depend " \
                f"on the node and cannot be checked before start), got {item!r}"
    return None


def _devices(option: Option, value: str) -> tuple[str, str] | None:
    if value != "none":
        return "format", f"{option.canonical}: only 'none' can be checked before start (device names depend " \
            f"on the node; GPUs come from spec.gpu), got {value!r}"
    return None


def _cpu_mask(option: Option, value: str) -> tuple[str, str] | None:
    if not re.fullmatch(r"(0x)?[0-9a-fA-F]{1,64}", value):
        return "format", f"{option.canonical} expects a hexadecimal CPU mask, e.g. 0xff, got {value!r}"
    return None


CHECKED: dict[str, Callable[[Option, str], tuple[str, str] | None]] = {
    "--cpu-mask": _cpu_mask,
    "--cpu-mask-batch": _cpu_mask,
    "--spec-draft-cpu-mask": _cpu_mask,
    "--spec-draft-cpu-mask-batch": _cpu_mask,
    "--cpu-range": _cpu_range,
    "--cpu-range-batch": _cpu_range,
    "--spec-draft-cpu-range": _cpu_range,
    "--logit-bias": _logit_bias,
    "--json-schema": _json_object,
    "--chat-template-kwargs": _json_object,
    "--override-kv": _override_kv,
    "--override-tensor": _cpu_buffers,
    "--spec-draft-override-tensor": _cpu_buffers,
    "--device": _devices,
    "--spec-draft-device": _devices,
    "--mmproj-device": _devices,
}
"""Validators for options whose values llama.cpp checks itself while parsing (JSON, devices, formats)."""


def check_value(option: Option, value: str, catalog: Catalog) -> tuple[str, str] | None:
    """(rule, message) when `value` is not acceptable for `option`, else None."""
    if option.canonical in CHECKED:
        return CHECKED[option.canonical](option, value)
    if option.kind == "enum":
        return _check_enum(option, value)
    if option.kind in ("int", "float"):
        items = value.split(",") if option.is_list else [value]
        for item in items:
            problem = _check_number(option, item, integer=option.kind == "int")
            if problem:
                return problem
        return None
    if option.kind == "checked":
        return "unverifiable", f"{option.canonical} is checked by llama-server against files or state " \
            "that do not exist before the pod starts; it cannot be validated and is not allowed"
    # string / path
    if value.startswith("-") and catalog.lookup(value.split("=", 1)[0]) is not None:
        return "missing-value", f"{option.canonical} expects a value, but the next item is the flag {value}"
    if not value.strip():
        return "missing-value", f"{option.canonical} expects a non-empty value"
    return None


# ---------------------------------------------------------------------------------------------- args


def _unknown(token: str, catalog: Catalog) -> tuple[str, str]:
    if "=" in token and catalog.lookup(token.split("=", 1)[0]) is not None:
        flag, value = token.split("=", 1)
        return "flag-equals-value", f"write {flag!r} and {value!r} as two items: llama-server does not " \
            f"understand {token!r}"
    attached = re.fullmatch(r"(-[A-Za-z]+?)(-?\d[\w.]*)", token)
    if attached and catalog.lookup(attached.group(1)) is not None:
        return "unknown-flag", f"unknown flag {token!r}: write {attached.group(1)!r} and " \
            f"{attached.group(2)!r} as two items"
    suggestion = catalog.suggest(token)
    hint = f" (did you mean {suggestion}?)" if suggestion else ""
    return "unknown-flag", f"unknown flag {token!r}{hint}"


def _removed_message(spelling: str, option: Option | None) -> str | None:
    if spelling in REMOVED:
        return f"{spelling} was removed from llama.cpp: {REMOVED[spelling]}"
    if option is not None and option.removed:
        return f"{spelling} was removed from llama.cpp: {option.removed}"
    return None


def parse_args(
    args: Sequence[str], *, path: str = "spec.args", catalog: Catalog | None = None
) -> tuple[list[ParsedFlag], list[FieldError]]:
    """Splits args into flags and their values exactly as llama-server would, collecting every error."""
    catalog = catalog or load_catalog()
    flags: list[ParsedFlag] = []
    errors: list[FieldError] = []
    seen: dict[str, str] = {}
    index = 0
    while index < len(args):
        token = args[index]
        where = f"{path}[{index}]"
        index += 1
        found = catalog.lookup(token)
        removed = _removed_message(token.replace("_", "-") if token.startswith("--") else token,
                                   found[0] if found else None)
        if removed:
            errors.append(FieldError(where, removed, "removed"))
            if found:  # skip its value, as llama-server would have tried to read it
                index += found[0].values
            continue
        if found is None:
            if not token.startswith("-"):
                errors.append(FieldError(where, f"bare value {token!r}: llama-server takes no positional "
                                         "arguments (a value belongs right after its flag)", "bare-value"))
            else:
                rule, message = _unknown(token, catalog)
                errors.append(FieldError(where, message, rule))
            continue
        option, negative = found
        values = tuple(args[index : index + option.values])
        index += option.values
        if len(values) < option.values:
            errors.append(FieldError(where, f"{token} expects {option.values} value(s) after it", "missing-value"))
            continue
        flags.append(ParsedFlag(option, negative, token, values, where))
        if option.canonical in seen:
            errors.append(FieldError(where, f"{token} is given twice (also at {seen[option.canonical]}); "
                                     "give each flag once", "repeated"))
        seen.setdefault(option.canonical, where)
    return flags, errors
