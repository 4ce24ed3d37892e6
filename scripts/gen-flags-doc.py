#!/usr/bin/env python3
"""Renders the bad-input table (tests/unit/flag_cases.py) into docs/flags.md between its markers.

Usage: gen-flags-doc.py [--check]   (--check: exit 1 if docs/flags.md is out of date)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "operator"))

from llama_operator.api.v1alpha1 import SERVER_RULES, SPECULATIVE_RULES  # noqa: E402
from tests.unit.flag_cases import BAD_CASES  # noqa: E402

CEL_RULES = {rule.id for rule in SERVER_RULES + SPECULATIVE_RULES}

DOC = ROOT / "docs/flags.md"
BEGIN, END = "<!-- BEGIN bad-input table (scripts/gen-flags-doc.py) -->", "<!-- END bad-input table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table() -> str:
    rows = ["| Case | Spec (besides modelRef) | Rule | Refused by | Message the user sees |", "|---|---|---|---|---|"]
    for title, fields, messages, rules in BAD_CASES:
        spec = _cell(json.dumps(fields, separators=(", ", ": ")))
        # Measured by tests/integration/test_bad_input_apply.py against a real API server.
        layer = "API server (CEL)" if set(rules) <= CEL_RULES else "webhook"
        rows.append(f"| {title} | `{spec}` | {', '.join(dict.fromkeys(rules))} | {layer} | "
                    + "<br>".join(f"`{_cell(m)}`" for m in messages) + " |")
    return "\n".join(rows)


def render(doc: str) -> str:
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    current = DOC.read_text()
    fresh = render(current)
    if "--check" in sys.argv[1:]:
        return 0 if fresh == current else 1
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
