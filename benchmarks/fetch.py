"""Benchmark `llama-operator fetch` against `curl -o` on loopback, plain and with a per-connection bandwidth cap.

    python benchmarks/fetch.py                 # 2 GiB, as reported in docs/model-sources.md
    python benchmarks/fetch.py --size 256M     # quick iteration

A server subprocess serves one GGUF-looking file over HTTP/1.1 with Range support (zero-copy sendfile):
`/plain/...` at full speed, `/cap/...` limited to `--cap` MB/s *per connection*, which is what a single TCP
stream gets on a high-latency path (window/RTT bound) while the link itself has room for more. Every tool runs
as a fresh process, so fetch's figures include its interpreter start, the sha256 verification (`--sha256`)
and the final fsync, which curl does not do.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MiB = 1024 * 1024


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 2G)")
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(float(match.group(1)) * factor)


# ---------------------------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    path_on_disk: Path
    cap: float

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        size = self.path_on_disk.stat().st_size
        start, end, status = 0, size, 200
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if head:
            return
        capped = self.path.startswith("/cap/")
        with self.path_on_disk.open("rb") as handle:
            offset, began = start, time.monotonic()
            try:
                while offset < end:
                    count = min(end - offset, 256 * 1024 if capped else 64 * MiB)
                    offset += os.sendfile(self.connection.fileno(), handle.fileno(), offset, count)
                    if capped:
                        ahead = (offset - start) / self.cap - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True


def serve(path: Path, port: int, cap: float) -> None:
    _Handler.path_on_disk = path
    _Handler.cap = cap
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.serve_forever()


# ---------------------------------------------------------------------------------------------- runs


def make_file(path: Path, size: int) -> str:
    """GGUF magic then pseudo-random bytes (a repeated random block: incompressible enough for HTTP)."""
    block = bytearray(os.urandom(32 * MiB))
    digest = hashlib.sha256()
    with path.open("wb") as out:
        written = 0
        while written < size:
            chunk = memoryview(block)[: min(len(block), size - written)]
            if written == 0:
                block[:4] = b"GGUF"
            out.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            block[4:12] = written.to_bytes(8, "little")  # every block differs
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("2G"), help="file size (default 2G)")
    parser.add_argument("--cap", type=float, default=50.0, help="per-connection cap in MB/s (default 50)")
    parser.add_argument("--connections", type=int, default=None, help="fetch connections (default: fetch's)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="work directory")
    parser.add_argument("--skip-capped", action="store_true", help="only the plain loopback comparison")
    parser.add_argument("--serve", nargs=3, metavar=("PATH", "PORT", "CAP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]), float(args.serve[2]))
        return 0
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("curl is needed for the comparison")

    work = Path(tempfile.mkdtemp(prefix="fetch-bench-", dir=args.dir))
    needed = 2 * args.size + 64 * MiB
    if shutil.disk_usage(work).free < needed:
        raise SystemExit(f"{work}: needs {needed / 2**30:.1f} GiB free")
    source = work / "model.gguf"
    print(f"Writing a {args.size / 2**30:.2f} GiB test file in {work} ...", flush=True)
    sha256 = make_file(source, args.size)
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(source), str(port), str(args.cap * 1e6)])
    try:
        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        cache = work / "cache"
        out = work / "curl.out"

        def run_curl(prefix: str, verify: bool = False) -> float:
            out.unlink(missing_ok=True)
            seconds = timed([curl, "-sS", "-f", "-o", str(out), f"{base}/{prefix}/model.gguf"])
            if verify:
                seconds += timed(["sha256sum", str(out)])
            out.unlink()
            return seconds

        def run_fetch(prefix: str, connections: int | None) -> float:
            shutil.rmtree(cache, ignore_errors=True)
            argv = [sys.executable, "-m", "llama_operator.cli", "fetch", "--cache-dir", str(cache), "--cache-key",
                    "bench", "--url", f"{base}/{prefix}/model.gguf", "--sha256", sha256,
                    "--termination-log", str(work / "termination-log")]
            if connections is not None:
                argv += ["--connections", str(connections)]
            seconds = timed(argv)
            shutil.rmtree(cache)
            return seconds

        default = "default" if args.connections is None else str(args.connections)
        rows: list[tuple[str, str, float, float]] = []
        curl_plain = run_curl("plain")
        fetch_plain = run_fetch("plain", args.connections)
        curl_verified = run_curl("plain", verify=True) if shutil.which("sha256sum") else None
        rows += [("loopback", "curl -o (1 stream)", curl_plain, curl_plain),
                 ("loopback", f"fetch ({default} connections)", fetch_plain, curl_plain)]
        if curl_verified is not None:
            rows += [("loopback", "curl -o, then sha256sum", curl_verified, curl_plain)]
        if not args.skip_capped:
            curl_cap = run_curl("cap")
            rows += [(f"cap {args.cap:g} MB/s/conn", "curl -o (1 stream)", curl_cap, curl_cap)]
            fetch_one = run_fetch("cap", 1)
            rows += [(f"cap {args.cap:g} MB/s/conn", "fetch --connections 1", fetch_one, curl_cap)]
            fetch_many = run_fetch("cap", args.connections)
            rows += [(f"cap {args.cap:g} MB/s/conn", f"fetch ({default} connections)", fetch_many, curl_cap)]
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nfile {args.size / 2**30:.2f} GiB; fetch verifies sha256 and fsyncs, curl does neither\n")
    print(f"{'scenario':<22} {'tool':<28} {'seconds':>8} {'MB/s':>8} {'speed vs curl':>14}")
    for scenario, tool, seconds, reference in rows:
        print(f"{scenario:<22} {tool:<28} {seconds:8.2f} {args.size / seconds / 1e6:8.1f} "
              f"{reference / seconds:13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
