"""`llama-operator sandbox`: the whole product on one machine, with no cluster (optional extra `sandbox`).

The command line is registered here without importing the sandbox itself, so `llama-operator` works where
the extra (kmock, aiohttp) is not installed. app.py runs it; node.py, kubelet.py, proxy.py and images.py are
the local node; docs/sandbox.md is the user's walkthrough.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_SERVICE_PORT_BASE = 18080


def _command(args: argparse.Namespace) -> int:
    from .app import command

    return command(args)


def register(sub: Any) -> None:
    """Add the `sandbox` subcommand to the CLI's subparsers."""
    default_state = os.path.join(os.environ.get("XDG_STATE_HOME") or "~/.local/state", "llama-operator", "sandbox")
    parser = sub.add_parser("sandbox", help="try it without a cluster: API emulator + operator + local node")
    parser.add_argument("--state-dir", help=f"kubeconfig, logs, volumes and model caches (default {default_state})")
    parser.add_argument("--api-port", type=int, default=0, help="port of the API server (default: any free port)")
    parser.add_argument("--service-port-base", type=int, default=DEFAULT_SERVICE_PORT_BASE,
                        help="Services get local ports from this one up (default %(default)s; 0: any free port)")
    parser.add_argument("--image", action="append", metavar="IMAGE=EXECUTABLE",
                        help="run this image (or image repository) as this local executable (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="log every pod and container event")
    parser.set_defaults(func=_command)
