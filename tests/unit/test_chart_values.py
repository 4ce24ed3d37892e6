"""The chart's files, read without helm: values.schema.json strict everywhere, values.yaml valid and
documented, the chart's CRD files copies of crds/. (What needs helm is in tests/chart.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jsonschema
import yaml

from tests.chart.chart import CHART, REPO


def _object_schemas(schema: Mapping[str, Any], where: str = "$") -> Iterable[tuple[str, Mapping[str, Any]]]:
    if not isinstance(schema, Mapping):
        return
    if schema.get("type") == "object" or "properties" in schema:
        yield where, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _object_schemas(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), Mapping):
        yield from _object_schemas(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), Mapping):
        yield from _object_schemas(schema["additionalProperties"], f"{where}.*")


def test_values_schema_is_strict_everywhere() -> None:
    """Every object with named fields refuses unknown ones; free-form maps must at least type their values."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for where, sub in _object_schemas(schema):
        extra = sub.get("additionalProperties")
        if "properties" in sub:
            assert extra is False, f"{where}: an object with properties needs additionalProperties: false"
        else:
            assert isinstance(extra, Mapping) and extra, f"{where}: a map must type its values"


def test_values_yaml_matches_schema_and_is_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    assert set(schema["properties"]) == set(values), "values.yaml and values.schema.json list different keys"

    # Every top-level key and every scalar/empty leaf is directly preceded by a comment. Keys inside
    # `resources` are a Kubernetes ResourceRequirements example, documented as a whole.
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    top = ""
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = match.groups()
        if not indent:
            top = key
        elif top == "resources":
            continue
        if not indent or rest.strip():
            previous = lines[number - 1].strip() if number else ""
            if not previous.startswith("#"):
                undocumented.append(f"line {number + 1}: {key}")
    assert not undocumented, "values without a comment directly above:\n" + "\n".join(undocumented)


def test_chart_crd_files_are_copies_of_crds_dir() -> None:
    repo = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert repo, "crds/ is empty"
    assert chart == repo, "run `make chart-crds`: the chart's CRD files differ from crds/"
    for name in repo:
        assert (CHART / "files" / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"files/crds/{name} drifted from crds/{name}: run `make chart-crds`"
        )
