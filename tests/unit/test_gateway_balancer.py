"""The gateway's balancer (pure): least in-flight, consistent hashing with bounded load, the prompt prefix."""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest

from llama_operator.gateway.balancer import HashRing, bounded_load, capacity, least_in_flight, prompt_prefix

A, B, C = "http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://10.0.0.3:8080"


@pytest.mark.parametrize(("in_flight", "turn", "expected"), [
    ({}, 0, A),
    ({}, 1, B),
    ({}, 2, C),
    ({}, 3, A),
    ({A: 1}, 0, B),
    ({A: 1}, 1, C),
    ({A: 2, B: 1, C: 3}, 7, B),
    ({A: 0, B: 0, C: 0}, 5, C),
    ({A: 5, B: 5, C: 4}, 0, C),
])
def test_least_in_flight(in_flight: dict[str, int], turn: int, expected: str) -> None:
    assert least_in_flight([A, B, C], in_flight, turn) == expected


def test_least_in_flight_needs_an_endpoint() -> None:
    with pytest.raises(ValueError):
        least_in_flight([], {})


@pytest.mark.parametrize(("in_flight", "bound", "expected"), [
    ({}, 1.25, 1),             # ceil(1.25 * 1 / 3)
    ({A: 2}, 1.25, 2),         # ceil(1.25 * 3 / 3)
    ({A: 3, B: 3, C: 2}, 1.25, 4),   # ceil(1.25 * 9 / 3)
    ({A: 3, B: 3, C: 2}, 1.0, 3),
    ({A: 10}, 2.0, 8),         # ceil(2 * 11 / 3)
])
def test_capacity(in_flight: dict[str, int], bound: float, expected: int) -> None:
    assert capacity(in_flight, [A, B, C], bound) == expected


def test_ring_walk_visits_every_endpoint_once_in_a_stable_order() -> None:
    ring = HashRing([A, B, C])
    order = list(ring.walk("conversation 1"))
    assert sorted(order) == [A, B, C]
    assert list(HashRing([C, A, B]).walk("conversation 1")) == order  # independent of the input order
    assert list(HashRing([]).walk("x")) == []


def test_same_key_same_endpoint_while_under_the_bound() -> None:
    ring = HashRing([A, B, C])
    home = next(ring.walk("system: be brief\x1euser: hi"))
    for in_flight in ({}, {home: 1, A: 1}, {B: 2, C: 2, A: 2}):
        if in_flight.get(home, 0) + 1 <= capacity(in_flight, ring.endpoints, 1.25):
            assert bounded_load(ring, "system: be brief\x1euser: hi", in_flight, 1.25) == home


def test_an_overloaded_home_spills_to_the_next_on_the_ring() -> None:
    ring = HashRing([A, B, C])
    key = "conversation 7"
    home, second, third = ring.walk(key)
    # home holds 4, capacity ceil(1.25 * 5 / 3) = 3: the next endpoint clockwise takes it
    assert bounded_load(ring, key, {home: 4}, 1.25) == second
    assert bounded_load(ring, key, {home: 4, second: 3}, 1.25) == second  # capacity ceil(1.25 * 8 / 3) = 4
    assert bounded_load(ring, key, {home: 4, second: 4}, 1.25) == third  # capacity ceil(1.25 * 9 / 3) = 4


def test_keys_spread_and_bounded_load_holds_for_every_pick() -> None:
    ring = HashRing([A, B, C])
    homes = collections.Counter(next(ring.walk(f"conversation {i}")) for i in range(3000))
    assert all(700 < n < 1300 for n in homes.values()), homes  # roughly even arcs
    in_flight: dict[str, int] = {}
    for i in range(300):  # requests that never finish: the worst case for the bound
        chosen = bounded_load(ring, "the same hot prefix", in_flight, 1.25)
        in_flight[chosen] = in_flight.get(chosen, 0) + 1
        assert max(in_flight.values()) <= math.ceil(1.25 * (i + 1) / 3)
    assert len(in_flight) == 3  # one hot key still ends up on every replica under load


def test_removing_an_endpoint_moves_only_its_keys() -> None:
    before = HashRing([A, B, C])
    after = HashRing([A, B])
    keys = [f"k{i}" for i in range(1000)]
    moved = [k for k in keys if next(before.walk(k)) != next(after.walk(k))]
    assert all(next(before.walk(k)) == C for k in moved)


@pytest.mark.parametrize(("body", "chars", "expected"), [
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                   {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]}, 100,
     "system\x1fS\x1euser\x1fU1\x1e"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]}]}, 100,
     "user\x1flook\x1e"),
    ({"messages": [{"role": "user", "content": "abcdef"}]}, 7, "user\x1fab"),
    ({"prompt": "once upon a time"}, 4, "once"),
    ({"prompt": ["first", "second"]}, 100, "first"),
    ({"input": "embed me"}, 100, "embed me"),
    ({"model": "m"}, 100, None),
    ({"messages": []}, 100, None),
])
def test_prompt_prefix(body: dict[str, Any], chars: int, expected: str | None) -> None:
    assert prompt_prefix(body, chars) == expected


def test_a_later_turn_has_the_first_turns_prefix() -> None:
    first = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    later = {"messages": first["messages"] + [{"role": "assistant", "content": "hello"},
                                              {"role": "user", "content": "more"}]}
    assert prompt_prefix(first, 2048) == prompt_prefix(later, 2048)
