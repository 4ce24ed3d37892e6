"""`llama-operator fetch` on the command line: arguments, secrets from the environment, exit codes, and the
termination message the operator reads back (docs/model-sources.md lists all of it)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from .. import contract
from ..errors import OperatorError
from .cache import disk_free
from .command import add_arguments
from .fetcher import Fetcher
from .plan import FetchOptions
from .secrets import check_header_name, clean, scrub, scrub_logging

log = logging.getLogger(__name__)


def headers_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`LLAMA_FETCH_HEADER_<Name>` variables as HTTP headers; `_` in the name becomes `-` (X_Api_Key).

    Values are cleaned like the operator cleans them (`secrets.clean`): one trailing newline goes, a value
    with another line break or control character raises `InvalidSecret` naming the variable, not the value.
    """
    prefix = contract.HEADER_ENV_PREFIX
    headers = {}
    for key, value in environ.items():
        if key.startswith(prefix) and len(key) > len(prefix):
            name = key[len(prefix):].replace("_", "-")
            where = f"{key} (key {key[len(prefix):]!r} of the headersSecretRef Secret)"
            check_header_name(name, where=where)
            headers[name] = clean(value, where=where)
    return headers


def token_from_env(environ: Mapping[str, str]) -> str | None:
    """The Hugging Face token, cleaned (see `headers_from_env`)."""
    value = environ.get(contract.TOKEN_ENV)
    return clean(value, where=f"{contract.TOKEN_ENV} (the tokenSecretRef key)") or None if value else None


def write_termination_log(path: str, text: str) -> None:
    """What the kubelet puts into the container status (best effort, at most `TERMINATION_LIMIT` bytes)."""
    data = text.encode()[: contract.TERMINATION_LIMIT]
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
    add_arguments(parser)
    parser.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if not ((args.hf_repo and args.hf_file) or args.url) or (args.url and (args.hf_repo or args.hf_file)):
        message = "give either --hf-repo and --hf-file, or --url"
        write_termination_log(args.termination_log, f"InvalidArguments: {message}")
        print(f"llama-operator fetch: {message}", file=sys.stderr)
        return contract.EXIT_USAGE
    for relative in args.make_dir or ():
        problem = make_dir(Path(args.cache_dir), relative)
        if problem:
            write_termination_log(args.termination_log, f"InvalidArguments: {problem}")
            print(f"llama-operator fetch: {problem}", file=sys.stderr)
            return contract.EXIT_USAGE
    if args.sha256 is not None:
        args.sha256 = args.sha256.lower()
    trusted = (contract.parse_trusted_sums(os.environ.get(contract.TRUSTED_ENV), args.cache_key)
               if args.trust_on_first_use else {})
    secrets = [value for key, value in os.environ.items()
               if key == contract.TOKEN_ENV or key.startswith(contract.HEADER_ENV_PREFIX)]
    scrub_logging(secrets)  # raw values: a line break left in one is still found in a message
    try:
        hf_token, headers = token_from_env(os.environ), headers_from_env(os.environ)
    except OperatorError as exc:
        log.error("%s: %s", exc.reason, exc)
        write_termination_log(args.termination_log, scrub(f"{exc.reason}: {exc}", secrets))
        return exc.exit_code
    options = FetchOptions(
        cache_dir=Path(args.cache_dir),
        cache_key=args.cache_key,
        hf_repo=args.hf_repo,
        hf_file=args.hf_file,
        hf_revision=args.hf_revision,
        hf_endpoint=args.hf_endpoint.rstrip("/"),
        url=args.url,
        sha256=args.sha256,
        trusted=trusted,
        connections=max(1, args.connections),
        hf_token=hf_token,
        headers=headers,
        progress_interval=args.progress_interval,
        retries=args.retries,
        max_unknown_size=max(1, args.max_size),
    )
    return run(options, termination_log=args.termination_log, report=args.trust_on_first_use)


def make_dir(root: Path, relative: str) -> str | None:
    """Create `root/relative` (mode 0700: only the pod's user) before the download; the problem, or None. Only a
    plain relative path below the cache root: the operator writes it, but a pod's args are not trusted."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or any(part in ("..", ".") for part in parts):
        return f"--make-dir must be a relative path below --cache-dir without '..' (got {relative[:100]!r})"
    try:
        (root / relative).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {relative[:100]} in the cache: {exc.strerror}"
    return None


def run(options: FetchOptions, *, termination_log: str, free_space: Callable[[Path], int] = disk_free,
        report: bool = False) -> int:
    """Fetch, turning the outcome into an exit code and a termination message. SIGTERM stops cleanly.

    Failure: `Reason: message`, scrubbed of the token and header values. Success with `report`:
    `contract.verified_message` (every file's sha256, for the operator to record on first use); without it
    nothing is written.
    """
    secrets = [options.hf_token or "", *options.headers.values()]
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fetcher = Fetcher(options, free_space=free_space, stop=stop)
    try:
        fetcher.run()
        if report:
            write_termination_log(termination_log, contract.verified_message(options.cache_key, fetcher.sums))
        return contract.EXIT_OK
    except OperatorError as exc:
        log.error("%s", scrub(f"{exc.reason}: {exc}", secrets))
        write_termination_log(termination_log, scrub(f"{exc.reason}: {exc}", secrets))
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the init container must always leave a reason behind
        log.error("unexpected error: %s", scrub(f"{type(exc).__name__}: {exc}", secrets))
        log.debug("unexpected error", exc_info=True)
        write_termination_log(termination_log, scrub(f"Error: {type(exc).__name__}: {exc}", secrets))
        return contract.EXIT_ERROR
    finally:
        fetcher.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
