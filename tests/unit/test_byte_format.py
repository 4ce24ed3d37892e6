"""The one byte formatter (contract.human): the fetcher's and the status's units, and the memory estimate's."""

from __future__ import annotations

import pytest

from llama_operator.contract import human
from llama_operator.fit import format_bytes

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * MiB, "5.0 MiB"), (3 * GiB, "3.0 GiB"),
    (2 * TiB, "2.0 TiB"), (4096 * TiB, "4096.0 TiB"),
])
def test_human_picks_the_largest_unit_that_keeps_the_number_at_least_one(n: int, text: str) -> None:
    assert human(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (512 * 1024, "0.5 MiB"), (int(247.8 * MiB), "247.8 MiB"), (1023 * MiB, "1023.0 MiB"), (GiB, "1.00 GiB"),
    (int(1.25 * GiB), "1.25 GiB"), (2 * TiB, "2048.00 GiB"),
])
def test_the_memory_estimate_writes_mib_and_gib_only_gib_to_two_places(n: int, text: str) -> None:
    assert format_bytes(n) == text
    assert format_bytes(n) == human(n, places=2 if n >= GiB else 1, smallest="MiB", largest="GiB")
