"""`llama-operator drain`: the sidecar that lets a stopping llama-server pod finish the requests it holds.

The llama-server container's preStop hook is `httpGet` to this sidecar's `/drain` (the llama-server image may
have no shell or curl). The answer is what the kubelet waits for before it sends llama-server SIGTERM, so it comes:
- never before `--min-wait` seconds after the call: the pod is already terminating, and the EndpointSlice
  change that removes it must reach the gateway and kube-proxy before the server stops accepting;
- then as soon as llama-server reports no request processing or deferred for two polls in a row;
- at the latest when `--budget-seconds` (the pod's grace period less a margin) have passed, so llama-server still
  gets its SIGTERM inside the grace period.
llama-server's state is its `/metrics` (the operator always starts it with `--metrics`; `/slots` is off by
default): `llamacpp:requests_processing` + `llamacpp:requests_deferred`. In router mode (`spec.models`) /metrics
needs `?model=`: the sidecar lists `/models` and reads each loaded instance's metrics with `autoload=false` (the
router would otherwise load a model to answer). A model that is loading counts as busy: a request waits on it.
A server that refuses connections holds nothing; an answer that cannot be read counts as busy (the budget bounds
it). Every call is bounded: connect/read time, bytes read, models listed, concurrent /drain callers.

Standard library only: this runs in every llama-server pod, next to the model, for the pod's whole life.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .contract import DRAIN_PATH, DRAIN_PORT, DRAIN_READY_PATH, EXIT_OK
from .slotstore import RouterSlotDirectory, SlotApi, SlotDirectory, authorization, restore_all, save_all, save_router

log = logging.getLogger("llama_operator.drain")

MAX_BODY = 1 << 20
"""Bytes read from any llama-server answer (a router's /models of 16 models is about 20 KiB)."""
MAX_MODELS = 64
"""Router instances polled per round; the API allows 16 models per server."""
MAX_CALLERS = 8
"""Concurrent /drain calls served; the kubelet makes one per stop, the rest are answered 503 at once."""
HTTP_TIMEOUT = 2.0
BUSY_METRICS = ("llamacpp:requests_processing", "llamacpp:requests_deferred")


class Unreadable(Exception):
    """llama-server answered, but not with something this sidecar can read."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes


def http_get(base: str, path: str, *, timeout: float = HTTP_TIMEOUT) -> Reply | None:
    """GET `base + path`, at most MAX_BODY bytes; None when nothing listens there (connection refused). With
    the server's API key in the environment (spec.apiKeySecretRef), sent: llama-server guards /metrics with it."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)
    try:
        connection.request("GET", path, headers=authorization())
        response = connection.getresponse()
        return Reply(response.status, response.read(MAX_BODY))
    except ConnectionRefusedError:
        return None
    except (OSError, http.client.HTTPException) as exc:
        raise Unreadable(f"GET {path}: {exc.__class__.__name__}: {exc}") from None
    finally:
        connection.close()


def busy_from_metrics(text: str) -> int:
    """Requests processing + deferred in a Prometheus text page of llama-server."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in BUSY_METRICS:
            try:
                found[name] = int(float(value.split()[0]))
            except (ValueError, IndexError):
                raise Unreadable(f"{name}: {value[:40]!r} is not a number") from None
    if BUSY_METRICS[0] not in found:
        raise Unreadable(f"/metrics has no {BUSY_METRICS[0]}")
    return sum(found.values())


class ServerState:
    """How many requests llama-server (one model or the router) holds now."""

    def __init__(self, base: str, get: Callable[[str, str], Reply | None] = http_get) -> None:
        self.base = base.rstrip("/")
        self._get = get

    def busy(self) -> int:
        """Requests processing or waiting; 0 when nothing listens; raises Unreadable."""
        reply = self._get(self.base, "/metrics")
        if reply is None:
            return 0
        if reply.status == 200:
            return busy_from_metrics(reply.body.decode("utf-8", "replace"))
        if reply.status == 400:  # the router: "model name is missing from the request"
            return self._router_busy()
        raise Unreadable(f"/metrics answered {reply.status}")

    def _router_busy(self) -> int:
        reply = self._get(self.base, "/models")
        if reply is None:
            return 0
        if reply.status != 200:
            raise Unreadable(f"/models answered {reply.status}")
        try:
            models = json.loads(reply.body)["data"]
            states = [(str(m["id"]), str((m.get("status") or {}).get("value", ""))) for m in models[:MAX_MODELS]]
        except (ValueError, KeyError, TypeError):
            raise Unreadable("/models is not the router's model list") from None
        total = 0
        for model, state in states:
            if state == "loading":
                total += 1
            elif state == "loaded":
                query = urllib.parse.urlencode({"model": model, "autoload": "false"})
                answer = self._get(self.base, f"/metrics?{query}")
                if answer is not None and answer.status == 200:
                    total += busy_from_metrics(answer.body.decode("utf-8", "replace"))
                elif answer is not None and answer.status != 400:  # 400: unloaded since the list
                    raise Unreadable(f"/metrics of {model} answered {answer.status}")
        return total


@dataclass(frozen=True)
class Timing:
    budget: float
    """Seconds from a /drain call to its latest answer."""
    min_wait: float = 5.0
    poll: float = 1.0
    idle_polls: int = 2


class Drain:
    """The wait of one /drain call. Calls do not share a drain: a call made before the pod was stopping (by
    anyone who reaches the port) must not turn the kubelet's later call into an immediate answer."""

    def __init__(self, busy: Callable[[], int], timing: Timing, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, when_idle: Callable[[float], str] | None = None) -> None:
        """`when_idle(deadline)`: run once llama-server is idle (saving the slots), by the drain's deadline."""
        self._busy, self._timing, self._clock, self._sleep = busy, timing, clock, sleep
        self._when_idle = when_idle

    def wait(self) -> str:
        log.info("drain called: waiting until llama-server is idle, at most %.0f s", self._timing.budget)
        outcome = self._run()
        log.info("%s", outcome)
        return outcome

    def _run(self) -> str:
        timing, start = self._timing, self._clock()
        deadline = start + timing.budget
        idle, last, error = 0, None, ""
        while True:
            now = self._clock()
            if idle >= timing.idle_polls and now - start >= min(timing.min_wait, timing.budget):
                outcome = f"idle after {now - start:.1f} s"
                return f"{outcome}; {self._when_idle(deadline)}" if self._when_idle else outcome
            if now >= deadline:
                what = f"{last} request(s) still in progress" if last is not None else f"state unknown ({error})"
                return f"budget of {timing.budget:.0f} s spent: {what}"
            try:
                last = self._busy()
                idle = idle + 1 if last == 0 else 0
            except Unreadable as exc:
                idle, last, error = 0, None, str(exc)
                log.warning("cannot read llama-server's state: %s", exc)
            self._sleep(max(0.0, min(timing.poll, deadline - self._clock())))


def make_server(drain: Drain, port: int, host: str = "0.0.0.0", ready: threading.Event | None = None
                ) -> ThreadingHTTPServer:
    """/drain, /healthz, and /readyz: 200 once `ready` is set (the kept prompt caches restored), or always."""
    callers = threading.BoundedSemaphore(MAX_CALLERS)

    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_TIMEOUT * 2  # a client that sends its request slowly holds a thread this long at most

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                return self._answer(200, "ok")
            if path == DRAIN_READY_PATH:
                done = ready is None or ready.is_set()
                return self._answer(200 if done else 503, "ok" if done else "restoring prompt caches")
            if path != DRAIN_PATH:
                return self._answer(404, "not found")
            if not callers.acquire(blocking=False):
                return self._answer(503, "too many drain calls")
            try:
                self._answer(200, drain.wait())
            finally:
                callers.release()

        def _answer(self, status: int, text: str) -> None:
            body = f"{text}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
            log.debug(format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.request_queue_size = MAX_CALLERS
    return server


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `drain` subcommand to the llama-operator command line."""
    parser = sub.add_parser(
        "drain", help="answer llama-server's preStop hook once it is idle (the drain sidecar)",
        description="Serve GET /drain: it answers once llama-server has been idle for two polls (at least "
        "--min-wait seconds after the call), or when --budget-seconds have passed.")
    parser.add_argument("--port", type=int, default=DRAIN_PORT, help=f"port to listen on (default {DRAIN_PORT})")
    parser.add_argument("--server", default="http://127.0.0.1:8080", help="llama-server's base URL")
    parser.add_argument("--budget-seconds", type=float, required=True,
                        help="the latest answer, in seconds after the /drain call")
    parser.add_argument("--min-wait", type=float, default=5.0, help="the earliest answer (default 5 s)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")
    parser.add_argument("--slots-dir", help="keep the prompt caches: llama-server's --slot-save-path, where every "
                        "slot is saved once idle and from which the newest are restored at start")
    parser.add_argument("--slot-key", default="", help="with --slots-dir: the model's key (16 hex digits)")
    parser.add_argument("--model-keys", default="",
                        help="with --slots-dir, router mode: every model's key, comma-separated (a directory each "
                        "below --slots-dir): the loaded models' slots are saved once idle; nothing is restored at "
                        "start (the gateway restores a model's slots when it loads it)")
    parser.add_argument("--slots-max-bytes", type=int, default=2 << 30,
                        help="with --slots-dir: bytes of saved files kept (default 2 GiB)")
    parser.set_defaults(func=_cmd_drain)


def _cmd_drain(args: argparse.Namespace) -> int:
    from .errors import CliError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if not (1 <= args.port <= 65535) or args.budget_seconds <= 0 or args.min_wait < 0 or args.poll <= 0:
        raise CliError("--port must be 1-65535, --budget-seconds and --poll above 0, --min-wait at least 0")
    if urllib.parse.urlsplit(args.server).scheme != "http":
        raise CliError(f"--server must be an http:// URL, not {args.server[:100]!r}")
    state = ServerState(args.server)
    timing = Timing(budget=args.budget_seconds, min_wait=args.min_wait, poll=args.poll)
    ready = None
    if args.slots_dir and args.model_keys:
        keys = args.model_keys.split(",")
        if not all(re.fullmatch(r"[0-9a-f]{16}", key) for key in keys) or len(keys) > MAX_MODELS \
                or args.slots_max_bytes < 0:
            raise CliError("--model-keys must be keys of 16 lowercase hex digits, comma-separated, and "
                           "--slots-max-bytes at least 0")
        router_directory = RouterSlotDirectory(Path(args.slots_dir), keys, args.slots_max_bytes)
        log.info("prompt caches: pruned %d bytes", router_directory.prune())
        router_api = SlotApi(args.server)
        drain = Drain(state.busy, timing, when_idle=lambda deadline: save_router(router_directory, router_api,
                                                                                 deadline))
    elif args.slots_dir:
        if not re.fullmatch(r"[0-9a-f]{16}", args.slot_key) or args.slots_max_bytes < 0:
            raise CliError("--slot-key must be 16 lowercase hex digits and --slots-max-bytes at least 0")
        directory = SlotDirectory(Path(args.slots_dir), args.slot_key, args.slots_max_bytes,
                                  os.environ.get("HOSTNAME", ""))
        api, ready = SlotApi(args.server), threading.Event()
        drain = Drain(state.busy, timing, when_idle=lambda deadline: save_all(directory, api, deadline))

        def restore() -> None:
            log.info("prompt caches: %s", restore_all(directory, api))
            ready.set()

        threading.Thread(target=restore, name="restore", daemon=True).start()
    else:
        drain = Drain(state.busy, timing)
    try:
        server = make_server(drain, args.port, ready=ready)
    except OSError as exc:
        raise CliError(f"cannot listen on port {args.port}: {exc.strerror}") from None
    # PID 1 of its container: without a handler the kernel drops SIGTERM, and the pod would wait out its grace.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("drain sidecar on :%d for %s, budget %.0f s", args.port, args.server, args.budget_seconds)
    with server:
        server.serve_forever(poll_interval=0.5)
    return EXIT_OK
