"""The sandbox kubelet's HTTPS server: `/containerLogs/{namespace}/{pod}/{container}`, what `kubectl logs` reaches.

The API server proxies `pods/log` to `https://<Node InternalIP>:<daemonEndpoints.kubeletEndpoint.Port>`,
presenting its kubelet-client certificate; this server asks for a client certificate signed by the control
plane's CA and refuses any other caller. Query parameters as the kubelet reads them: `follow`, `tailLines`,
`limitBytes`, `previous`, `sinceSeconds`, `timestamps`. Logs are the container's output files (containers.py);
they carry no per-line time, so `timestamps` prefixes each line with the time it is served and `sinceSeconds`
is ignored (docs/sandbox.md). `exec`, `attach` and `portForward` are not served (there is no runtime).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from ..clock import now_rfc3339
from .pod import ContainerStatus, Pod

log = logging.getLogger("llama_operator.sandbox")

FOLLOW_POLL = 0.2


def _tail(data: bytes, lines: int) -> bytes:
    if lines < 0:
        return data
    if lines == 0:
        return b""
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


def _stamp(chunk: bytes) -> bytes:
    when = now_rfc3339(micro=True).encode()
    return b"".join(when + b" " + line for line in chunk.splitlines(keepends=True))


class KubeletServer:
    def __init__(self, host: str, port: int, *, cert: Path, key: Path, client_ca: Path,
                 lookup: Callable[[str, str], Pod | None]) -> None:
        self.host, self.port = host, port
        self.lookup = lookup
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
        self.context.load_cert_chain(str(cert), str(key))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, ssl_context=self.context).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        namespace, name, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        runtime = self.lookup(namespace, name)
        if runtime is None:
            raise web.HTTPNotFound(text=f'pod "{name}" in namespace "{namespace}" is not running on this node')
        status = runtime.container(container)
        if status is None:
            raise web.HTTPNotFound(text=f'container "{container}" in pod "{name}" is not available')
        query = request.query
        previous = query.get("previous", "false").lower() in ("1", "true")
        follow = query.get("follow", "false").lower() in ("1", "true") and not previous
        tail = int(query.get("tailLines", "-1"))
        limit = int(query["limitBytes"]) if query.get("limitBytes") else None
        timestamps = query.get("timestamps", "false").lower() in ("1", "true")
        path = runtime.log_path(container, previous=previous)
        if previous and not path.exists():
            raise web.HTTPBadRequest(text=f'previous terminated container "{container}" in pod "{name}" not found')
        if not path.exists() and status.instance == 0:
            raise web.HTTPBadRequest(
                text=f'container "{container}" in pod "{name}" is waiting to start: '
                     f'{next(iter(status.state.get("waiting", {}).values()), "ContainerCreating")}')
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        sent = 0

        async def send(chunk: bytes) -> bool:
            nonlocal sent
            if timestamps:
                chunk = _stamp(chunk)
            if limit is not None:
                chunk = chunk[:max(0, limit - sent)]
            if chunk:
                await response.write(chunk)
                sent += len(chunk)
            return limit is None or sent < limit

        data = path.read_bytes() if path.exists() else b""
        position = len(data)
        more = await send(_tail(data, tail))
        if follow and more:
            await self._follow(path, position, status, send)
        await response.write_eof()
        return response

    @staticmethod
    async def _follow(path: Path, position: int, status: ContainerStatus, send: Callable[[bytes], object]) -> None:
        """Stream what the running instance appends until it exits (as `kubectl logs -f` ends)."""
        instance = status.instance
        pending = b""
        while True:
            try:
                with path.open("rb") as handle:
                    handle.seek(position)
                    chunk = handle.read()
            except OSError:
                chunk = b""
            position += len(chunk)
            pending += chunk
            complete, _, pending = pending.rpartition(b"\n")
            if complete and not await send(complete + b"\n"):  # type: ignore[misc]
                return
            finished = status.exited.is_set() or status.instance != instance
            if finished and not chunk:
                if pending:
                    await send(pending)  # type: ignore[misc]
                return
            await asyncio.sleep(FOLLOW_POLL)
