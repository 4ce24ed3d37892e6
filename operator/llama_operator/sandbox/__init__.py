"""`llama-operator sandbox`: the whole product on one machine: a real cluster (optional extra `sandbox`).

The command line is registered here without importing the sandbox itself, so `llama-operator` works where
the extra (aiohttp, cryptography) is not installed. app.py runs it; real_nodes.py puts it on real nodes
(llama_operator.nodes: kubelet + containerd each); storage.py provisions volumes, proxy.py gives Services host
ports, helm.py installs the operator, processes.py runs it locally (`--operator local`), client.py talks to the
API server; docs/sandbox.md is the user's walkthrough.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_SERVICE_PORT_BASE = 18080


def _command(args: argparse.Namespace) -> int:
    from .app import command

    return command(args)


RETIRED = ("the process node was retired (its containers were local processes: no image, security context or "
           "limit); real nodes run pods as a cluster does: use --nodes 1 to 4 (default 2), see docs/sandbox.md")


def _nodes(value: str) -> int:
    if value == "process":
        raise argparse.ArgumentTypeError(RETIRED)
    if value.isdigit() and 1 <= int(value) <= 4:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: expected how many real nodes, 1 to 4")


def _retired_image(value: str) -> str:
    raise argparse.ArgumentTypeError("--image mapped images to local executables for the process node, which "
                                     "was retired: real nodes pull the images of `make images` from the sandbox's "
                                     "registry")


def register(sub: Any) -> None:
    """Add the `sandbox` subcommand to the CLI's subparsers."""
    default_state = os.path.join(os.environ.get("XDG_STATE_HOME") or "~/.local/state", "llama-operator", "sandbox")
    parser = sub.add_parser("sandbox", help="try it without a cluster: local Kubernetes, two real nodes, the operator")
    parser.add_argument("--state-dir", help=f"kubeconfig, logs, volumes and model caches (default {default_state})")
    parser.add_argument("--api-port", type=int, default=0, help="port of the API server (default: any free port)")
    parser.add_argument("--service-port-base", type=int, default=DEFAULT_SERVICE_PORT_BASE,
                        help="Services get local ports from this one up (default %(default)s; 0: any free port)")
    parser.add_argument("--image", type=_retired_image, help=argparse.SUPPRESS)  # the process node's; says so
    parser.add_argument("--operator", choices=["helm", "local"], default="helm",
                        help="helm: install charts/llama-operator, the operator runs as a pod (default); "
                             "local: run `llama-operator run` as a local process with the admin kubeconfig")
    parser.add_argument("--chart", help="the chart to install (default: charts/llama-operator of this checkout)")
    parser.add_argument("--helm", help="the helm binary (default: $HELM, PATH, or scripts/get-helm.sh's cache)")
    parser.add_argument("--control-plane-dir",
                        help="directory with etcd, kube-apiserver, ... (default: $LLAMA_OPERATOR_CONTROL_PLANE_DIR, "
                             "PATH, or the `make control-plane` build)")
    parser.add_argument("--nodes", default=2, type=_nodes, metavar="N",
                        help="how many real nodes, 1 to 4 (kubelet + containerd each, from `make node-kit`; "
                             "default %(default)s)")
    parser.add_argument("--network-policies", action="store_true",
                        help="enforce NetworkPolicies (kube-router's firewall; the first node's pods "
                             "only) and turn on every policy of the chart")
    parser.add_argument("--verbose", action="store_true",
                        help="log each component started and each volume provisioned or deleted")
    # The gateway hook (docs/gateway.md): the chart's gateway.enabled, installed with the operator.
    parser.add_argument("--gateway", action="store_true",
                        help="also install the OpenAI gateway (chart value gateway.enabled; helm mode)")
    parser.set_defaults(func=_command)
