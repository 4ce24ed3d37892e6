"""The `llama-operator fetch` command line: what the builders write into an init container's `args` and what the
fetcher parses back, in one place (`FetchCommand.to_args` next to `add_arguments`), so the two cannot drift.

Secrets are not part of it: they reach the fetcher as environment variables from Secret references.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .. import contract
from .plan import DEFAULT_CONNECTIONS, DEFAULT_MAX_UNKNOWN_SIZE

SUBCOMMAND = "fetch"


@dataclass(frozen=True)
class FetchCommand:
    """The arguments the operator passes; the fetcher's tuning flags keep their defaults in a pod."""

    cache_dir: str
    cache_key: str
    hf_repo: str | None = None
    hf_file: str | None = None
    hf_revision: str = "main"
    hf_endpoint: str | None = None
    url: str | None = None
    sha256: str | None = None
    trust_on_first_use: bool = False
    max_size: int | None = None
    make_dirs: tuple[str, ...] = ()
    """Directories below the cache root the fetcher creates for the pod, in order (a server's kept prompt caches;
    in router mode also one per model below it)."""

    @property
    def make_dir(self) -> str | None:
        """The first of make_dirs (the server's own directory), or None."""
        return self.make_dirs[0] if self.make_dirs else None

    def to_args(self) -> list[str]:
        """`fetch --cache-dir ... --cache-key ...` then the source, the checksum, trust and the size cap."""
        args = [SUBCOMMAND, "--cache-dir", self.cache_dir, "--cache-key", self.cache_key]
        if self.hf_repo is not None:
            args += ["--hf-repo", self.hf_repo, "--hf-file", self.hf_file or "", "--hf-revision", self.hf_revision]
            if self.hf_endpoint is not None:
                args += ["--hf-endpoint", self.hf_endpoint]
        elif self.url is not None:
            args += ["--url", self.url]
        if self.sha256:
            args += ["--sha256", self.sha256]
        if self.trust_on_first_use:
            args.append("--trust-on-first-use")
        if self.max_size is not None:
            args += ["--max-size", str(self.max_size)]
        for directory in self.make_dirs:
            args += ["--make-dir", directory]
        return args


def add_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The fetcher's parser: every flag `FetchCommand.to_args` writes, plus its tuning flags (`required=False`:
    reading back a pod's args, where only the flags present matter)."""
    parser.add_argument("--cache-dir", required=required, help="root of the cache volume")
    parser.add_argument("--cache-key", required=required, help="directory of this model inside the cache")
    parser.add_argument("--hf-repo", help="Hugging Face repository, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF")
    parser.add_argument("--hf-file", help="file in the repository (first shard of a split model)")
    parser.add_argument("--hf-revision", default="main", help="branch, tag or commit (default main)")
    parser.add_argument("--hf-endpoint", default=os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                        help="hub base URL (default $HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--url", help="plain http(s) URL of the file (first shard of a split model)")
    parser.add_argument("--sha256", help="expected sha256 of the (first) file, lowercase hex")
    parser.add_argument("--trust-on-first-use", action="store_true",
                        help=f"the source publishes no sha256: verify every file against ${contract.TRUSTED_ENV} "
                        "(recorded from the first verified download, for this cache key) when it is set, and "
                        "report the sha256 of every verified file in the termination message on success")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                        help=f"parallel connections for large files (default {DEFAULT_CONNECTIONS})")
    parser.add_argument("--progress-interval", type=float, default=contract.PROGRESS_INTERVAL_SECONDS,
                        help="seconds between progress lines")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_UNKNOWN_SIZE, metavar="BYTES",
                        help="stop a download whose server declares no size once it passes BYTES (default "
                        f"{DEFAULT_MAX_UNKNOWN_SIZE >> 30} GiB; the operator passes the LlamaModel's cache.size)")
    parser.add_argument("--make-dir", metavar="RELATIVE", action="append",
                        help="also create this directory below --cache-dir (mode 0700) for the pod's other "
                        "containers, e.g. slots/<server> for the kept prompt caches (repeatable, created in order)")
    parser.add_argument("--retries", type=int, default=10,
                        help="consecutive failed attempts without progress before giving up (default 10)")
    parser.add_argument("--termination-log",
                        default=os.environ.get(contract.TERMINATION_LOG_ENV, contract.TERMINATION_LOG),
                        help=f"where the outcome is written (default ${contract.TERMINATION_LOG_ENV} or "
                        f"{contract.TERMINATION_LOG})")


class _Refused(Exception):
    pass


class _QuietParser(argparse.ArgumentParser):
    """Parses a pod's args without printing or exiting on what it does not know."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _Refused(message)


def parse(args: Sequence[str]) -> FetchCommand | None:
    """The FetchCommand of an init container's `args` (None: not a fetch command line this operator wrote)."""
    if not args or args[0] != SUBCOMMAND:
        return None
    parser = _QuietParser(add_help=False)
    add_arguments(parser, required=False)
    try:
        known, _ = parser.parse_known_args(list(args[1:]))
    except _Refused:
        return None
    if known.cache_key is None:
        return None
    return FetchCommand(cache_dir=known.cache_dir or "", cache_key=known.cache_key, hf_repo=known.hf_repo,
                        hf_file=known.hf_file, hf_revision=known.hf_revision, hf_endpoint=known.hf_endpoint,
                        url=known.url, sha256=known.sha256, trust_on_first_use=known.trust_on_first_use,
                        max_size=known.max_size, make_dirs=tuple(known.make_dir or ()))
