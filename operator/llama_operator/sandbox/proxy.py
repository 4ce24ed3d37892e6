"""The sandbox's kube-proxy: one local TCP listener per Service port, round-robin over the ready endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from .network import splice

log = logging.getLogger("llama_operator.sandbox")

HOST = "127.0.0.1"
PORT_SEARCH = 200


class ServiceProxy:
    """Listens on 127.0.0.1:<port> and forwards each connection to one of `targets` (ip, port)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.targets: list[tuple[str, int]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._turn = itertools.count()
        self._connections: set[asyncio.Task[None]] = set()

    async def listen(self, base: int) -> None:
        """The first free port from `base` up (a fixed base keeps URLs stable across runs); 0 = any port."""
        candidates = [0] if base == 0 else [*range(base, base + PORT_SEARCH), 0]
        for port in candidates:
            try:
                self._server = await asyncio.start_server(self._serve, HOST, port)
            except OSError:
                continue
            self.port = int(self._server.sockets[0].getsockname()[1])
            return

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            targets = list(self.targets)
            upstream = None
            # Like kube-proxy: a connection to a Service with no ready pod is refused (closed at once).
            for _ in range(len(targets)):
                host, port = targets[next(self._turn) % len(targets)]
                try:
                    upstream = await asyncio.open_connection(host, port)
                    break
                except OSError:
                    continue
            if upstream is None:
                return
            await splice((client_reader, client_writer), upstream)
        finally:
            client_writer.close()
            self._connections.discard(task)
