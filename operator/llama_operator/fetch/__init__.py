"""`llama-operator fetch`: the init container that puts a model's files into the cache volume.

Guarantees (docs/model-sources.md lists them for users):
- a final file exists only if its size matched, its first bytes were the GGUF magic and its sha256 matched
  (when one is known: the spec's, Hugging Face's X-Linked-Etag, or the one recorded on first use); it is
  fsynced before the rename;
- a marker lets a later run skip download and re-hash: a cache hit reads two small files;
- `.part` + `.part.json` let a killed pod continue where it stopped (Range requests);
- two fetches sharing a cache (RWX PVC, hostPath) serialise on `.fetch.lock`; the second then hits the cache;
- transient errors are retried with capped exponential backoff and jitter; permanent ones exit fast with the
  exit codes of `contract` and a one-line reason in the termination log (`Reason: message`).

The package, one job per module:
- `http`     the HTTP protocol of model sources and the redirect policy (shared with `sources` and `gguf`),
             and the fetcher's `http.client` transport;
- `plan`     options, the files of a model, the segment plan (pure);
- `cache`    the on-disk layout of a model directory, markers, resume state, the lock;
- `transfer` workers over pieces, the hasher, progress;
- `retry`    the one retry loop;
- `fetcher`  probe, space check, download, verification;
- `cli`      the subcommand, secrets from the environment, exit codes, termination message.

Secrets: the Hugging Face token comes from `HF_TOKEN`, extra headers from `LLAMA_FETCH_HEADER_<Name>` env
vars (populated from Secrets); they are sent only to the origin of the URL they belong to (dropped on a
redirect to a CDN) and never logged. URLs are logged without their query string.
"""

from __future__ import annotations

from ..contract import (
    EXIT_CHECKSUM,
    EXIT_DISK_FULL,
    EXIT_ERROR,
    EXIT_FORBIDDEN,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_NOT_GGUF,
    EXIT_OK,
    EXIT_UNAUTHORIZED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from ..errors import InterruptedFetch
from .cli import headers_from_env, register, run, write_termination_log
from .fetcher import Fetcher
from .plan import FetchOptions
from .retry import _backoff

__all__ = [
    "EXIT_CHECKSUM",
    "EXIT_DISK_FULL",
    "EXIT_ERROR",
    "EXIT_FORBIDDEN",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NOT_GGUF",
    "EXIT_OK",
    "EXIT_UNAUTHORIZED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "FetchOptions",
    "Fetcher",
    "InterruptedFetch",
    "_backoff",
    "headers_from_env",
    "register",
    "run",
    "write_termination_log",
]
