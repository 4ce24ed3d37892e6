"""Hostile GGUF headers against the operator: time, peak RSS and event-loop stall of `sources.resolve`, and
what `llama-operator inspect` prints (on a local file for the small ones, else the URL), each in a fresh
subprocess.

    .venv/bin/python benchmarks/hostile_gguf.py                       # this tree
    .venv/bin/python benchmarks/hostile_gguf.py --tree /tmp/before    # another checkout (git worktree), same cases
    .venv/bin/python benchmarks/hostile_gguf.py --case drip-1-byte-per-s --cap 120

The cases are `tests/hostile_gguf.CASES` (served from this process over HTTP on 127.0.0.1, never written to
disk), plus the tiny llama of `tests/tiny_gguf.py` as the reference. Each run is killed after `--cap` seconds
(shown as `killed`). Peak RSS is the child's ru_maxrss (os.wait4), so a killed run still reports it; the stall is
the longest gap a 10 ms ticker on the resolving event loop saw. The operator's memory limit in the chart is 256Mi.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hostile_gguf import CASE_BY_NAME, CASES, Case, Virtual, serving  # noqa: E402

_RESOLVE = r"""
import asyncio, json, sys, time
from llama_operator import sources
from llama_operator.api.v1alpha1 import LlamaModelSpec
from llama_operator.config import Settings

async def main(url):
    stall = 0.0
    async def tick():
        nonlocal stall
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.01)
            last = now
    ticker = asyncio.create_task(tick())
    spec = LlamaModelSpec.model_validate({"source": {"http": {"url": url}}})
    try:
        # The cases are served from 127.0.0.1: the egress guard (where the tree has one) would refuse them.
        guard = {"source_egress_guard": False} if "source_egress_guard" in Settings.__dataclass_fields__ else {}
        resolved = await sources.resolve(spec, settings=Settings(**guard), hf_token=None, headers={})
        status = resolved.gguf.model_dump(by_alias=True, exclude_none=True) if resolved.gguf else {}
        ints = [v for v in json.dumps(status).replace("{", ",").replace("}", ",").replace(":", ",").split(",")
                if v.strip().isdigit()]
        biggest = max((int(v) for v in ints), default=0)
        outcome = "resolved" + (f" (an integer of {len(str(biggest))} digits: over int64)" if biggest >= 2**63
                                else "")
        if resolved.gguf and resolved.gguf.name and len(resolved.gguf.name) > 256:
            outcome += f" (name of {len(resolved.gguf.name)} chars)"
    except BaseException as exc:
        outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    await asyncio.sleep(0.05)  # let the ticker see the last stall
    ticker.cancel()
    print(json.dumps({"outcome": outcome, "stall": stall}))

asyncio.run(main(sys.argv[1]))
"""


def _run(argv: list[str], env: dict[str, str], cap: float) -> tuple[float, float, int | None, str]:
    """(seconds, peak RSS MiB, exit status or None when killed, stdout+stderr)."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - started > cap:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        proc.returncode = 0  # reaped above: keep Popen from waiting again
        out.seek(0)
        text = out.read().decode(errors="replace")
    return elapsed, usage.ru_maxrss / 1024, None if killed else os.waitstatus_to_exitcode(status), text


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="checkout whose operator/ is measured")
    parser.add_argument("--case", action="append", help="run only these cases (repeatable)")
    parser.add_argument("--cap", type=float, default=90.0, help="kill a run after this many seconds (90)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    from tests.tiny_gguf import write_tiny_llama

    tmp = tempfile.mkdtemp(prefix="hostile-gguf-")
    tiny = write_tiny_llama(Path(tmp) / "tiny.gguf").read_bytes()
    cases = (Case("reference", "the tiny llama (valid, 0.5 MB)", lambda: Virtual().data(tiny)), *CASES)
    # (row, case, file name): a split model reads every shard's header at once, so one row resolves 8 of them.
    runs = [(case.name, case, case.name) for case in cases]
    runs.append(("at-the-budget, 8 shards", CASE_BY_NAME["at-the-budget"], "at-the-budget-00001-of-00008"))
    if args.case:
        runs = [run for run in runs if run[0] in args.case]
        cases = tuple({run[1].name: run[1] for run in runs}.values())
    env = {**os.environ, "PYTHONPATH": str(args.tree / "operator")}
    rows = []
    with serving(cases) as base:
        for row_name, case, file_name in runs:
            url = f"{base}/{file_name}.gguf"
            seconds, rss, code, text = _run([sys.executable, "-c", _RESOLVE, url], env, args.cap)
            try:
                result = json.loads(text.strip().splitlines()[-1])
                outcome, stall = result["outcome"], f"{result['stall']:.2f}"
            except (ValueError, IndexError, KeyError):
                outcome, stall = ("killed" if code is None else _short(text)), "-"
            target = url
            virtual = case.make()
            if virtual.size is not None and virtual.size <= 1024 * 1024 and not (case.drip or case.ignore_range):
                target = str(Path(tmp) / f"{file_name}.gguf")
                Path(target).write_bytes(virtual.bytes())
            i_seconds, i_rss, i_code, i_text = _run(
                [sys.executable, "-m", "llama_operator.cli", "inspect", target], env, args.cap)
            lines = len(i_text.strip().splitlines())
            inspect = "killed" if i_code is None else f"exit {i_code}, {lines} line{'s' * (lines != 1)}"
            row = {"case": row_name, "resolve_s": round(seconds, 2), "resolve_rss_mib": round(rss),
                   "stall_s": stall, "outcome": _short(outcome), "inspect_s": round(i_seconds, 2),
                   "inspect_rss_mib": round(i_rss), "inspect": inspect}
            rows.append(row)
            print(f"{row_name:24} {row['resolve_s']:>7} s {row['resolve_rss_mib']:>5} MiB  stall {stall:>5} s  "
                  f"{row['outcome']}", file=sys.stderr)
    header = ("| case | resolve time | resolve peak RSS | loop stall | resolve outcome | inspect time | "
              "inspect peak RSS | inspect |")
    print(header)
    print("|---|---:|---:|---:|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['case']} | {row['resolve_s']} s | {row['resolve_rss_mib']} MiB | {row['stall_s']} s | "
              f"{row['outcome']} | {row['inspect_s']} s | {row['inspect_rss_mib']} MiB | {row['inspect']} |")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
