"""A local HTTP server posing as Hugging Face (and a plain file server) for the source and fetch tests.

Routes:
- `HEAD|GET /<org>/<repo>/resolve/<revision>/<path>`: 302 to `/cdn/<sha256>/<name>?sig=...` with
  `X-Linked-Etag` / `X-Linked-Size` (like the hub for LFS files); gated repos answer 401 (no token) or 403
  (wrong token) with `X-Error-Code: GatedRepo`; unknown files 404 with `X-Error-Code: EntryNotFound`.
- `HEAD|GET /cdn/<sha256>/<name>`: the bytes, with Range support (206 / Content-Range / 416).
- `HEAD|GET /plain/<name>`: a plain HTTP source; `required_headers` are enforced (401 otherwise).
- `HEAD|GET /moved/<name>`: 302 from the plain source to the "CDN" on another origin (`localhost` on loopback;
  on another host, a second port of the same server, since pods on real nodes cannot reach this machine's
  `localhost`).

`running(host)` listens on loopback by default; the e2e tests pass the host address where pods on real nodes
reach this machine (bound before the sandbox creates it: IP_FREEBIND).

Fault injection per served file (`Faults`): drop the connection after N body bytes (per request, in order),
5xx bursts with Retry-After, a per-connection bandwidth cap, a first-byte delay, wrong content, no ranges.
Counters: body bytes served per file, and a log of requests (method, path, Range, header names).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Faults:
    drop_after: list[int] = field(default_factory=list)
    """For each of the next GET requests, close the connection after this many body bytes."""
    fail: int = 0
    """Answer the next `fail` GET requests with `fail_status`."""
    fail_status: int = 503
    retry_after: float | None = None
    rate: float | None = None
    """Bytes per second per connection."""
    delays: list[float] = field(default_factory=list)
    """For each of the next GET requests, seconds between the headers and the first body byte."""
    wrong_content: bool = False
    """Serve other bytes of the same size (the sha256 will not match)."""
    no_ranges: bool = False


@dataclass
class Served:
    name: str
    data: bytes | Path
    sha256: str
    size: int
    faults: Faults = field(default_factory=Faults)

    def read(self, start: int, end: int) -> bytes:
        if isinstance(self.data, Path):
            with self.data.open("rb") as handle:
                handle.seek(start)
                chunk = handle.read(end - start)
        else:
            chunk = self.data[start:end]
        if self.faults.wrong_content:
            chunk = bytes(b ^ 0x55 if i + start >= 4 else b for i, b in enumerate(chunk))
        return chunk


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    header_names: set[str]
    authorization: str | None


class FakeHub:
    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.repos: dict[tuple[str, str], dict[str, Served]] = {}
        self.gated: set[str] = set()
        self.plain: dict[str, Served] = {}
        self.cdn: dict[str, Served] = {}
        self.required_headers: dict[str, str] = {}
        self.bytes_served: dict[str, int] = {}
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._cdn: ThreadingHTTPServer | None = None

    # -- setup ----------------------------------------------------------------------------------------

    def add(self, repo: str, path: str, data: bytes | Path, revision: str = "main", gated: bool = False) -> Served:
        served = self._served(path.rsplit("/", 1)[-1], data)
        self.repos.setdefault((repo, revision), {})[path] = served
        self.cdn[served.sha256 + "/" + served.name] = served
        if gated:
            self.gated.add(repo)
        return served

    def add_plain(self, name: str, data: bytes | Path) -> Served:
        served = self._served(name, data)
        self.plain[name] = served
        return served

    @staticmethod
    def _served(name: str, data: bytes | Path) -> Served:
        if isinstance(data, Path):
            digest = hashlib.sha256()
            with data.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            return Served(name, data, digest.hexdigest(), data.stat().st_size)
        return Served(name, data, hashlib.sha256(data).hexdigest(), len(data))

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def cdn_url(self) -> str:
        """The same server under another origin, for the redirect to the "CDN": `localhost` on loopback, the
        second port elsewhere."""
        assert self._server is not None
        if self._cdn is not None:
            host, port = self._cdn.server_address[:2]
            return f"http://{host}:{port}"
        return f"http://localhost:{self._server.server_address[1]}"

    def served_bytes(self, name: str) -> int:
        with self.lock:
            return self.bytes_served.get(name, 0)

    @contextmanager
    def running(self, host: str = "127.0.0.1") -> Iterator[FakeHub]:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        servers = [_FreeBindServer((host, 0), Handler) for _ in range(1 if host == "127.0.0.1" else 2)]
        self._server, self._cdn = servers[0], (servers[1] if len(servers) > 1 else None)
        for server in servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name="fakehub", daemon=True).start()
        try:
            yield self
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
            self._server = self._cdn = None


IP_FREEBIND = 15  # linux/in.h; Python's socket module does not name it


class _FreeBindServer(ThreadingHTTPServer):
    """Binds an address this machine may not hold yet (the real nodes' host address appears when the sandbox
    starts, after the test chose the hub's URL)."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        super().server_bind()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def _record(self) -> None:
        with self.hub.lock:
            self.hub.requests.append(Request(
                self.command, self.path, self.headers.get("Range"), {k.lower() for k in self.headers.keys()},
                self.headers.get("Authorization"),
            ))

    def _simple(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _handle(self, head: bool) -> None:
        self._record()
        path = unquote(urlsplit(self.path).path)
        hub = self.hub
        match = _RESOLVE.match(path)
        if match:
            repo, rev, file_path = match.group("repo"), match.group("rev"), match.group("path")
            if repo in hub.gated:
                auth = self.headers.get("Authorization")
                if auth is None:
                    return self._simple(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"})
                if auth != f"Bearer {hub.token}":
                    return self._simple(403, {"X-Error-Code": "GatedRepo"})
            files = hub.repos.get((repo, rev))
            if files is None:
                return self._simple(404, {"X-Error-Code": "RepoNotFound"})
            served = files.get(file_path)
            if served is None:
                return self._simple(404, {"X-Error-Code": "EntryNotFound"})
            return self._simple(302, {
                # Another origin, like cdn-lfs.hf.co: credentials must not follow the redirect.
                "Location": f"{hub.cdn_url}/cdn/{served.sha256}/{served.name}?sig=secret-signature",
                "X-Linked-Etag": f'"{served.sha256}"',
                "X-Linked-Size": str(served.size),
                "ETag": '"0123456789abcdef0123456789abcdef01234567"',
            })
        if path.startswith("/cdn/"):
            served = hub.cdn.get(path[len("/cdn/"):])
            if served is None:
                return self._simple(404)
            return self._serve(served, head)
        if path.startswith("/moved/"):  # a plain URL that redirects to another origin (presigned storage)
            served = hub.plain.get(path[len("/moved/"):])
            if served is None:
                return self._simple(404)
            hub.cdn.setdefault(served.sha256 + "/" + served.name, served)
            return self._simple(302, {"Location": f"{hub.cdn_url}/cdn/{served.sha256}/{served.name}?sig=x"})
        if path.startswith("/plain/"):
            for key, value in hub.required_headers.items():
                if self.headers.get(key) != value:
                    return self._simple(401)
            served = hub.plain.get(path[len("/plain/"):])
            if served is None:
                return self._simple(404)
            return self._serve(served, head)
        return self._simple(404)

    def _serve(self, served: Served, head: bool) -> None:
        faults = served.faults
        if not head:
            with self.hub.lock:
                failing = faults.fail > 0
                if failing:
                    faults.fail -= 1
                drop = faults.drop_after.pop(0) if faults.drop_after and not failing else None
                delay = faults.delays.pop(0) if faults.delays and not failing else 0.0
            if failing:
                headers = {} if faults.retry_after is None else {"Retry-After": str(faults.retry_after)}
                return self._simple(faults.fail_status, headers)
        else:
            drop, delay = None, 0.0
        start, end = 0, served.size
        status = 200
        range_header = self.headers.get("Range")
        if range_header and not faults.no_ranges:
            match = _RANGE.match(range_header.strip())
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2)) + 1, served.size) if match.group(2) else served.size
                else:
                    start = max(0, served.size - int(match.group(2)))
                if start >= served.size:
                    return self._simple(416, {"Content-Range": f"bytes */{served.size}"})
                status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{served.sha256[:16]}"')
        if not faults.no_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{served.size}")
        self.end_headers()
        if head:
            return
        if delay:
            time.sleep(delay)
        offset = start
        block = 64 * 1024
        began = time.monotonic()
        sent = 0
        while offset < end:
            n = min(block, end - offset)
            if drop is not None:
                n = min(n, drop - sent)
                if n <= 0:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
            chunk = served.read(offset, offset + n)
            try:
                self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            with self.hub.lock:
                self.hub.bytes_served[served.name] = self.hub.bytes_served.get(served.name, 0) + len(chunk)
            offset += n
            sent += n
            if faults.rate:
                ahead = sent / faults.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    vocab: int = 32,
    tensors: dict[str, tuple[int, ...]] | None = None,
    file_type: int | None = 15,
    extra: dict[str, int] | None = None,
    split: tuple[int, int] | None = None,
) -> Path:
    """A synthetic GGUF written with the `gguf` package: metadata, a vocabulary and zero-filled f32 tensors.

    `split=(index, count)` adds the split.* keys gguf-split writes (index is 0-based, as in the file).
    """
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Synthetic Test Model")
    writer.add_size_label("1K")
    writer.add_context_length(4096)
    writer.add_block_count(2)
    writer.add_embedding_length(8)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    if file_type is not None:
        writer.add_file_type(file_type)
    if split is not None:
        writer.add_uint16("split.no", split[0])
        writer.add_uint16("split.count", split[1])
        writer.add_int32("split.tensors.count", 2 * split[1])
    for key, value in (extra or {}).items():
        writer.add_uint32(key, value)
    if vocab:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"tok{i}" for i in range(vocab)])
        writer.add_token_scores([0.0] * vocab)
        writer.add_token_types([1] * vocab)
    for name, shape in (tensors or {"token_embd.weight": (vocab or 32, 8), "output_norm.weight": (8,)}).items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
