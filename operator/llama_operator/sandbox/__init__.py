"""`llama-operator sandbox`: the whole product on one machine: a real cluster (optional extra `sandbox`).

The command line is registered here without importing the sandbox itself, so `llama-operator` works where
the extra (aiohttp, cryptography) is not installed. app.py runs it; real_nodes.py puts it on real nodes
(llama_operator.nodes); process_node.py is the process node: node.py (the Node), kubelet.py (a pod's lifecycle,
over pod.py, volumes.py, command.py, probes.py, containers.py and processes.py), logs.py, network.py and
images.py; proxy.py and storage.py serve both; helm.py installs the operator; docs/sandbox.md is the user's
walkthrough.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_SERVICE_PORT_BASE = 18080


def _command(args: argparse.Namespace) -> int:
    from .app import command

    return command(args)


def _nodes(value: str) -> str:
    if value == "process" or (value.isdigit() and 1 <= int(value) <= 4):
        return value
    raise argparse.ArgumentTypeError("expected 1 to 4 (real nodes) or `process`")


def register(sub: Any) -> None:
    """Add the `sandbox` subcommand to the CLI's subparsers."""
    default_state = os.path.join(os.environ.get("XDG_STATE_HOME") or "~/.local/state", "llama-operator", "sandbox")
    parser = sub.add_parser("sandbox", help="try it without a cluster: local Kubernetes, two real nodes, the operator")
    parser.add_argument("--state-dir", help=f"kubeconfig, logs, volumes and model caches (default {default_state})")
    parser.add_argument("--api-port", type=int, default=0, help="port of the API server (default: any free port)")
    parser.add_argument("--service-port-base", type=int, default=DEFAULT_SERVICE_PORT_BASE,
                        help="Services get local ports from this one up (default %(default)s; 0: any free port)")
    parser.add_argument("--image", action="append", metavar="IMAGE=EXECUTABLE",
                        help="run this image (or image repository) as this local executable (repeatable)")
    parser.add_argument("--operator", choices=["helm", "local"], default="helm",
                        help="helm: install charts/llama-operator, the operator runs as a pod (default); "
                             "local: run `llama-operator run` as a local process with the admin kubeconfig")
    parser.add_argument("--chart", help="the chart to install (default: charts/llama-operator of this checkout)")
    parser.add_argument("--helm", help="the helm binary (default: $HELM, PATH, or scripts/get-helm.sh's cache)")
    parser.add_argument("--control-plane-dir",
                        help="directory with etcd, kube-apiserver, ... (default: $LLAMA_OPERATOR_CONTROL_PLANE_DIR, "
                             "PATH, or the `make control-plane` build)")
    parser.add_argument("--nodes", default="2", type=_nodes,
                        help="how many real nodes (kubelet + containerd each, from `make node-kit`; default "
                             "%(default)s), or `process`: one node whose containers are local processes")
    parser.add_argument("--network-policies", action="store_true",
                        help="enforce NetworkPolicies (kube-router's firewall; real nodes, the first node's pods "
                             "only) and turn on every policy of the chart")
    parser.add_argument("--verbose", action="store_true", help="log every pod and container event")
    # The gateway hook (docs/gateway.md): the chart's gateway.enabled, installed with the operator.
    parser.add_argument("--gateway", action="store_true",
                        help="also install the OpenAI gateway (chart value gateway.enabled; helm mode)")
    parser.set_defaults(func=_command)
