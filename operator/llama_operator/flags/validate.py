"""Validates a LlamaServer's llama-server settings before anything is rolled out.

Public entry point (the reconcile loop and the admission webhook call it):

    validate_server_spec(spec: LlamaServerSpec) -> list[FieldError]

Each FieldError has `path` (e.g. `spec.args[3]`, `spec.env[0]`, `spec.cacheTypeV`), `message` (what is wrong
and what to do, for people) and `rule` (a stable id, for tests and docs). `str(error)` is
`"<path>: <message>"`. An empty list means the spec renders to arguments the pinned llama-server accepts.
The checks are stricter than llama.cpp's own parser (which takes `-c 4k` as 4): integers are integers,
documented ranges and enums are exact, `--flag=value` and bare values are refused, unknown flags get a
"did you mean", removed flags name their replacement; policy.py says which flags users may set at all.
`validate_args(args)` runs the argument checks alone (the `validate-args` command uses it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..api.cel import violations
from ..api.v1alpha1 import ROUTER_RULES, SCALING_RULES, SERVER_RULES, SPECULATIVE_RULES, LlamaServerSpec
from .catalog import Catalog, Option, load_catalog
from .policy import INT32, RANGES, REMOVED, refusal

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


def _policy_errors(flag: ParsedFlag, *, via: str) -> list[FieldError]:
    option = flag.option
    refused = refusal(option.canonical)
    if refused is not None:
        return [FieldError(flag.path, f"{flag.spelling}{via} {refused.reason}", refused.category)]
    if option.deprecated:
        return [FieldError(flag.path, f"{flag.spelling} is deprecated and has no effect; remove it", "deprecated")]
    return []


def _value_errors(flag: ParsedFlag, catalog: Catalog) -> list[FieldError]:
    errors = []
    for value in flag.values:
        problem = check_value(flag.option, value, catalog)
        if problem:
            errors.append(FieldError(flag.path, problem[1], problem[0]))
    return errors


def validate_args(
    args: Sequence[str], *, path: str = "spec.args", catalog: Catalog | None = None
) -> list[FieldError]:
    """Every problem with a user's extra llama-server arguments, in order."""
    catalog = catalog or load_catalog()
    flags, errors = parse_args(args, path=path, catalog=catalog)
    for flag in flags:
        policy = _policy_errors(flag, via="")
        errors += policy or _value_errors(flag, catalog)
    return sorted(errors, key=lambda e: _index_of(e.path))


def _index_of(path: str) -> int:
    match = re.search(r"\[(\d+)\]$", path)
    return int(match.group(1)) if match else -1


# ---------------------------------------------------------------------------------------------- env


def validate_env(
    env: Sequence[tuple[str, str | None]], *, path: str = "spec.env", catalog: Catalog | None = None
) -> tuple[list[ParsedFlag], list[FieldError]]:
    """Checks (name, literal value or None) pairs: env vars llama-server reads as flags obey the flag policy.

    A value from a Secret or ConfigMap (None) cannot be checked; its name still is.
    """
    catalog = catalog or load_catalog()
    flags: list[ParsedFlag] = []
    errors: list[FieldError] = []
    for index, (name, value) in enumerate(env):
        where = f"{path}[{index}]"
        found = catalog.by_env(name)
        if found is None:
            if name.startswith("LLAMA_ARG_"):
                suggestion = _suggest_env(name, catalog)
                hint = f" (did you mean {suggestion}?)" if suggestion else ""
                errors.append(FieldError(where, f"{name} is not an environment variable llama-server reads{hint}",
                                         "env-unknown"))
            continue
        option, negative = found
        flag = ParsedFlag(option, negative, option.canonical, (), where)
        via = f" (set by env {name})"
        policy = _policy_errors(flag, via=via)
        if policy:
            errors += policy
            continue
        if option.removed:
            errors.append(FieldError(where, f"{name} sets {option.canonical}, which was removed from llama.cpp: "
                                     f"{option.removed}", "removed"))
            continue
        flags.append(flag)
        if value is None:
            continue
        if option.values == 0 or negative:
            if value not in TRUTHY | FALSEY:
                errors.append(FieldError(where, f"{name} must be true or false (or on/off, 1/0), got {value!r}",
                                         "env-bool"))
        else:
            problem = check_value(option, value, catalog)
            if problem:
                errors.append(FieldError(where, f"{name}: {problem[1]}", problem[0]))
    return flags, errors


def _suggest_env(name: str, catalog: Catalog) -> str | None:
    import difflib

    matches = difflib.get_close_matches(name, list(catalog.env_index), n=1, cutoff=0.7)
    return matches[0] if matches else None


# ---------------------------------------------------------------------------------------------- spec


def _cross_field(spec: LlamaServerSpec, arg_flags: list[ParsedFlag]) -> list[FieldError]:
    # The cross-field rules live with the model (api/v1alpha1.py SERVER_RULES) and are in the CRD as CEL too:
    # the API server refuses them at `kubectl apply`. What needs the parsed flags stays here (the webhook's part).
    errors = [FieldError(*found) for found in violations(SERVER_RULES, spec, "spec")]
    if spec.speculative is not None:
        errors += [FieldError(*found) for found in violations(SPECULATIVE_RULES, spec.speculative, "spec.speculative")]
    if spec.scaling is not None:
        errors += [FieldError(*found) for found in violations(SCALING_RULES, spec.scaling, "spec.scaling")]
    errors += [FieldError(*found) for found in violations(ROUTER_RULES, spec, "spec")]
    if spec.models is not None:
        from .preset import validate_models  # preset.py builds on this module's parser

        errors += validate_models(spec)
        for flag in arg_flags:
            if flag.option.canonical in ROUTER_PER_MODEL_FLAGS:
                errors.append(FieldError(flag.path, f"{flag.spelling} is set per model with spec.models: use "
                                         f"spec.models[].{ROUTER_PER_MODEL_FLAGS[flag.option.canonical]}",
                                         "typed-field"))
    templated = [m for m in spec.models or [] if m.chat_template is not None]
    if spec.chat_template is not None or templated:
        named = "spec.chatTemplate" if spec.chat_template is not None else f"spec.models[].chatTemplate " \
            f"({templated[0].model_ref.name})"
        for flag in arg_flags:
            if flag.option.canonical != "--jinja":
                continue
            if flag.negative:
                message = f"{flag.spelling} is set with {named} already; remove it"
            else:
                message = (f"{flag.spelling}: {named} names a built-in template, which llama-server applies only "
                           f"without Jinja; remove {flag.spelling}, or unset chatTemplate to use the GGUF's Jinja "
                           "template")
            errors.append(FieldError(flag.path, message, "chat-template-jinja"))
    if spec.mode != "chat":
        for flag in arg_flags:
            if flag.option.canonical == "--spec-type":
                errors.append(FieldError(flag.path, f"speculative decoding generates text; mode {spec.mode} "
                                         "does not", "mode-speculative"))
    if spec.speculative is not None:
        spec_type = next((f for f in arg_flags if f.option.canonical == "--spec-type"), None)
        if spec_type is not None:
            errors.append(FieldError(spec_type.path, "--spec-type is set by spec.speculative (draft-simple); "
                                     "remove it", "typed-field"))
    return errors


ROUTER_PER_MODEL_FLAGS = {"--sleep-idle-seconds": "idleUnloadSeconds"}
"""Flags allowed in a single-model server's args that have a per-model field in router mode (the router's own
arguments apply to every model instance and would override each model's setting)."""


def validate_server_spec(spec: LlamaServerSpec, *, catalog: Catalog | None = None) -> list[FieldError]:
    """Every problem with a LlamaServer's llama-server settings (typed fields, args, env); empty = valid."""
    catalog = catalog or load_catalog()
    arg_flags, errors = parse_args(spec.args or [], catalog=catalog)
    for flag in arg_flags:
        policy = _policy_errors(flag, via="")
        errors += policy or _value_errors(flag, catalog)
    env_pairs = [(var.name, var.value if var.value_from is None else None) for var in spec.env or []]
    env_flags, env_errors = validate_env(env_pairs, catalog=catalog)
    errors += env_errors
    in_args = {flag.option.canonical: flag.path for flag in arg_flags}
    for flag in env_flags:
        if flag.option.canonical in in_args:
            errors.append(FieldError(flag.path, f"{flag.option.env} sets {flag.option.canonical}, which "
                                     f"{in_args[flag.option.canonical]} sets too; set it once", "repeated"))
    errors += _cross_field(spec, arg_flags)
    return errors
