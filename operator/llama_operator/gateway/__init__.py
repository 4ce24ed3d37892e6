"""`llama-operator gateway`: one OpenAI-compatible endpoint for every LlamaServer (docs/gateway.md).

Modules, one job each. The request path, a star around `proxy` (the aiohttp handlers): `upstream` (the client
to the replicas: pick, send, retry before the first byte, stream back), `body` (reading a body within bounds),
`scan` (its routing fields, without building the JSON tree: pure), `routing` (LlamaServers -> routes by model
name, alias, namespace/name), `endpoints` (EndpointSlices -> ready replicas), `balancer` (least in-flight,
prefix affinity with bounded load: pure), `hold` (requests waiting for a replica), `traffic` (the load it
counts), `answers` (OpenAI-format errors and model objects), `metrics`. Around it: `scaling` (the pure scaling
decision), `autoscaler` (the one writer of spec.replicas), `peers` (every replica's load, summed), `lease`
(the replicas' election and load reports through Leases), `listener` (connection cap and header deadline),
`cors`, `watch` (list+watch loops), `app` (the wiring and the RBAC).
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def _upstreams(values: list[str]) -> dict[str, list[str]]:
    static: dict[str, list[str]] = {}
    for value in values:
        name, sep, url = value.partition("=")
        if not sep or not name or not url:
            raise argparse.ArgumentTypeError(f"--upstream wants NAME=URL, got {value!r}")
        static.setdefault(name, []).append(url.rstrip("/"))
    return static


def config_from_args(args: argparse.Namespace) -> Any:
    """The GatewayConfig the command line asks for (raises ArgumentTypeError for a bad --upstream or limits)."""
    from .app import GatewayConfig
    from .models_admin import read_token

    return GatewayConfig(
        listen=args.listen, admin=args.admin, namespaces=tuple(filter(None, args.namespaces.split(","))),
        hold_timeout=args.hold_timeout, hold_queue=args.hold_queue, max_request_bytes=args.max_request_bytes,
        max_buffered_bytes=args.max_buffered_bytes, header_timeout=args.header_timeout,
        body_timeout=args.body_timeout, max_connections=args.max_connections, fast_lane=not args.no_fast_lane,
        cors_origins=tuple(args.cors_origin or ()), connect_timeout=args.connect_timeout,
        autoscale=not args.no_autoscale,
        autoscale_interval=args.autoscale_interval, retry_after=args.retry_after,
        static=_upstreams(args.upstream or []), drain_delay=args.drain_delay, drain_timeout=args.drain_timeout,
        lease_namespace=args.lease_namespace, lease_name=args.lease_name,
        identity=args.identity,
        admin_token=read_token(args.admin_token_file) if args.admin_token_file else None)


def _cmd_gateway(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from ..errors import CliError
    from .app import FIELD_MANAGER, LEASE_PERMISSIONS, required_permissions, serve

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise CliError(str(exc)) from None
    kube: Any = None
    if not config.static:
        from ..kube import Kube, load_api_client

        kube = Kube(load_api_client(), field_manager=FIELD_MANAGER,
                    permissions=required_permissions(autoscale=config.autoscale) + LEASE_PERMISSIONS)
    try:
        asyncio.run(serve(config, kube))
    except KeyboardInterrupt:
        pass
    return 0


def register(sub: Any) -> None:
    gateway = sub.add_parser(
        "gateway", help="one OpenAI-compatible endpoint for every LlamaServer: routing, balancing, scale to zero")
    gateway.add_argument("--listen", default="0.0.0.0:8080", help="address of the OpenAI API (default %(default)s)")
    gateway.add_argument("--admin", default="0.0.0.0:9090",
                         help="address of /metrics, /healthz, /readyz (default %(default)s)")
    gateway.add_argument("--namespaces", default=os.environ.get("LLAMA_GATEWAY_NAMESPACES", ""),
                         help="comma-separated namespaces to serve (default: all; env LLAMA_GATEWAY_NAMESPACES)")
    gateway.add_argument("--hold-timeout", type=float, default=120.0,
                         help="seconds a request waits for a replica of its model to become ready (default "
                         "%(default)s); then 503 with Retry-After")
    gateway.add_argument("--hold-queue", type=int, default=100,
                         help="requests that may wait per model (default %(default)s); more get 503 at once")
    gateway.add_argument("--max-request-bytes", type=int, default=32 << 20,
                         help="largest request body accepted (default %(default)s); larger ones get 413")
    gateway.add_argument("--max-buffered-bytes", type=int, default=256 << 20,
                         help="request bodies held in memory at once, all clients together (default %(default)s); "
                         "a request waits for room, at most --body-timeout, then 503")
    gateway.add_argument("--header-timeout", type=float, default=30.0,
                         help="seconds for a request's headers to arrive, from connecting or from the previous "
                         "answer on the connection (default %(default)s); then the connection is closed")
    gateway.add_argument("--body-timeout", type=float, default=60.0,
                         help="seconds for a request's body to arrive (default %(default)s); then 408 and close")
    gateway.add_argument("--max-connections", type=int, default=1024,
                         help="open client connections of the OpenAI API (default %(default)s); more get 503")
    gateway.add_argument("--no-fast-lane", action="store_true",
                         help="proxy every request through aiohttp, none at the socket (fastlane.py; for comparison)")
    gateway.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                         help="an origin (https://app.example.com, or *) browsers may call the API from "
                         "(repeatable; default none: no CORS headers)")
    gateway.add_argument("--connect-timeout", type=float, default=5.0,
                         help="seconds to connect to a replica before trying another (default %(default)s)")
    gateway.add_argument("--retry-after", type=int, default=5, help="Retry-After of 503 answers (default %(default)s)")
    gateway.add_argument("--autoscale-interval", type=float, default=1.0,
                         help="seconds between autoscaler decisions (default %(default)s)")
    gateway.add_argument("--no-autoscale", action="store_true",
                         help="never write spec.replicas or status.autoscaling (route and hold only)")
    gateway.add_argument("--drain-delay", type=float, default=5.0,
                         help="seconds GET /drain on the admin port (the pod's preStop hook) waits, serving, while "
                         "the pod's endpoint leaves the Service (default %(default)s)")
    gateway.add_argument("--drain-timeout", type=float, default=60.0,
                         help="on SIGTERM, seconds streams in flight may take to finish after the listener closed; "
                         "then they are cut (default %(default)s)")
    gateway.add_argument("--lease-namespace", default=os.environ.get("LLAMA_GATEWAY_LEASE_NAMESPACE", ""),
                         help="namespace of the Leases through which several gateway replicas sum their load and "
                         "elect the one that scales (default: none, a lone gateway; env "
                         "LLAMA_GATEWAY_LEASE_NAMESPACE)")
    gateway.add_argument("--lease-name", default="llama-gateway",
                         help="name of the election Lease, prefix of the per-replica ones (default %(default)s)")
    gateway.add_argument("--identity", default=os.environ.get("POD_NAME", ""),
                         help="this replica's name among its peers (default: env POD_NAME, else the host name)")
    gateway.add_argument("--admin-token-file", metavar="PATH",
                         help="a file holding the bearer token of the admin API on the admin port (POST "
                         "/admin/models/<model>/load|unload for router-mode servers); default: no admin API")
    gateway.add_argument("--upstream", action="append", metavar="NAME=URL",
                         help="a fixed replica for model NAME instead of the cluster (repeatable; no Kubernetes)")
    gateway.add_argument("--verbose", action="store_true", help="debug logging")
    gateway.set_defaults(func=_cmd_gateway)
