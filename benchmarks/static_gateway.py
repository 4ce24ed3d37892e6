"""`llama-operator gateway --upstream ...` with a balancing policy for its static routes (benchmarks only).

    python benchmarks/static_gateway.py --strategy PrefixAffinity --listen 127.0.0.1:8080 --admin 127.0.0.1:9090 \\
        --upstream gemma=http://127.0.0.1:8001 --upstream gemma=http://127.0.0.1:8002

The command's static upstreams become LlamaServer-like objects without spec.routing, so they always balance
LeastInFlight; in a cluster the policy comes from the LlamaServer's spec.routing. This starts the same Gateway
(every other option is the command's own, parsed by its own parser), then hands its routing table those
objects again with spec.routing set, exactly as the LlamaServer watch would deliver them: the request path and
the balancer are the product's code, unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys


async def run(strategy: str, gateway_argv: list[str]) -> None:
    from llama_operator.cli import build_parser
    from llama_operator.gateway import config_from_args
    from llama_operator.gateway.app import Gateway, static_bodies

    config = config_from_args(build_parser("gateway").parse_args(["gateway", *gateway_argv]))
    if not config.static:
        raise SystemExit("static_gateway.py needs --upstream NAME=URL")
    gateway = Gateway(config, None)
    await gateway.start()
    servers, _ = static_bodies(config.static)
    for server in servers:
        server["spec"]["routing"] = {"strategy": strategy}  # type: ignore[index]
    gateway.routes.replace(servers, None)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    try:
        await stopping.wait()
    finally:
        await gateway.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", required=True, choices=("LeastInFlight", "PrefixAffinity"))
    args, gateway_argv = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(args.strategy, gateway_argv))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
