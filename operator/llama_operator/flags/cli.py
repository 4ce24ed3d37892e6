"""The `llama-operator validate-args -- <flags...>` subcommand: checks extra llama-server flags offline."""

from __future__ import annotations

import argparse
import sys

from ..llamacpp.catalog import load_catalog
from .validate import validate_args


def _run(args: argparse.Namespace) -> int:
    flags = list(args.flags)
    if flags and flags[0] == "--":
        flags = flags[1:]
    errors = validate_args(flags, path="args")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) in {len(flags)} argument(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(flags)} argument(s) valid for llama.cpp {load_catalog().build}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `validate-args` to the llama-operator command line."""
    parser = sub.add_parser(
        "validate-args",
        help="check extra llama-server flags (the spec.args policy) and list every problem",
        description="Exit 0 if the flags are valid LlamaServer spec.args, 1 with every error otherwise. "
        "Put the flags after `--`, e.g. llama-operator validate-args -- --top-k 20.",
    )
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="llama-server flags, after --")
    parser.set_defaults(func=_run)
