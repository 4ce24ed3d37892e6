"""The flag policy, strict value checks, env rules and cross-field rules, as a table (tests/unit/flag_cases.py)."""

from __future__ import annotations

import pytest

from llama_operator.api.v1beta1 import LlamaServerSpec
from llama_operator.flags.args import CHECKED
from llama_operator.flags.policy import RANGES, REFUSED, REMOVED
from llama_operator.flags.validate import validate_args, validate_server_spec
from llama_operator.llamacpp.catalog import load_catalog

from .flag_cases import BAD_CASES, GOOD_CASES


def _spec(fields: dict) -> LlamaServerSpec:
    return LlamaServerSpec.model_validate({"modelRef": {"name": "m"}, **fields})


@pytest.mark.parametrize(("title", "fields", "messages", "rules"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_refused_with_its_message(title: str, fields: dict, messages: list[str], rules: list[str]):
    errors = validate_server_spec(_spec(fields))
    assert [str(error) for error in errors] == messages
    assert [error.rule for error in errors] == rules


@pytest.mark.parametrize("fields", GOOD_CASES)
def test_good_specs_pass(fields: dict):
    assert validate_server_spec(_spec(fields)) == []


def test_policy_tables_name_real_options():
    catalog = load_catalog()
    canonical = {option.canonical for option in catalog.options}
    assert set(REFUSED) <= canonical
    assert set(RANGES) <= canonical
    assert set(CHECKED) <= canonical
    # removed spellings are either gone or marked removed in the catalog
    for spelling in REMOVED:
        found = catalog.lookup(spelling)
        assert found is None or found[0].removed


def test_every_spelling_of_a_refused_flag_is_refused():
    catalog = load_catalog()
    for option in catalog.options:
        if option.canonical not in REFUSED:
            continue
        for spelling in option.spellings:
            args = [spelling] + ["1"] * option.values
            errors = validate_args(args)
            assert errors and errors[0].rule == REFUSED[option.canonical].category, (spelling, errors)


def test_every_checked_option_is_validated_or_refused():
    # llama.cpp validates these values itself (JSON, devices, files): each needs our own check or a refusal.
    for option in load_catalog().options:
        if option.kind == "checked" and not option.removed and option.canonical not in REFUSED:
            errors = validate_args([option.names[0], *(["x"] * option.values)])
            assert errors, option.canonical


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (["--top-k", "1.5"], "int"),
        (["--top-k", "0x10"], "int"),
        (["--top-k", " 5"], "int"),
        (["--top-k", "+5"], "int"),
        (["--top-k", "99999999999"], "range"),
        (["--temp", ".5"], "float"),
        (["--temp", "1e40"], "float"),
        (["--temp", "nan"], "float"),
        (["--mirostat", "3"], "range"),
        (["--rope-scaling", "YARN"], "enum"),
        (["--log-colors", "true"], "enum"),
        (["--cpu-range", "7-3"], "format"),
        (["--logit-bias", "5"], "format"),
        (["--json-schema", "[]"], "format"),
        (["--chat-template-kwargs", "1"], "format"),
        (["--override-kv", "a=bool:yes"], "format"),
        (["-dev", "CUDA0"], "format"),
        (["--json-schema-file", "/schema.json"], "unverifiable"),
        (["--spec-type", "draft-simple,bogus"], "enum"),
    ],
)
def test_strict_values(args: list[str], rule: str):
    assert [error.rule for error in validate_args(args)] == [rule]


@pytest.mark.parametrize(
    "args",
    [
        ["--temp", "0.7"], ["--temp", "1"], ["--temp", "1e-3"], ["--top-k", "-0"], ["-s", "-1"],
        ["--spec-type", "ngram-simple,ngram-mod"], ["--cpu-range", "0-3"], ["--logit-bias", "15043-1.5"],
        ["--json-schema", '{"type": "object"}'], ["--override-kv", "a.b=int:5,c=str:x"], ["-dev", "none"],
        ["--control-vector-layer-range", "1", "4"], ["-ngld"][:0] + ["--reasoning-format", "auto"],
        ["--no-kv-offload", "-nr", "--no-warmup"], ["--fit-target", "512,1024"],
    ],
)
def test_valid_values(args: list[str]):
    assert validate_args(args) == []


def test_suggestions_for_typos():
    assert "did you mean --ctx-size?" in str(validate_args(["--ctx-sise", "1"])[0])
    assert "did you mean --no-warmup?" in str(validate_args(["--no-warmpu"])[0])


def test_error_shape():
    error = validate_server_spec(_spec({"args": ["--top-k", "4k"]}))[0]
    assert (error.path, error.rule) == ("spec.args[0]", "int")
    assert str(error).startswith("spec.args[0]: ")


def test_docs_bad_input_table_is_current():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    check = subprocess.run([sys.executable, str(root / "scripts/gen-flags-doc.py"), "--check"], check=False)
    assert check.returncode == 0, "docs/flags.md is out of date: run scripts/gen-flags-doc.py"
