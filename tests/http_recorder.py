"""A scriptable HTTP server for source-security tests: each path answers what the test says, every request is
recorded with all its headers (what a hostile or curious model host would see)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased names."""


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    stream: Callable[[], Iterator[bytes]] | None = None
    """A body without Content-Length, closed by ending the connection (HTTP/1.0 style)."""


Route = Callable[[Seen], Answer]


class Recorder:
    """`with Recorder(host).running() as rec:` then `rec.routes["/x"] = lambda seen: Answer(...)`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def url(self, path: str = "", host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    def headers_seen(self) -> list[dict[str, str]]:
        with self.lock:
            return [s.headers for s in self.seen]

    @contextmanager
    def running(self) -> Iterator[Recorder]:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
                self._answer(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(head=False)

            def _answer(self, *, head: bool) -> None:
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                with recorder.lock:
                    recorder.seen.append(seen)
                route = recorder.routes.get(self.path.split("?", 1)[0])
                answer = route(seen) if route is not None else Answer(404)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.stream is not None:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    if not head:
                        try:
                            for chunk in answer.stream():
                                self.wfile.write(chunk)
                        except OSError:
                            pass  # the client stopped reading: what a cap does
                    return
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if not head:
                    self.wfile.write(answer.body)

        server = ThreadingHTTPServer((self.host if self.host != "0.0.0.0" else "", 0), Handler)
        server.daemon_threads = True
        self._server = server
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            server.shutdown()
            server.server_close()


def serve_bytes(data: bytes, headers: dict[str, str] | None = None) -> Route:
    """A file with Range support (what the GGUF header reader and the fetcher ask for)."""

    def route(seen: Seen) -> Answer:
        wanted = seen.headers.get("range", "")
        if wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].partition("-")
            start, end = int(first), min(int(last) + 1 if last else len(data), len(data))
            return Answer(206, {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", **(headers or {})},
                          data[start:end])
        return Answer(200, {"Accept-Ranges": "bytes", **(headers or {})}, data)

    return route
