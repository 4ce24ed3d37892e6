"""The `llama-operator` command line: run, crds, render (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class CliError(Exception):
    """A user-facing command-line error: printed as one line, exit status 2."""


def _cmd_crds(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .api.crd import CRD_FILES, all_crds, to_yaml

    if args.out_dir:
        for file_name, build in CRD_FILES.items():
            (Path(args.out_dir) / file_name).write_text(to_yaml(build()))
        return 0
    sys.stdout.write("---\n".join(to_yaml(crd) for crd in all_crds()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    crds = sub.add_parser("crds", help="print the CustomResourceDefinitions (YAML stream)")
    crds.add_argument("--out-dir", help="write one file per CRD into this directory instead")
    crds.set_defaults(func=_cmd_crds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"llama-operator {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
