"""The fetcher: probe every file of a model, then download what the cache lacks, verified, under the lock."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..contract import GGUF_MAGIC, human
from ..errors import ChecksumMismatch, DiskFull, InterruptedFetch, NotAGguf, SourceTooLarge
from .cache import ModelDir, disk_free, fsync_dir
from .http import Http, Response, parse_linked_headers, redact_url
from .plan import FetchOptions, Piece, RemoteFile, remote_files, segment_plan
from .retry import retrying
from .transfer import Transfer, duration

log = logging.getLogger(__name__)

_TOFU_HINT = ("recorded from the first verified download of this source (status.trustOnFirstUse of the LlamaModel; "
              "the source publishes no sha256): the file changed at the source. If that is expected, set "
              "spec.sha256 to the new value")


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
        free_space: Callable[[Path], int] = disk_free,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.dir = ModelDir(options.cache_dir / options.cache_key)
        self.free_space = free_space
        self.stop = stop or threading.Event()
        self.clock = clock
        self.http = Http(options.read_timeout, proxies, hub=options.hf_endpoint if options.hf_repo else None)
        self.transfer = Transfer(self.http, self.dir, options, stop=self.stop, clock=clock)
        self.sums: dict[str, str] = {}
        """{file: sha256} of every verified file, after `run`."""

    def close(self) -> None:
        self.http.close()

    def _all_cached(self, remotes: list[RemoteFile]) -> bool:
        return all(self.dir.cached(r.name, r.expected_sha) for r in remotes)

    def run(self) -> list[Path]:
        """Fetch every file of the model; returns their final paths. Raises an `OperatorError`."""
        started = self.clock()
        remotes = remote_files(self.options)
        self.dir.path.mkdir(parents=True, exist_ok=True)
        paths = [self.dir.final(r.name) for r in remotes]
        if self._all_cached(remotes):
            log.info("Cache hit: %s (%d file(s), %s) in %.3fs", self.dir.path, len(remotes),
                     human(sum(p.stat().st_size for p in paths)), self.clock() - started)
            return self._verified(remotes, paths)
        with self.dir.lock(stop=self.stop, clock=self.clock, note_every=self.options.progress_interval,
                           what=self.options.cache_key):
            missing = [r for r in remotes if not self.dir.cached(r.name, r.expected_sha)]
            if not missing:
                log.info("Cache hit after waiting: %s was fetched by another pod", self.dir.path)
                return self._verified(remotes, paths)
            for remote in missing:
                self._probe(remote)
            self._check_space(missing)
            for remote in missing:
                self._download(remote)  # the probe merged the expected and the published sha256
        log.info("Fetched %s: %d file(s) in %s", self.dir.path, len(remotes), duration(self.clock() - started))
        return self._verified(remotes, paths)

    def _verified(self, remotes: list[RemoteFile], paths: list[Path]) -> list[Path]:
        self.sums = {r.name: sha for r in remotes if (sha := self.dir.verified_sha(r.name)) is not None}
        return paths

    # -- probe ----------------------------------------------------------------------------------------

    def _probe(self, remote: RemoteFile) -> None:
        """Size, sha256 (hub LFS files), range support and validator of one file, with retries."""

        def first_hop(response: Response) -> None:
            linked = parse_linked_headers(response.url, response.status, response.headers)
            remote.sha256 = remote.sha256 or linked.sha256
            if linked.size is not None and response.headers.get("x-linked-size"):
                remote.size = linked.size

        def attempt() -> None:
            if self.stop.is_set():
                raise InterruptedFetch(f"{remote.name}: probe: stopped")
            with self.http.open("HEAD", remote.url, secret=remote.headers, name=remote.name,
                                first_hop=first_hop) as response:
                status, headers = response.status, response.headers
            if status in (405, 501):
                with self.http.open("GET", remote.url, secret=remote.headers, name=remote.name,
                                    extra={"Range": "bytes=0-0"}) as response:
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

        def wait(delay: float) -> None:
            if self.stop.wait(delay):
                raise InterruptedFetch(f"{remote.name}: probe: stopped")

        retrying(attempt, f"{remote.name}: probe", self.options, wait=wait)
        expected = remote.expected_sha
        if expected and remote.sha256 and expected != remote.sha256:
            source = _TOFU_HINT if remote.trusted else (
                "(the file changed upstream, or the sha256 names another file)")
            raise ChecksumMismatch(
                f"{remote.name}: expected sha256 {expected} but the source publishes {remote.sha256} {source}")
        if expected:
            remote.sha256 = expected
        log.info("Source %s: %s, sha256 %s, ranges %s", redact_url(remote.url),
                 human(remote.size) if remote.size is not None else "size unknown",
                 remote.sha256 or "unknown", "yes" if remote.ranges else "no")

    # -- disk -----------------------------------------------------------------------------------------

    def _check_space(self, remotes: list[RemoteFile]) -> None:
        needed = sum(r.size - self.dir.done_bytes(r) for r in remotes if r.size is not None)
        free = self.free_space(self.dir.path)
        if needed > free:
            raise DiskFull(
                f"not enough space in {self.dir.path}: the model needs {human(needed)} more, only {human(free)} "
                "free (raise the LlamaModel cache size)"
            )

    # -- download -------------------------------------------------------------------------------------

    def _resume_or_plan(self, remote: RemoteFile) -> tuple[list[Piece], int]:
        pieces = self.dir.load_state(remote)
        if pieces is not None and not remote.ranges and any(p.done for p in pieces[1:]):
            pieces = None  # the server no longer does ranges: only a fresh single stream is possible
        resumed = sum(p.done for p in pieces) if pieces else 0
        if pieces is None:
            with contextlib.suppress(FileNotFoundError):
                self.dir.part(remote.name).unlink()
            opts = self.options
            pieces = segment_plan(remote.size, ranges=remote.ranges, connections=opts.connections,
                                  parallel_threshold=opts.parallel_threshold, min_piece=opts.min_piece,
                                  max_piece=opts.max_piece)
        if not remote.ranges and len(pieces) == 1 and pieces[0].done:
            pieces[0].done = 0  # cannot continue without Range support
            resumed = 0
        return pieces, resumed

    def _download(self, remote: RemoteFile) -> None:
        expected = remote.sha256
        pieces, resumed = self._resume_or_plan(remote)
        self.dir.save_state(remote, pieces)  # the state exists before any byte it describes
        self.dir.final(remote.name).unlink(missing_ok=True)
        self.dir.marker(remote.name).unlink(missing_ok=True)

        connections = min(self.options.connections, sum(1 for p in pieces if not p.complete)) or 1
        log.info("Downloading %s (%s) into %s%s with %d connection(s)", remote.name,
                 human(remote.size) if remote.size is not None else "size unknown", self.dir.path,
                 f", resuming at {human(resumed)}" if resumed else "", connections)

        fd = os.open(self.dir.part(remote.name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                digest, size = self.transfer.run(remote, fd, pieces, connections, resumed)
            except (NotAGguf, SourceTooLarge):
                self.dir.discard(remote)
                raise
            head = os.pread(fd, 4, 0)
            if head != GGUF_MAGIC:
                self.dir.discard(remote)
                raise NotAGguf(f"{remote.name}: not a GGUF file (starts with {head!r}); the download was deleted")
            if expected and digest != expected:
                self.dir.discard(remote)
                why = f"expected {expected}, downloaded bytes have {digest}"
                raise ChecksumMismatch(
                    f"{remote.name}: sha256 mismatch: {why}; the download was deleted"
                    + (f"; the expected sha256 was {_TOFU_HINT}" if remote.trusted else "")
                )
            os.fsync(fd)  # the bytes are on disk before the name says "complete"
        finally:
            os.close(fd)
        os.replace(self.dir.part(remote.name), self.dir.final(remote.name))
        self.dir.mark_verified(remote, size, digest)
        self.dir.state_path(remote.name).unlink(missing_ok=True)
        fsync_dir(self.dir.path)
        log.info("Verified %s: %s, sha256 %s%s", remote.name, human(size), digest,
                 " (matches)" if expected else " (no expected sha256 given)")
