"""The gateway app on its own event loop in a thread, for tests that call it over HTTP from synchronous code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from llama_operator.gateway.app import Gateway, GatewayConfig


@contextmanager
def gateway_in_thread(config: GatewayConfig, *, servers: Sequence[Mapping[str, Any]] | None = None) -> Iterator[str]:
    """Yields the gateway's API URL; `servers` (LlamaServer objects) replace its static routes once it started."""
    loop = asyncio.new_event_loop()
    gateway = Gateway(config, None)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(gateway.start())
        if servers is not None:
            gateway.routes.replace(list(servers), None)
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield f"http://127.0.0.1:{gateway.api_port}"
    finally:
        asyncio.run_coroutine_threadsafe(gateway.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
