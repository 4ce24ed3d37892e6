"""Validates a LlamaServer's llama-server settings before anything is rolled out.

Public entry point (the reconcile loop and the admission webhook call it):

    validate_server_spec(spec: LlamaServerSpec) -> list[FieldError]

Each FieldError has `path` (e.g. `spec.args[3]`, `spec.env[0]`, `spec.cacheTypeV`), `message` (what is wrong
and what to do, for people) and `rule` (a stable id, for tests and docs). `str(error)` is
`"<path>: <message>"`. An empty list means the spec renders to arguments the pinned llama-server accepts.
The checks are stricter than llama.cpp's own parser (which takes `-c 4k` as 4): integers are integers,
documented ranges and enums are exact, `--flag=value` and bare values are refused, unknown flags get a
"did you mean", removed flags name their replacement; policy.py says which flags users may set at all.
`validate_args(args)` runs the argument checks alone (the `validate-args` command uses it). The parser and
the value checks are args.py's; a router's per-model sections are checked by preset.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..api.cel import violations
from ..api.v1beta1 import (
    DISTRIBUTED_RULES,
    ROUTER_RULES,
    SCALING_RULES,
    SERVER_RULES,
    SPECULATIVE_RULES,
    LlamaServerSpec,
)
from ..llamacpp.catalog import Catalog, load_catalog
from .args import FALSEY, TRUTHY, FieldError, ParsedFlag, check_value, parse_args
from .policy import refusal
from .preset import validate_models


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
    # The cross-field rules live with the model (api/v1alpha1 SERVER_RULES) and are in the CRD as CEL too:
    # the API server refuses them at `kubectl apply`. What needs the parsed flags stays here (the webhook's part).
    errors = [FieldError(*found) for found in violations(SERVER_RULES, spec, "spec")]
    if spec.speculative is not None:
        errors += [FieldError(*found) for found in violations(SPECULATIVE_RULES, spec.speculative, "spec.speculative")]
    if spec.scaling is not None:
        errors += [FieldError(*found) for found in violations(SCALING_RULES, spec.scaling, "spec.scaling")]
    errors += [FieldError(*found) for found in violations(ROUTER_RULES, spec, "spec")]
    errors += [FieldError(*found) for found in violations(DISTRIBUTED_RULES, spec, "spec")]
    if spec.models is not None:
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
