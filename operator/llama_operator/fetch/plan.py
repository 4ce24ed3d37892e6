"""What to fetch and in which pieces (pure): the options, the files of a model, and the segment plan.

No I/O here: `remote_files` expands a model into its files (every shard of a split GGUF, with the credentials
that belong to each), `segment_plan` cuts one file into the byte ranges the workers fetch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..contract import PROGRESS_INTERVAL_SECONDS, SPLIT_GGUF_RE
from ..errors import InvalidArguments
from .http import check_path, check_url, hf_resolve_url, redact_url
from .secrets import auth_headers

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_CONNECTIONS = 8
DEFAULT_MAX_UNKNOWN_SIZE = 64 * GiB
"""The cap on a file whose server declares no size, when the LlamaModel sets no cache.size (docs/model-sources.md)."""


def shard_names(file_name: str) -> list[str]:
    """All files of a model given its (first) file: `a-00001-of-00003.gguf` -> the three shards.

    Works on a path too (`dir/a-00001-of-00003.gguf`): the directory is kept.
    """
    head, sep, base = file_name.rpartition("/")
    match = SPLIT_GGUF_RE.match(base)
    if match is None:
        return [file_name]
    count = int(match.group("count"))
    width = len(match.group("count"))
    stem = match.group("stem")
    return [f"{head}{sep}{stem}-{i:0{width}d}-of-{count:0{width}d}.gguf" for i in range(1, count + 1)]


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
    trusted: Mapping[str, str] = field(default_factory=dict)
    """{file: sha256} recorded on the first verified download of this source (trust on first use); every file
    named here must match. `sha256` (the spec's or the hub's) wins for the first file."""
    connections: int = DEFAULT_CONNECTIONS
    hf_token: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    progress_interval: float = PROGRESS_INTERVAL_SECONDS
    retries: int = 10
    """Consecutive failed attempts of one request (without progress in between) before giving up."""
    max_unknown_size: int = DEFAULT_MAX_UNKNOWN_SIZE
    """Bytes a file without a declared size may reach before the download stops (`SourceTooLarge`)."""
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    parallel_threshold: int = 64 * MiB
    """Files smaller than this are fetched over one connection."""
    min_piece: int = 8 * MiB
    max_piece: int = 512 * MiB
    fsync_every: int = 512 * MiB
    connect_timeout: float = 15.0
    read_timeout: float = 60.0


@dataclass
class RemoteFile:
    """One file of the model; the probe fills in what the source says about it."""

    name: str
    url: str
    identity: str
    """The source of this file without secrets (hf:repo@revision/path, or the URL without its query)."""
    headers: dict[str, str] = field(repr=False)
    expected_sha: str | None = None
    """What the bytes must hash to, before the probe: the spec's sha256 or the recorded (trusted) one."""
    trusted: bool = False
    """`expected_sha` comes from trust on first use, not from the spec."""
    size: int | None = None
    sha256: str | None = None
    etag: str | None = None
    ranges: bool = False


def remote_files(options: FetchOptions) -> list[RemoteFile]:
    """Every file of the model, from the (first) file name: split GGUFs expand to all shards."""
    if options.hf_repo and options.hf_file:
        check_path(options.hf_revision, "--hf-revision")
        check_path(options.hf_file, "--hf-file")
        auth = auth_headers(options.hf_token, options.headers)
        files = [
            RemoteFile(
                name=path.rsplit("/", 1)[-1],
                url=hf_resolve_url(options.hf_endpoint, options.hf_repo, options.hf_revision, path),
                identity=f"hf:{options.hf_repo}@{options.hf_revision}/{path}",
                headers=auth,
            )
            for path in shard_names(options.hf_file)
        ]
    elif options.url:
        check_url(options.url, "--url")
        base, sep, query = options.url.partition("?")
        files = [
            RemoteFile(
                name=url.rsplit("/", 1)[-1],
                url=f"{url}{sep}{query}",
                identity=redact_url(url),
                headers=dict(options.headers),
            )
            for url in shard_names(base)
        ]
    else:
        raise InvalidArguments("either --hf-repo and --hf-file, or --url, is required")
    for index, remote in enumerate(files):
        if index == 0 and options.sha256:
            remote.expected_sha = options.sha256
        elif remote.name in options.trusted:
            remote.expected_sha, remote.trusted = options.trusted[remote.name], True
    return files


@dataclass
class Piece:
    start: int
    end: int | None  # exclusive; None: unknown size, until the end of the stream
    done: int = 0

    @property
    def complete(self) -> bool:
        return self.end is not None and self.start + self.done >= self.end


def segment_plan(size: int | None, *, ranges: bool, connections: int, parallel_threshold: int, min_piece: int,
                 max_piece: int) -> list[Piece]:
    """The pieces of a fresh download: one stream unless the file is big and the server does ranges.

    About four pieces per connection, each a whole number of MiB within [min_piece, max_piece]: a slow
    connection then delays the end by at most one small piece.
    """
    if size is None:
        return [Piece(0, None)]
    if not ranges or connections <= 1 or size < parallel_threshold:
        return [Piece(0, size)]
    piece = math.ceil(size / (connections * 4) / MiB) * MiB
    piece = max(min_piece, min(max_piece, piece))
    return [Piece(start, min(start + piece, size)) for start in range(0, size, piece)]
