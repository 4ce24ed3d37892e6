"""Parses Kubernetes resource quantities (`500m`, `4`, `8Gi`) into numbers."""

from __future__ import annotations

import math
import re
from decimal import Decimal

_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_RE = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[a-zA-Z]*)$")


def parse_quantity(value: int | str) -> Decimal:
    if isinstance(value, int):
        return Decimal(value)
    match = _RE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = match.groups()
    if suffix[:1] in ("e", "E"):
        return Decimal(number + suffix)
    if suffix not in _SUFFIXES:
        raise ValueError(f"{value!r} has an unknown unit {suffix!r}")
    return Decimal(number) * _SUFFIXES[suffix]


def gibibytes_ceil(size_bytes: int | Decimal) -> str:
    """Bytes rounded up to whole GiB, as a quantity string (PVC requests read best in Gi)."""
    return f"{max(1, math.ceil(Decimal(size_bytes) / _SUFFIXES['Gi']))}Gi"
