"""Moving the bytes of one file: worker threads over pieces, a hasher following them, progress and state.

Concurrency model: plain threads, not asyncio. The work is a few blocking streams (socket reads, positional
file writes, sha256), all of which release the GIL in C, and the process has nothing else to serve, so
threads give parallel segments without wrapping every file write in an executor. Each connection is one
worker thread taking the next unfinished *piece* (a byte range) of the file, in order; a hasher thread
follows the contiguous downloaded prefix, reading it back from the page cache, so hashing overlaps the
download instead of following it; it also issues fdatasync as it goes so the final fsync is short.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import math
import os
import threading
from collections.abc import Callable

from ..contract import GGUF_MAGIC, human, progress_line
from ..errors import DiskFull, InterruptedFetch, NotAGguf, SourceError, SourceTooLarge, SourceUnreachable
from .cache import ModelDir
from .http import Http
from .plan import FetchOptions, MiB, Piece, RemoteFile
from .retry import retrying

log = logging.getLogger(__name__)
BUFFER_SIZE = 256 * 1024  # readinto fills it completely: small enough for prompt progress and SIGTERM


class _Stopped(Exception):  # noqa: N818 - control flow inside a worker, never escapes this module
    """SIGTERM, or another worker failed: this worker stops where it is."""


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Transfer:
    """Downloads the pieces of one file into an open `.part` file descriptor; returns (sha256, size)."""

    def __init__(self, http: Http, model_dir: ModelDir, options: FetchOptions, *, stop: threading.Event,
                 clock: Callable[[], float]) -> None:
        self.http = http
        self.dir = model_dir
        self.options = options
        self.stop = stop
        self.clock = clock
        self._buffers = threading.local()  # one receive buffer per worker thread

    def run(self, remote: RemoteFile, fd: int, pieces: list[Piece], connections: int, resumed: int
            ) -> tuple[str, int]:
        """Run the workers, the hasher and the progress/state loop."""
        queue = iter([p for p in pieces if not p.complete])
        queue_lock = threading.Lock()
        failure: list[BaseException] = []
        abort = threading.Event()

        def next_piece() -> Piece | None:
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

        hasher = Hasher(fd, pieces, self.options.fsync_every)
        threads = [threading.Thread(target=worker, name=f"fetch-{i}", daemon=True) for i in range(connections)]
        hasher.start()
        for thread in threads:
            thread.start()

        total = remote.size
        started = last_log = last_state = self.clock()
        last_bytes = resumed
        try:
            while any(t.is_alive() for t in threads):
                abort.wait(min(0.25, self.options.progress_interval))
                if self.stop.is_set():
                    abort.set()
                now = self.clock()
                done = sum(p.done for p in pieces)
                if now - last_state >= 0.5:
                    self.dir.save_state(remote, pieces)
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
            self.dir.save_state(remote, pieces)
        if failure:
            hasher.cancel()
            raise failure[0]
        if self.stop.is_set():
            hasher.cancel()
            raise InterruptedFetch(f"{remote.name}: stopped at {human(sum(p.done for p in pieces))}; it resumes")
        size = sum(p.done for p in pieces)
        if total is not None and size != total:
            hasher.cancel()
            raise SourceUnreachable(f"{remote.name}: got {size} bytes, expected {total}")
        hasher.finish(size)
        elapsed = max(self.clock() - started, 1e-9)
        log.info("Downloaded %s: %s in %s (%.1f MB/s)", remote.name, human(size - resumed), duration(elapsed),
                 (size - resumed) / elapsed / 1e6)
        return hasher.hexdigest(), size

    @staticmethod
    def _progress(name: str, done: int, total: int | None, rate: float, connections: int) -> None:
        if total:
            eta = (total - done) / rate if rate > 0 else math.inf
            log.info("%s", progress_line(name, done, total, rate, eta=duration(eta) if eta != math.inf else "unknown",
                                         connections=connections))
        else:
            log.info("Progress %s: %s, %.1f MB/s", name, human(done), rate / 1e6)

    def _fetch_piece(self, remote: RemoteFile, fd: int, piece: Piece, abort: threading.Event) -> None:
        def stopped() -> bool:
            return abort.is_set() or self.stop.is_set()

        def attempt() -> None:
            if stopped():
                raise _Stopped
            start = piece.start + piece.done
            extra: dict[str, str] = {}
            if remote.ranges:
                extra["Range"] = f"bytes={start}-" + ("" if piece.end is None else str(piece.end - 1))
            # Without range support a retry re-reads the stream from the start and skips what is on disk.
            with self.http.open("GET", remote.url, secret=remote.headers, name=remote.name, extra=extra) as response:
                skip = 0
                if response.status == 200 and start > 0:
                    skip = start  # a server that ignored Range: drop what we already have
                elif response.status == 206:
                    first = response.headers.get("content-range", "").removeprefix("bytes ").split("-", 1)[0]
                    if first != str(start):
                        raise SourceUnreachable(f"server answered range {first!r}, asked for {start}")
                elif response.status != 200:
                    raise SourceError(f"{remote.name}: unexpected HTTP {response.status}")
                self._stream(response.raw, fd, piece, skip, stopped, remote.name)
            if stopped():
                raise _Stopped
            if piece.end is not None and not piece.complete:  # unknown size: a clean end is the end of the file
                raise SourceUnreachable("response ended early")

        def wait(delay: float) -> None:
            if abort.wait(delay) or self.stop.is_set():
                raise _Stopped

        what = f"{remote.name} bytes {piece.start}-{'' if piece.end is None else piece.end - 1}"
        try:
            retrying(attempt, what, self.options, progress=lambda: piece.done, wait=wait)
        except _Stopped:
            return

    def _stream(self, response: http.client.HTTPResponse, fd: int, piece: Piece, skip: int,
                stopped: Callable[[], bool], name: str) -> None:
        offset = piece.start + piece.done
        limit = None if piece.end is None else piece.end - offset
        cap = self.options.max_unknown_size  # only a piece of unknown end can grow: a declared size bounds the rest
        buf = getattr(self._buffers, "buf", None)
        if buf is None:
            buf = self._buffers.buf = memoryview(bytearray(BUFFER_SIZE))
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
                if piece.end is None and offset + len(chunk) > cap:
                    raise SourceTooLarge(
                        f"{name}: the server declares no size and sent more than {human(cap)}, the cap for such "
                        "downloads (set the LlamaModel's cache.size to the space the model may take)")
                if offset == 0 and bytes(chunk[:4]) != GGUF_MAGIC[: len(chunk[:4])]:
                    raise NotAGguf(f"not a GGUF file: the server sent {bytes(chunk[:16])!r}...")
                written = 0
                while written < len(chunk):
                    try:
                        written += os.pwrite(fd, chunk[written:], offset + written)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise DiskFull(f"disk full while writing: {exc.strerror}") from exc
                        raise
                offset += written
                piece.done += written  # only after the bytes are in the file: the state never runs ahead
                if limit is not None:
                    limit -= written
                if stopped():  # SIGTERM: stop at a chunk boundary
                    return
        except (OSError, http.client.HTTPException) as exc:
            raise SourceUnreachable(f"{type(exc).__name__}: {exc or 'connection dropped'}") from exc


class Hasher(threading.Thread):
    """sha256 of the contiguous downloaded prefix, computed while the rest downloads.

    It reads back what the workers wrote, from the page cache, rather than hashing in the workers: on a fast link
    the worker's page-cache writes and the sha256 then run on two cores instead of one after the other (measured:
    hashing inline made one stream about 2x slower than curl on loopback), and a resumed download hashes its
    old bytes the same way as new ones. Every `fsync_every` bytes it calls fdatasync so that dirty pages are
    written while the download continues and the final fsync is short.
    """

    def __init__(self, fd: int, pieces: list[Piece], fsync_every: int) -> None:
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
