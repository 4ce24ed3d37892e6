"""Which ready replica gets a request (pure): least in-flight, or prefix affinity with bounded load.

- `least_in_flight`: the endpoint with the fewest requests in flight through this gateway; ties rotate, so
  idle replicas share a trickle of requests instead of the first one taking all of them.
- `HashRing` + `bounded_load`: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).
  The prompt prefix hashes to a point on a ring of virtual nodes; the request goes to the first endpoint
  clockwise whose in-flight count stays within ceil(load_bound x mean), mean taken with this request counted.
  One conversation therefore keeps hitting the replica whose KV cache (and llama-server's prompt cache) holds
  its prefix, unless that replica is much busier than the others; adding or removing a replica moves only the
  keys of its arcs.
- `prompt_prefix`: what is hashed: the chat messages up to and including the first user message (a later turn
  of the same conversation starts with exactly these), else the prompt or input, cut to `chars` characters.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


def least_in_flight(endpoints: Sequence[str], in_flight: Mapping[str, int], turn: int = 0) -> str:
    """The endpoint with the fewest requests in flight; among equals the `turn`-th (mod their count)."""
    if not endpoints:
        raise ValueError("no endpoints")
    lowest = min(in_flight.get(e, 0) for e in endpoints)
    tied = [e for e in endpoints if in_flight.get(e, 0) == lowest]
    return tied[turn % len(tied)]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring of `replicas` virtual nodes per endpoint."""

    def __init__(self, endpoints: Sequence[str], replicas: int = 100) -> None:
        self.endpoints = tuple(sorted(set(endpoints)))
        points = sorted((_hash(f"{endpoint}#{i}"), endpoint) for endpoint in self.endpoints for i in range(replicas))
        self._hashes = [h for h, _ in points]
        self._owners = [e for _, e in points]

    def walk(self, key: str) -> Iterator[str]:
        """Every endpoint once, in ring order starting at the key's point."""
        if not self.endpoints:
            return
        start = bisect.bisect(self._hashes, _hash(key))
        seen: set[str] = set()
        for i in range(len(self._owners)):
            owner = self._owners[(start + i) % len(self._owners)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.endpoints):
                    return


def capacity(in_flight: Mapping[str, int], endpoints: Sequence[str], load_bound: float) -> int:
    """The most requests one endpoint may hold, this one included: ceil(load_bound x (total + 1) / n)."""
    total = sum(in_flight.get(e, 0) for e in endpoints) + 1
    return max(1, math.ceil(load_bound * total / len(endpoints)))


def bounded_load(ring: HashRing, key: str, in_flight: Mapping[str, int], load_bound: float) -> str:
    """The first endpoint from the key's point on the ring with room under the bound.

    One always has room: n x capacity >= load_bound x (total + 1) >= total + 1.
    """
    if not ring.endpoints:
        raise ValueError("no endpoints")
    limit = capacity(in_flight, ring.endpoints, load_bound)
    for endpoint in ring.walk(key):
        if in_flight.get(endpoint, 0) + 1 <= limit:
            return endpoint
    raise AssertionError("bounded load: no endpoint under the bound")  # unreachable, see the docstring


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else json.dumps(content, sort_keys=True)


def prompt_prefix(body: Mapping[str, Any], chars: int) -> str | None:
    """The text a conversation is recognised by, at most `chars` long; None when the body has none."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            parts.append(f"{message.get('role', '')}\x1f{_content_text(message.get('content'))}\x1e")
            if message.get("role") == "user":
                break
        text = "".join(parts)
    else:
        prompt = body.get("prompt", body.get("input"))
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else json.dumps(prompt[:1])
        text = prompt if isinstance(prompt, str) else ""
    return text[:chars] or None
