"""`llama-operator fetch`: the init container that puts a model's files into the cache volume.

Owns the download protocol and the on-disk cache layout of one model directory `<cache-dir>/<cache-key>/`:

    model-00001-of-00002.gguf            complete, verified file (appears only by rename)
    model-00001-of-00002.gguf.verified   marker: JSON {file, size, sha256, source, verifiedAt}
    model-00002-of-00002.gguf.part       bytes being downloaded (resumed after any interruption)
    model-00002-of-00002.gguf.part.json  download state: size, validator (ETag), per-piece progress
    .fetch.lock                          flock: one fetch per model directory at a time

Guarantees (docs/model-sources.md lists them for users):
- a final file exists only if its size matched, its first bytes were the GGUF magic and its sha256 matched
  (when one is known: the spec's, or Hugging Face's X-Linked-Etag); it is fsynced before the rename;
- a marker lets a later run skip download and re-hash: a cache hit reads two small files;
- `.part` + `.part.json` let a killed pod continue where it stopped (Range requests); the state is written
  only after the bytes it describes, and a `.part` without a state file is discarded;
- two fetches sharing a cache (RWX PVC, hostPath) serialise on `.fetch.lock`; the second then hits the cache;
- transient errors are retried with capped exponential backoff and jitter; permanent ones exit fast with the
  exit codes below and a one-line reason in the termination log (`Reason: message`).

Concurrency model: plain threads, not asyncio. The work is a few blocking streams (socket reads, positional
file writes, sha256), all of which release the GIL in C, and the process has nothing else to serve, so
threads give parallel segments without wrapping every file write in an executor. Each connection is one
worker thread taking the next unfinished *piece* (a byte range) of the file, in order; a hasher thread
follows the contiguous downloaded prefix, reading it back from the page cache, so hashing overlaps the
download instead of following it; it also issues fdatasync as it goes so the final fsync is short. HTTP is
`http.client` with `readinto` into a reused buffer (see `_Http` for why not httpx); proxies come from
HTTP(S)_PROXY / NO_PROXY.

Secrets: the Hugging Face token comes from `HF_TOKEN`, extra headers from `LLAMA_FETCH_HEADER_<Name>` env
vars (populated from Secrets); they are sent only to the origin of the URL they belong to (dropped on a
redirect to a CDN) and never logged. URLs are logged without their query string.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import math
import os
import random
import shutil
import signal
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from .gguf import GGUF_MAGIC
from .sources import error_for_status, hf_resolve_url, parse_linked_headers, redact_url, shard_names

log = logging.getLogger("llama_operator.fetch")

# Exit codes: documented in docs/model-sources.md; the operator maps them to LlamaServer status.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 10
EXIT_UNAUTHORIZED = 11
EXIT_FORBIDDEN = 12
EXIT_CHECKSUM = 13
EXIT_NOT_GGUF = 14
EXIT_DISK_FULL = 15
EXIT_UNREACHABLE = 16
EXIT_INTERRUPTED = 143

HEADER_ENV_PREFIX = "LLAMA_FETCH_HEADER_"
TOKEN_ENV = "HF_TOKEN"
TERMINATION_LOG_ENV = "LLAMA_FETCH_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
DEFAULT_CONNECTIONS = 8
MiB = 1024 * 1024

_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 10
_TERMINATION_LIMIT = 4000
_BUFFER_SIZE = 256 * 1024  # readinto fills it completely: small enough for prompt progress and SIGTERM
_USER_AGENT = "llama-operator-fetch"  # the kubelet keeps at most 4096 bytes


class FetchError(Exception):
    """A failure with a documented exit code and a CamelCase reason for the termination message."""

    exit_code = EXIT_ERROR
    reason = "Error"


class NotFoundError(FetchError):
    exit_code, reason = EXIT_NOT_FOUND, "NotFound"


class UnauthorizedError(FetchError):
    exit_code, reason = EXIT_UNAUTHORIZED, "Unauthorized"


class ForbiddenError(FetchError):
    exit_code, reason = EXIT_FORBIDDEN, "Forbidden"


class ChecksumError(FetchError):
    exit_code, reason = EXIT_CHECKSUM, "ChecksumMismatch"


class NotGgufError(FetchError):
    exit_code, reason = EXIT_NOT_GGUF, "NotAGguf"


class DiskFullError(FetchError):
    exit_code, reason = EXIT_DISK_FULL, "DiskFull"


class UnreachableError(FetchError):
    exit_code, reason = EXIT_UNREACHABLE, "Unreachable"


class InterruptedFetch(FetchError):
    exit_code, reason = EXIT_INTERRUPTED, "Interrupted"


class _Transient(Exception):
    """A retryable failure of one request."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FetchOptions:
    """What to fetch and how. Secrets (`hf_token`, `headers`) never come from the command line."""

    cache_dir: Path
    cache_key: str
    hf_repo: str | None = None
    hf_file: str | None = None
    hf_revision: str = "main"
    hf_endpoint: str = "https://huggingface.co"
    url: str | None = None
    sha256: str | None = None
    connections: int = DEFAULT_CONNECTIONS
    hf_token: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    progress_interval: float = 5.0
    retries: int = 10
    """Consecutive failed attempts of one piece (without progress in between) before giving up."""
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    parallel_threshold: int = 64 * MiB
    """Files smaller than this are fetched over one connection."""
    min_piece: int = 8 * MiB
    max_piece: int = 512 * MiB
    fsync_every: int = 512 * MiB
    connect_timeout: float = 15.0
    read_timeout: float = 60.0

    def remote_files(self) -> list[_RemoteFile]:
        """Every file of the model, from the (first) file name: split GGUFs expand to all shards."""
        if self.hf_repo and self.hf_file:
            auth = dict(self.headers)
            if self.hf_token:
                auth["Authorization"] = f"Bearer {self.hf_token}"
            return [
                _RemoteFile(
                    name=path.rsplit("/", 1)[-1],
                    url=hf_resolve_url(self.hf_endpoint, self.hf_repo, self.hf_revision, path),
                    identity=f"hf:{self.hf_repo}@{self.hf_revision}/{path}",
                    headers=auth,
                )
                for path in shard_names(self.hf_file)
            ]
        if self.url:
            base, sep, query = self.url.partition("?")
            return [
                _RemoteFile(
                    name=url.rsplit("/", 1)[-1],
                    url=f"{url}{sep}{query}",
                    identity=redact_url(url),
                    headers=dict(self.headers),
                )
                for url in shard_names(base)
            ]
        raise FetchError("either --hf-repo and --hf-file, or --url, is required")


@dataclass
class _RemoteFile:
    name: str
    url: str
    identity: str
    headers: dict[str, str] = field(repr=False)
    size: int | None = None
    sha256: str | None = None
    etag: str | None = None
    ranges: bool = False


@dataclass
class _Piece:
    start: int
    end: int | None  # exclusive; None: unknown size, until the end of the stream
    done: int = 0

    @property
    def complete(self) -> bool:
        return self.end is not None and self.start + self.done >= self.end


# ---------------------------------------------------------------------------------------------- HTTP


@dataclass
class _Response:
    """A response whose headers are a plain lower-cased dict (for the helpers shared with `sources`)."""

    status: int
    headers: dict[str, str]
    url: str
    raw: http.client.HTTPResponse


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


class _Http:
    """HTTP/1.1 on `http.client`: one keep-alive connection per (thread, origin), redirects followed by hand.

    Why not httpx here: the body is read with `readinto` straight into a reused buffer that is then written to
    the file — one copy from the socket, like curl. httpx/h11 allocate and copy every 64 KiB chunk several times,
    which doubled fetch's user CPU per byte on fast links (docs/model-sources.md). Proxies follow the usual
    HTTP(S)_PROXY / NO_PROXY variables (CONNECT tunnel for https); TLS trusts $SSL_CERT_FILE, else certifi's
    bundle (what httpx, used by the operator, trusts).
    """

    def __init__(self, timeout: float, proxies: Mapping[str, str] | None = None) -> None:
        self.timeout = timeout
        self.proxies = dict(urllib.request.getproxies() if proxies is None else proxies)
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            cafile = os.environ.get("SSL_CERT_FILE")
            if not cafile:
                with contextlib.suppress(ImportError):
                    import certifi

                    cafile = certifi.where()
            self._ssl = ssl.create_default_context(cafile=cafile or None)
        return self._ssl

    def _connections(self) -> dict[tuple[str, str, int], tuple[http.client.HTTPConnection, bool]]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        return conns

    def _connection(self, key: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool, bool]:
        """(connection, absolute-form request target, reused) for an origin."""
        conns = self._connections()
        if key in conns:
            return (*conns[key], True)
        scheme, host, port = key
        proxy = None if urllib.request.proxy_bypass(host) else self.proxies.get(scheme)
        conn: http.client.HTTPConnection
        absolute = False
        if proxy:
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            proxy_auth = {}
            if p.username:
                token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
                proxy_auth["Proxy-Authorization"] = f"Basic {token}"
            if scheme == "https":
                conn = http.client.HTTPSConnection(p.hostname or "", p.port or 80, timeout=self.timeout,
                                                   context=self._context())
                conn.set_tunnel(host, port, headers=proxy_auth)
            else:
                conn = http.client.HTTPConnection(p.hostname or "", p.port or 80, timeout=self.timeout)
                absolute = True
        elif scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._context())
        elif scheme == "http":
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        else:
            raise FetchError(f"unsupported URL scheme {scheme!r}")
        conns[key] = (conn, absolute)
        return conn, absolute, False

    def drop(self, key: tuple[str, str, int]) -> None:
        entry = self._connections().pop(key, None)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        for key in list(self._connections()):
            self.drop(key)

    def _send(self, method: str, url: str, headers: Mapping[str, str]) -> _Response:
        key = _origin(url)
        parts = urlsplit(url)
        for _ in range(2):
            conn, absolute, reused = self._connection(key)
            target = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, "")) if absolute else (
                (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            )
            try:
                conn.request(method, target, headers=dict(headers))
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self.drop(key)
                if reused:  # the server closed an idle keep-alive connection: a fresh one, no backoff
                    continue
                raise _Transient(f"{type(exc).__name__}: {exc or 'connection failed'}") from exc
            return _Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, url, raw)
        raise _Transient("connection closed twice")  # pragma: no cover - the loop returns or raises

    def _finish(self, response: _Response) -> None:
        """Release the connection: reusable only when the body was read to its end."""
        raw = response.raw
        if not raw.isclosed():
            try:
                if raw.length is not None and raw.length <= 64 * 1024:
                    raw.read()
            except (OSError, http.client.HTTPException):
                pass
        if not raw.isclosed() or raw.will_close:
            self.drop(_origin(response.url))

    @contextlib.contextmanager
    def open(
        self, method: str, remote: _RemoteFile, extra: Mapping[str, str] | None = None,
        *, first_hop: Callable[[_Response], None] | None = None,
    ) -> Iterator[_Response]:
        """Send, following redirects; the caller's secret headers go only to the origin they were given for.

        `first_hop` sees the first answer (the hub's resolve response with X-Linked-Etag) before it is followed.
        Retryable failures raise `_Transient`, permanent statuses a FetchError.
        """
        url = remote.url
        origin = _origin(remote.url)
        for hop in range(_MAX_REDIRECTS + 1):
            headers = {
                "User-Agent": _USER_AGENT,
                "Accept-Encoding": "identity",
                **(remote.headers if _origin(url) == origin else {}),
                **(extra or {}),
            }
            response = self._send(method, url, headers)
            try:
                if hop == 0 and first_hop is not None:
                    first_hop(response)
                location = response.headers.get("location")
                if response.status in _REDIRECTS and location:
                    url = urljoin(url, location)
                    continue
                if response.status >= 400:
                    raise _status_error(response, remote)
                yield response
                return
            finally:
                self._finish(response)
        raise FetchError(f"{remote.name}: more than {_MAX_REDIRECTS} redirects")


def _status_error(response: _Response, remote: _RemoteFile) -> Exception:
    what = f"{remote.name} ({redact_url(response.url)})"
    status = response.status
    error = error_for_status(status, what, response.headers, token_given=bool(remote.headers))
    if error.transient:
        return _Transient(str(error), getattr(error, "retry_after", None))
    if status == 404:
        return NotFoundError(str(error))
    if status == 401:
        return UnauthorizedError(str(error))
    if status == 403:
        return ForbiddenError(str(error))
    return FetchError(str(error))


def _backoff(attempt: int, options: FetchOptions, retry_after: float | None) -> float:
    """Capped exponential backoff with "equal jitter"; a server's Retry-After wins when it asks for longer."""
    ceiling = min(options.backoff_cap, options.backoff_base * (2 ** (attempt - 1)))
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, 10 * options.backoff_cap))
    return delay


# ---------------------------------------------------------------------------------------------- the fetcher


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class Fetcher:
    """Downloads the files of one model into `<cache_dir>/<cache_key>/`.

    Collaborators are parameters so tests can substitute them: `proxies` (default: from the environment),
    `free_space` (bytes free under a path), `stop` (an Event set on SIGTERM), `clock`.
    """

    def __init__(
        self,
        options: FetchOptions,
        *,
        proxies: Mapping[str, str] | None = None,
        free_space: Callable[[Path], int] = _disk_free,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.dir = options.cache_dir / options.cache_key
        self.free_space = free_space
        self.stop = stop or threading.Event()
        self.clock = clock
        self.http = _Http(options.read_timeout, proxies)
        self._buffers = threading.local()  # one receive buffer per worker thread

    def close(self) -> None:
        self.http.close()

    # -- cache ----------------------------------------------------------------------------------------

    def _marker(self, name: str) -> Path:
        return self.dir / f"{name}.verified"

    def _cached(self, name: str, expected_sha: str | None) -> bool:
        """True when the final file exists and its marker vouches for it (no hashing)."""
        path, marker = self.dir / name, self._marker(name)
        try:
            record = json.loads(marker.read_text())
            size = path.stat().st_size
        except (OSError, ValueError):
            return False
        if record.get("size") != size or not isinstance(record.get("sha256"), str):
            return False
        return expected_sha is None or record["sha256"] == expected_sha

    def _all_cached(self, remotes: list[_RemoteFile]) -> bool:
        return all(self._cached(r.name, self.options.sha256 if i == 0 else None) for i, r in enumerate(remotes))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """flock on the model directory: works across processes and, on Linux NFS, across nodes."""
        fd = os.open(self.dir / ".fetch.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            waited_since: float | None = None
            last_note = 0.0
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = self.clock()
                    if waited_since is None:
                        waited_since = now
                    if now - last_note >= self.options.progress_interval:
                        log.info("Waiting for another fetch of %s (lock %s held)", self.options.cache_key,
                                 self.dir / ".fetch.lock")
                        last_note = now
                    if self.stop.wait(0.1):
                        raise InterruptedFetch("stopped while waiting for the cache lock") from None
            if waited_since is not None:
                log.info("Lock acquired after %.1fs", self.clock() - waited_since)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # -- entry point ----------------------------------------------------------------------------------

    def run(self) -> list[Path]:
        """Fetch every file of the model; returns their final paths. Raises FetchError."""
        started = self.clock()
        remotes = self.options.remote_files()
        self.dir.mkdir(parents=True, exist_ok=True)
        paths = [self.dir / r.name for r in remotes]
        if self._all_cached(remotes):
            log.info("Cache hit: %s (%d file(s), %s) in %.3fs", self.dir, len(remotes),
                     _human(sum(p.stat().st_size for p in paths)), self.clock() - started)
            return paths
        with self._lock():
            first_sha = self.options.sha256
            missing = [(i, r) for i, r in enumerate(remotes) if not self._cached(r.name, first_sha if i == 0 else None)]
            if not missing:
                log.info("Cache hit after waiting: %s was fetched by another pod", self.dir)
                return paths
            for i, remote in missing:
                self._probe(remote, expected_sha=self.options.sha256 if i == 0 else None)
            self._check_space([r for _, r in missing])
            for _, remote in missing:
                self._download(remote, expected_sha=remote.sha256)  # the probe merged spec and hub
        log.info("Fetched %s: %d file(s) in %s", self.dir, len(remotes), _duration(self.clock() - started))
        return paths

    # -- probe ----------------------------------------------------------------------------------------

    def _probe(self, remote: _RemoteFile, *, expected_sha: str | None) -> None:
        """Size, sha256 (hub LFS files), range support and validator of one file, with retries."""

        def first_hop(response: _Response) -> None:
            linked = parse_linked_headers(response.url, response.status, response.headers)
            remote.sha256 = remote.sha256 or linked.sha256
            if linked.size is not None and response.headers.get("x-linked-size"):
                remote.size = linked.size

        def attempt() -> None:
            with self.http.open("HEAD", remote, first_hop=first_hop) as response:
                status, headers = response.status, response.headers
            if status in (405, 501):
                with self.http.open("GET", remote, {"Range": "bytes=0-0"}) as response:
                    status, headers = response.status, response.headers
            content_range = headers.get("content-range", "")
            if status == 206 and content_range.rsplit("/", 1)[-1].isdigit():
                remote.size = int(content_range.rsplit("/", 1)[-1])
                remote.ranges = True
            else:
                if remote.size is None and headers.get("content-length", "").isdigit():
                    remote.size = int(headers["content-length"])
                remote.ranges = headers.get("accept-ranges", "").lower() == "bytes"
            remote.etag = headers.get("etag")

        self._retrying(attempt, f"{remote.name}: probe", progress=lambda: 0)
        if expected_sha and remote.sha256 and expected_sha != remote.sha256:
            raise ChecksumError(
                f"{remote.name}: expected sha256 {expected_sha} but the source publishes {remote.sha256} "
                "(the file changed upstream, or the sha256 names another file)"
            )
        if expected_sha:
            remote.sha256 = expected_sha
        log.info("Source %s: %s, sha256 %s, ranges %s", redact_url(remote.url),
                 _human(remote.size) if remote.size is not None else "size unknown",
                 remote.sha256 or "unknown", "yes" if remote.ranges else "no")

    def _retrying(self, attempt: Callable[[], None], what: str, progress: Callable[[], int]) -> None:
        """Run `attempt` until it succeeds; `_Transient` failures back off, reset by progress."""
        failures = 0
        last_progress = progress()
        while True:
            if self.stop.is_set():
                raise InterruptedFetch(f"{what}: stopped")
            try:
                attempt()
                return
            except _Transient as exc:
                if progress() != last_progress:
                    failures, last_progress = 0, progress()
                failures += 1
                if failures > self.options.retries:
                    raise UnreachableError(f"{what}: giving up after {self.options.retries} retries: {exc}") from exc
                delay = _backoff(failures, self.options, exc.retry_after)
                log.warning("%s: %s; retry %d/%d in %.1fs", what, exc, failures, self.options.retries, delay)
                if self.stop.wait(delay):
                    raise InterruptedFetch(f"{what}: stopped") from exc

    # -- disk -----------------------------------------------------------------------------------------

    def _state_path(self, name: str) -> Path:
        return self.dir / f"{name}.part.json"

    def _done_bytes(self, remote: _RemoteFile) -> int:
        state = self._load_state(remote)
        return sum(p.done for p in state) if state else 0

    def _check_space(self, remotes: list[_RemoteFile]) -> None:
        needed = sum(r.size - self._done_bytes(r) for r in remotes if r.size is not None)
        free = self.free_space(self.dir)
        if needed > free:
            raise DiskFullError(
                f"not enough space in {self.dir}: the model needs {_human(needed)} more, only {_human(free)} free "
                "(raise the LlamaModel cache size)"
            )

    def _load_state(self, remote: _RemoteFile) -> list[_Piece] | None:
        """Pieces of an interrupted download of this same file, or None (then any .part is discarded)."""
        try:
            state = json.loads(self._state_path(remote.name).read_text())
            part_exists = (self.dir / f"{remote.name}.part").exists()
        except (OSError, ValueError):
            return None
        if not part_exists or state.get("identity") != remote.identity or state.get("size") != remote.size:
            return None
        if remote.etag and state.get("etag") and state["etag"] != remote.etag:
            return None  # the file changed upstream since: its old bytes are worthless
        try:
            return [_Piece(int(p[0]), None if p[1] is None else int(p[1]), int(p[2])) for p in state["pieces"]]
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def _save_state(self, remote: _RemoteFile, pieces: list[_Piece]) -> None:
        _write_json_atomic(self._state_path(remote.name), {
            "identity": remote.identity,
            "size": remote.size,
            "etag": remote.etag,
            "pieces": [[p.start, p.end, p.done] for p in pieces],
        })

    def _plan(self, remote: _RemoteFile) -> list[_Piece]:
        size, opts = remote.size, self.options
        if size is None:
            return [_Piece(0, None)]
        if not remote.ranges or opts.connections <= 1 or size < opts.parallel_threshold:
            return [_Piece(0, size)]
        # About four pieces per connection: a slow connection delays the end by at most one small piece.
        piece = math.ceil(size / (opts.connections * 4) / MiB) * MiB
        piece = max(opts.min_piece, min(opts.max_piece, piece))
        return [_Piece(start, min(start + piece, size)) for start in range(0, size, piece)]

    # -- download -------------------------------------------------------------------------------------

    def _download(self, remote: _RemoteFile, *, expected_sha: str | None) -> None:
        final = self.dir / remote.name
        part = self.dir / f"{remote.name}.part"
        pieces = self._load_state(remote)
        if pieces is not None and not remote.ranges and any(p.done for p in pieces[1:]):
            pieces = None  # the server no longer does ranges: only a fresh single stream is possible
        resumed = sum(p.done for p in pieces) if pieces else 0
        if pieces is None:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
            pieces = self._plan(remote)
        if not remote.ranges and len(pieces) == 1 and pieces[0].done:
            pieces[0].done = 0  # cannot continue without Range support
            resumed = 0
        self._save_state(remote, pieces)  # the state exists before any byte it describes
        with contextlib.suppress(FileNotFoundError):
            final.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._marker(remote.name).unlink()

        connections = min(self.options.connections, sum(1 for p in pieces if not p.complete)) or 1
        log.info("Downloading %s (%s) into %s%s with %d connection(s)", remote.name,
                 _human(remote.size) if remote.size is not None else "size unknown", self.dir,
                 f", resuming at {_human(resumed)}" if resumed else "", connections)

        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                digest, size = self._transfer(remote, fd, pieces, connections, resumed)
            except NotGgufError:
                self._discard(remote)
                raise
            head = os.pread(fd, 4, 0)
            if head != GGUF_MAGIC:
                self._discard(remote)
                raise NotGgufError(f"{remote.name}: not a GGUF file (starts with {head!r}); the download was deleted")
            if expected_sha and digest != expected_sha:
                self._discard(remote)
                raise ChecksumError(
                    f"{remote.name}: sha256 mismatch: expected {expected_sha}, downloaded bytes have {digest}; "
                    "the download was deleted"
                )
            os.fsync(fd)  # the bytes are on disk before the name says "complete"
        finally:
            os.close(fd)
        os.replace(part, final)
        _write_json_atomic(self._marker(remote.name), {
            "file": remote.name,
            "size": size,
            "sha256": digest,
            "source": remote.identity,
            "verifiedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        self._state_path(remote.name).unlink(missing_ok=True)
        _fsync_dir(self.dir)
        log.info("Verified %s: %s, sha256 %s%s", remote.name, _human(size), digest,
                 " (matches)" if expected_sha else " (no expected sha256 given)")

    def _discard(self, remote: _RemoteFile) -> None:
        for path in (self.dir / f"{remote.name}.part", self._state_path(remote.name)):
            path.unlink(missing_ok=True)

    def _transfer(
        self, remote: _RemoteFile, fd: int, pieces: list[_Piece], connections: int, resumed: int
    ) -> tuple[str, int]:
        """Run the workers, the hasher and the progress/state loop; returns (sha256, size)."""
        queue = iter([p for p in pieces if not p.complete])
        queue_lock = threading.Lock()
        failure: list[BaseException] = []
        abort = threading.Event()

        def next_piece() -> _Piece | None:
            with queue_lock:
                return next(queue, None)

        def worker() -> None:
            try:
                while not (abort.is_set() or self.stop.is_set()):
                    piece = next_piece()
                    if piece is None:
                        return
                    self._fetch_piece(remote, fd, piece, abort)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                failure.append(exc)
                abort.set()

        hasher = _Hasher(fd, pieces, self.options.fsync_every)
        threads = [threading.Thread(target=worker, name=f"fetch-{i}", daemon=True) for i in range(connections)]
        hasher.start()
        for thread in threads:
            thread.start()

        total = remote.size
        started = last_log = last_state = self.clock()
        last_bytes = done = resumed
        try:
            while any(t.is_alive() for t in threads):
                abort.wait(min(0.25, self.options.progress_interval))
                if self.stop.is_set():
                    abort.set()
                now = self.clock()
                done = sum(p.done for p in pieces)
                if now - last_state >= 0.5:
                    self._save_state(remote, pieces)
                    last_state = now
                if now - last_log >= self.options.progress_interval:
                    rate = (done - last_bytes) / max(now - last_log, 1e-9)
                    self._progress(remote.name, done, total, rate, connections)
                    last_log, last_bytes = now, done
        except BaseException:
            abort.set()
            raise
        finally:
            for thread in threads:
                thread.join()
            self._save_state(remote, pieces)
        if failure:
            hasher.cancel()
            raise failure[0]
        if self.stop.is_set():
            hasher.cancel()
            raise InterruptedFetch(f"{remote.name}: stopped at {_human(sum(p.done for p in pieces))}; it resumes")
        size = sum(p.done for p in pieces)
        if total is not None and size != total:
            hasher.cancel()
            raise UnreachableError(f"{remote.name}: got {size} bytes, expected {total}")
        hasher.finish(size)
        elapsed = max(self.clock() - started, 1e-9)
        log.info("Downloaded %s: %s in %s (%.1f MB/s)", remote.name, _human(size - resumed), _duration(elapsed),
                 (size - resumed) / elapsed / 1e6)
        return hasher.hexdigest(), size

    @staticmethod
    def _progress(name: str, done: int, total: int | None, rate: float, connections: int) -> None:
        if total:
            eta = (total - done) / rate if rate > 0 else math.inf
            log.info("Progress %s: %5.1f%% %s / %s, %.1f MB/s, ETA %s, %d connection(s)", name, 100 * done / total,
                     _human(done), _human(total), rate / 1e6, _duration(eta) if eta != math.inf else "unknown",
                     connections)
        else:
            log.info("Progress %s: %s, %.1f MB/s", name, _human(done), rate / 1e6)

    def _fetch_piece(self, remote: _RemoteFile, fd: int, piece: _Piece, abort: threading.Event) -> None:
        def attempt() -> None:
            start = piece.start + piece.done
            extra: dict[str, str] = {}
            if remote.ranges:
                extra["Range"] = f"bytes={start}-" + ("" if piece.end is None else str(piece.end - 1))
            # Without range support a retry re-reads the stream from the start and skips what is on disk.
            with self.http.open("GET", remote, extra) as response:
                skip = 0
                if response.status == 200 and start > 0:
                    skip = start  # a server that ignored Range: drop what we already have
                elif response.status == 206:
                    first = response.headers.get("content-range", "").removeprefix("bytes ").split("-", 1)[0]
                    if first != str(start):
                        raise _Transient(f"server answered range {first!r}, asked for {start}")
                elif response.status != 200:
                    raise FetchError(f"{remote.name}: unexpected HTTP {response.status}")
                self._stream(response.raw, fd, piece, skip, abort)

        what = f"{remote.name} bytes {piece.start}-{'' if piece.end is None else piece.end - 1}"
        self._retrying_piece(attempt, what, piece, abort)

    def _retrying_piece(self, attempt: Callable[[], None], what: str, piece: _Piece, abort: threading.Event) -> None:
        failures = 0
        last = piece.done
        while not piece.complete:
            if abort.is_set() or self.stop.is_set():
                return
            try:
                attempt()
                if abort.is_set() or self.stop.is_set():
                    return
                if piece.end is None:
                    return  # unknown size: a clean end of stream is the end of the file
                if not piece.complete:
                    raise _Transient("response ended early")
            except _Transient as exc:
                if piece.done != last:
                    failures, last = 0, piece.done
                failures += 1
                if failures > self.options.retries:
                    raise UnreachableError(f"{what}: giving up after {self.options.retries} retries: {exc}") from exc
                delay = _backoff(failures, self.options, exc.retry_after)
                log.warning("%s: %s; retry %d/%d in %.1fs", what, exc, failures, self.options.retries, delay)
                if abort.wait(delay):
                    return

    def _stream(
        self,
        response: http.client.HTTPResponse,
        fd: int,
        piece: _Piece,
        skip: int,
        abort: threading.Event,
    ) -> None:
        offset = piece.start + piece.done
        limit = None if piece.end is None else piece.end - offset
        buf = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = memoryview(bytearray(_BUFFER_SIZE))
        try:
            while limit is None or limit > 0:
                want = len(buf) if limit is None else min(len(buf), limit + skip)
                n = response.readinto(buf[:want])
                if not n:
                    return  # end of body: the caller checks whether the piece is complete
                chunk = buf[:n]
                if skip:
                    if n <= skip:
                        skip -= n
                        continue
                    chunk, skip = chunk[skip:], 0
                if offset == 0 and bytes(chunk[:4]) != GGUF_MAGIC[: len(chunk[:4])]:
                    raise NotGgufError(f"not a GGUF file: the server sent {bytes(chunk[:16])!r}...")
                written = 0
                while written < len(chunk):
                    try:
                        written += os.pwrite(fd, chunk[written:], offset + written)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise DiskFullError(f"disk full while writing: {exc.strerror}") from exc
                        raise
                offset += written
                piece.done += written  # only after the bytes are in the file: the state never runs ahead
                if limit is not None:
                    limit -= written
                if abort.is_set() or self.stop.is_set():  # SIGTERM: stop at a chunk boundary
                    return
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc or 'connection dropped'}") from exc


class _Hasher(threading.Thread):
    """sha256 of the contiguous downloaded prefix, computed while the rest downloads.

    It reads back what the workers wrote, from the page cache, rather than hashing in the workers: on a fast link
    the worker's page-cache writes and the sha256 then run on two cores instead of one after the other (measured:
    hashing inline made one stream about 2x slower than curl on loopback), and a resumed download hashes its
    old bytes the same way as new ones. Every `fsync_every` bytes it calls fdatasync so that dirty pages are
    written while the download continues and the final fsync is short.
    """

    def __init__(self, fd: int, pieces: list[_Piece], fsync_every: int) -> None:
        super().__init__(name="fetch-sha256", daemon=True)
        self.fd = fd
        self.pieces = pieces
        self.fsync_every = fsync_every
        self.sha = hashlib.sha256()
        self.hashed = 0
        self._final_size: int | None = None
        self._cancel = threading.Event()
        self._wake = threading.Event()
        self._first_open = 0

    def _frontier(self) -> int:
        for index in range(self._first_open, len(self.pieces)):
            piece = self.pieces[index]
            if not piece.complete:
                self._first_open = index
                return piece.start + piece.done
        self._first_open = len(self.pieces)
        last = self.pieces[-1]
        return last.start + last.done

    def run(self) -> None:
        view = memoryview(bytearray(8 * MiB))
        synced = 0
        while not self._cancel.is_set():
            target = self._final_size if self._final_size is not None else self._frontier()
            while not self._cancel.is_set():
                if self.hashed >= target:
                    break
                n = os.preadv(self.fd, [view[: min(len(view), target - self.hashed)]], self.hashed)
                if n <= 0:
                    break
                self.sha.update(view[:n])
                self.hashed += n
            if self.hashed - synced >= self.fsync_every:
                synced = self.hashed
                os.fdatasync(self.fd)
            if self._final_size is not None and self.hashed >= self._final_size:
                return
            self._wake.wait(0.05)
            self._wake.clear()

    def finish(self, size: int) -> None:
        self._final_size = size
        self._wake.set()
        self.join()

    def cancel(self) -> None:
        self._cancel.set()
        self._wake.set()
        self.join()

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


# ---------------------------------------------------------------------------------------------- CLI


def headers_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`LLAMA_FETCH_HEADER_<Name>` variables as HTTP headers; `_` in the name becomes `-` (X_Api_Key)."""
    return {
        key[len(HEADER_ENV_PREFIX):].replace("_", "-"): value
        for key, value in environ.items()
        if key.startswith(HEADER_ENV_PREFIX) and len(key) > len(HEADER_ENV_PREFIX)
    }


def write_termination_log(path: str, reason: str, message: str) -> None:
    """`Reason: message` for the kubelet to put into the container status (best effort)."""
    text = f"{reason}: {message}"
    data = text.encode()[:_TERMINATION_LIMIT]
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        log.debug("could not write the termination log %s: %s", path, exc)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `fetch` subcommand to the llama-operator command line."""
    parser = sub.add_parser(
        "fetch",
        help="download a model's files into a cache directory (the init container)",
        description="Download every file of a model into <cache-dir>/<cache-key>/ with resume, parallel "
        "segments and sha256 verification. Secrets come from the environment: HF_TOKEN, and "
        "LLAMA_FETCH_HEADER_<Header-Name> for extra HTTP headers.",
    )
    parser.add_argument("--cache-dir", required=True, type=Path, help="root of the cache volume")
    parser.add_argument("--cache-key", required=True, help="directory of this model inside the cache")
    parser.add_argument("--hf-repo", help="Hugging Face repository, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    parser.add_argument("--hf-file", help="file in the repository (first shard of a split model)")
    parser.add_argument("--hf-revision", default="main", help="branch, tag or commit (default main)")
    parser.add_argument("--hf-endpoint", default=os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                        help="hub base URL (default $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--url", help="plain http(s) URL of the file (first shard of a split model)")
    parser.add_argument("--sha256", help="expected sha256 of the (first) file, lowercase hex")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                        help=f"parallel connections for large files (default {DEFAULT_CONNECTIONS})")
    parser.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument("--retries", type=int, default=10,
                        help="consecutive failed attempts without progress before giving up (default 10)")
    parser.add_argument("--termination-log",
                        default=os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG),
                        help=f"where the failure reason is written (default ${TERMINATION_LOG_ENV} or "
                        f"{DEFAULT_TERMINATION_LOG})")
    parser.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if not ((args.hf_repo and args.hf_file) or args.url) or (args.url and (args.hf_repo or args.hf_file)):
        message = "give either --hf-repo and --hf-file, or --url"
        write_termination_log(args.termination_log, "InvalidArguments", message)
        print(f"llama-operator fetch: {message}", file=sys.stderr)
        return EXIT_USAGE
    if args.sha256 is not None:
        args.sha256 = args.sha256.lower()
    options = FetchOptions(
        cache_dir=args.cache_dir,
        cache_key=args.cache_key,
        hf_repo=args.hf_repo,
        hf_file=args.hf_file,
        hf_revision=args.hf_revision,
        hf_endpoint=args.hf_endpoint.rstrip("/"),
        url=args.url,
        sha256=args.sha256,
        connections=max(1, args.connections),
        hf_token=os.environ.get(TOKEN_ENV) or None,
        headers=headers_from_env(os.environ),
        progress_interval=args.progress_interval,
        retries=args.retries,
    )
    return run(options, termination_log=args.termination_log)


def run(options: FetchOptions, *, termination_log: str, free_space: Callable[[Path], int] = _disk_free) -> int:
    """Fetch, turning the outcome into an exit code and a termination message. SIGTERM stops cleanly."""
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fetcher = Fetcher(options, free_space=free_space, stop=stop)
    try:
        fetcher.run()
        return EXIT_OK
    except FetchError as exc:
        log.error("%s: %s", exc.reason, exc)
        write_termination_log(termination_log, exc.reason, str(exc))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the init container must always leave a reason behind
        log.exception("unexpected error")
        write_termination_log(termination_log, "Error", f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
    finally:
        fetcher.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
