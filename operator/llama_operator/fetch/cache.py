"""The on-disk layout of one model directory `<cache-dir>/<cache-key>/`, and the lock that guards it.

    model-00001-of-00002.gguf            complete, verified file (appears only by rename)
    model-00001-of-00002.gguf.verified   marker: JSON {file, size, sha256, source, verifiedAt}
    model-00002-of-00002.gguf.part       bytes being downloaded (resumed after any interruption)
    model-00002-of-00002.gguf.part.json  download state: identity, size, validator (ETag), per-piece progress
    .fetch.lock                          flock: one fetch per model directory at a time

A marker lets a later run skip download and re-hash (a cache hit reads two small files); the state is written
only after the bytes it describes, and a `.part` without a matching state is discarded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..clock import now_rfc3339
from ..errors import InterruptedFetch
from .plan import Piece, RemoteFile

log = logging.getLogger(__name__)
LOCK_FILE = ".fetch.lock"


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


class ModelDir:
    """One model's directory in the cache volume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def final(self, name: str) -> Path:
        return self.path / name

    def part(self, name: str) -> Path:
        return self.path / f"{name}.part"

    def marker(self, name: str) -> Path:
        return self.path / f"{name}.verified"

    def state_path(self, name: str) -> Path:
        return self.path / f"{name}.part.json"

    # -- verified files -------------------------------------------------------------------------------

    def verified_sha(self, name: str) -> str | None:
        """The sha256 the marker vouches for, when the final file exists with the marker's size (no hashing)."""
        try:
            record = json.loads(self.marker(name).read_text())
            size = self.final(name).stat().st_size
        except (OSError, ValueError):
            return None
        sha = record.get("sha256")
        return sha if record.get("size") == size and isinstance(sha, str) else None

    def cached(self, name: str, expected_sha: str | None) -> bool:
        sha = self.verified_sha(name)
        return sha is not None and (expected_sha is None or sha == expected_sha)

    def mark_verified(self, remote: RemoteFile, size: int, digest: str) -> None:
        write_json_atomic(self.marker(remote.name), {
            "file": remote.name,
            "size": size,
            "sha256": digest,
            "source": remote.identity,
            "verifiedAt": now_rfc3339(),
        })

    # -- partial downloads ----------------------------------------------------------------------------

    def load_state(self, remote: RemoteFile) -> list[Piece] | None:
        """Pieces of an interrupted download of this same file, or None (then any .part is discarded)."""
        try:
            state = json.loads(self.state_path(remote.name).read_text())
            part_exists = self.part(remote.name).exists()
        except (OSError, ValueError):
            return None
        if not part_exists or state.get("identity") != remote.identity or state.get("size") != remote.size:
            return None
        if remote.etag and state.get("etag") and state["etag"] != remote.etag:
            return None  # the file changed upstream since: its old bytes are worthless
        try:
            return [Piece(int(p[0]), None if p[1] is None else int(p[1]), int(p[2])) for p in state["pieces"]]
        except (KeyError, TypeError, ValueError, IndexError):
            return None

    def save_state(self, remote: RemoteFile, pieces: list[Piece]) -> None:
        write_json_atomic(self.state_path(remote.name), {
            "identity": remote.identity,
            "size": remote.size,
            "etag": remote.etag,
            "pieces": [[p.start, p.end, p.done] for p in pieces],
        })

    def done_bytes(self, remote: RemoteFile) -> int:
        state = self.load_state(remote)
        return sum(p.done for p in state) if state else 0

    def discard(self, remote: RemoteFile) -> None:
        for path in (self.part(remote.name), self.state_path(remote.name)):
            path.unlink(missing_ok=True)

    # -- locking --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, *, stop: threading.Event, clock: Callable[[], float], note_every: float,
             what: str) -> Iterator[None]:
        """flock on the model directory: works across processes and, on Linux NFS, across nodes."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            waited_since: float | None = None
            last_note = 0.0
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = clock()
                    if waited_since is None:
                        waited_since = now
                    if now - last_note >= note_every:
                        log.info("Waiting for another fetch of %s (lock %s held)", what, self.path / LOCK_FILE)
                        last_note = now
                    if stop.wait(0.1):
                        raise InterruptedFetch("stopped while waiting for the cache lock") from None
            if waited_since is not None:
                log.info("Lock acquired after %.1fs", clock() - waited_since)
            yield
        finally:
            os.close(fd)  # closing releases the flock
