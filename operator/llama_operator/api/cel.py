"""Validation rules said once, for both places that enforce them: the API server (CEL) and the operator (Python).

A `Rule` sits next to the model it constrains (see api/v1alpha1/). The CRD generator writes it into the schema as
`x-kubernetes-validations`, so `kubectl apply` is refused by the API server itself; the operator, `render` and
the admission webhook evaluate the same rule's Python predicate, for objects that got past an older CRD (or no
CRD at all). The message is one template for both: `{name}` placeholders are fields of the node the rule is on
(camelCase, dotted for nested fields, `self` for the node itself) or named `values`, each a (CEL, Python) pair.

`tests/unit/test_crds.py` evaluates every rule's CEL (a CEL interpreter stands in for the API server) on the
same cases as its Python predicate and fails when the two disagree; `tests/integration/test_bad_input_apply.py`
shows the real API server refusing them.

Keep rules cheap: the API server estimates each rule's worst-case cost from the schema's maxItems/maxLength, and
refuses a CRD whose rules could cost too much. Give every list or string a rule iterates a bound.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

_PLACEHOLDER = re.compile(r"\{([A-Za-z][A-Za-z0-9_.]*)\}")

CEL_KEY = "x-kubernetes-validations"


def snake(camel: str) -> str:
    """`batchSize` -> `batch_size` (the Python attribute of a camelCase wire field)."""
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), camel)


def _cel_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Rule:
    """One validation rule of a node (an object, or a scalar field)."""

    id: str
    """Stable id (docs/flags.md, tests)."""
    cel: str
    """CEL over `self` (the node) that must be true; the API server evaluates it after defaulting."""
    holds: Callable[[Any], bool]
    """The same condition in Python over the parsed node (a pydantic model, or the field's value)."""
    message: str
    """What the user reads when it does not hold; `{field}` placeholders (see the module docstring)."""
    field: str | None = None
    """The field the message is about, relative to the node (`batchSize`); None: the node itself."""
    values: Mapping[str, tuple[str, Callable[[Any], Any]]] = _field(default_factory=dict)
    """Placeholders that are not plain fields: name -> (CEL expression, Python function of the node)."""

    def violation(self, node: Any) -> str | None:
        """The message when the rule does not hold for `node`, else None."""
        if self.holds(node):
            return None
        return _PLACEHOLDER.sub(lambda m: str(self._python_value(m.group(1), node)), self.message)

    def _python_value(self, name: str, node: Any) -> Any:
        if name in self.values:
            return self.values[name][1](node)
        if name == "self":
            return node
        for part in name.split("."):
            node = getattr(node, snake(part))
        return node

    def _cel_value(self, name: str) -> str:
        if name in self.values:
            return self.values[name][0]
        return "self" if name == "self" else f"self.{name}"

    def message_expression(self) -> str:
        """The message as a CEL string expression: `'... %s ...'.format([values])`.

        `format` (the strings extension) rather than `'...' + string(x)`: the API server's cost estimator takes
        `string(int)` to be unbounded and refuses any concatenation with it.
        """
        names = _PLACEHOLDER.findall(self.message)
        literal = _PLACEHOLDER.sub("%s", self.message.replace("%", "%%"))
        return f"{_cel_string(literal)}.format([{', '.join(self._cel_value(name) for name in names)}])"

    def to_schema(self) -> dict[str, Any]:
        """The rule as one `x-kubernetes-validations` entry."""
        out: dict[str, Any] = {"rule": self.cel}
        if _PLACEHOLDER.search(self.message):
            out["messageExpression"] = self.message_expression()
        else:
            out["message"] = self.message
        if self.field:
            out["fieldPath"] = "." + self.field
        return out


def cel_schema(rules: Iterable[Rule]) -> dict[str, Any]:
    """`json_schema_extra` for a field or model carrying these rules."""
    return {CEL_KEY: [rule.to_schema() for rule in rules]}


def first_violation(rules: Iterable[Rule], value: Any) -> str | None:
    """The first broken rule's message (for pydantic validators, which raise one error per field)."""
    return next((message for rule in rules if (message := rule.violation(value)) is not None), None)


def check_value(rules: Iterable[Rule], value: Any) -> Any:
    """A pydantic validator body: raises ValueError with the first broken rule's message, else returns value."""
    message = first_violation(rules, value)
    if message is not None:
        raise ValueError(message)
    return value


def violations(rules: Iterable[Rule], node: Any, prefix: str) -> list[tuple[str, str, str]]:
    """(path, message, rule id) for each rule `node` breaks; paths start at `prefix` (e.g. `spec`)."""
    found = []
    for rule in rules:
        message = rule.violation(node)
        if message is not None:
            found.append((f"{prefix}.{rule.field}" if rule.field else prefix, message, rule.id))
    return found
