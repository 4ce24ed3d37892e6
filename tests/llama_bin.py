"""Where the pinned llama-server binary is: $LLAMA_SERVER_BIN (set by `make test`), else the one built before."""

from __future__ import annotations

from tests.tiers import LLAMA_SERVER, require


def llama_server_bin() -> str:
    """Path of the pinned llama-server; never builds it (tests/tiers.py: a test that runs it is marked `runtime`)."""
    return require(LLAMA_SERVER)
