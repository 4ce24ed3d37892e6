"""A chat conversation whose prompt grows turn by turn, distinct per conversation: what prefix affinity keeps on
the replica whose KV cache holds it (tests/integration/test_gateway.py, tests/e2e/test_gateway_load.py)."""

from __future__ import annotations


def conversation_messages(conversation: int, turn: int) -> list[dict[str, str]]:
    """The messages of turn `turn` (0-based) of conversation `conversation`: every earlier turn, then a new one."""
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Conversation {conversation}: tell me about topic "
                                            f"{conversation * 7919} in detail please"}]
    for previous in range(turn):
        messages += [{"role": "assistant", "content": f"answer {previous}"},
                     {"role": "user", "content": f"and then {previous}?"}]
    return messages
