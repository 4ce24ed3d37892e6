#!/usr/bin/env python3
"""Generates the llama-server flag catalog from the real binary.

Usage: gen-flag-catalog.py LLAMA_SERVER_BIN [--out operator/llama_operator/llamacpp/catalog-b11312.json]

The structure (names, negative forms, value hints, env vars, documented choices, removed flags) comes
from `llama-server --help`. `--help` does not say whether an `N` is an int or a float, so each
value-taking option is also probed with `llama-server --flag VALUE -h`, which parses everything and exits 0
only if the value is accepted: `99999999999` overflows `std::stoi` (int) but not `std::stof` (float); `abc`
is rejected by both numeric parsers but accepted by string options. The output is deterministic for a given
binary, so a test regenerates it and fails on drift.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from llama_operator.llamacpp import LLAMA_CPP_BUILD, LLAMA_CPP_COMMIT  # noqa: E402

HEADER_WIDTH = 40  # llama.cpp pads option headers to 40 columns (common_arg::to_string)
PATH_HINTS = {"FNAME", "PATH", "FILE", "DIR", "JINJA_TEMPLATE_FILE"}
SECTION_RE = re.compile(r"^----- (?P<name>.+) params -----$")
ENV_RE = re.compile(r"\(env: (?P<env>[A-Z0-9_]+)\)")
REMOVED_RE = re.compile(r"the argument has been removed\. (?P<hint>use .+)$", re.S)


def _split_header(header: str) -> tuple[list[str], str | None]:
    """'-c,    --ctx-size N' -> (['-c', '--ctx-size'], 'N'); value hints may contain commas and spaces."""
    names: list[str] = []
    hint: str | None = None
    parts = re.split(r",\s+", header.strip())
    for index, part in enumerate(parts):
        if " " in part:
            name, rest = part.split(" ", 1)
            names.append(name)
            hint = ", ".join([rest, *parts[index + 1 :]])
            break
        if not part.startswith("-"):
            # a hint with ", " inside: everything from here on belongs to it
            hint = ", ".join(parts[index:])
            break
        names.append(part)
    return names, hint


def parse_help(text: str) -> list[dict]:
    """Every option block of `--help`: names, value hint, help text, env var, section."""
    options: list[dict] = []
    section = "common"
    current: dict | None = None
    for line in text.splitlines():
        match = SECTION_RE.match(line)
        if match:
            section = match.group("name").split()[0]
            current = None
            continue
        if line.startswith("-"):
            if len(line) > HEADER_WIDTH and line[HEADER_WIDTH - 3 : HEADER_WIDTH] == "   ":
                header, desc = line[:HEADER_WIDTH], line[HEADER_WIDTH:]
            else:
                header, desc = line, ""
            names, hint = _split_header(header)
            current = {"names": names, "hint": hint, "help": [desc.strip()] if desc.strip() else [], "section": section}
            options.append(current)
        elif current is not None and line.strip():
            current["help"].append(line.strip())
    for option in options:
        option["help"] = " ".join(option["help"])
    return options


def _split_negatives(names: list[str]) -> tuple[list[str], list[str]]:
    """Positive and negative forms: llama.cpp lists args then args_neg; the negatives start at the first
    `--no-`/`-no-` name, together with the short aliases (`-nkvo`, `-nr`) right before it."""
    first = next((i for i, n in enumerate(names) if i > 0 and (n.startswith("--no-") or n.startswith("-no-"))), None)
    if first is None:
        return names, []
    start = first
    while start - 1 > 0 and not names[start - 1].startswith("--"):
        start -= 1
    return names[:start], names[start:]


class Prober:
    """Runs `llama-server <flag> <values...> -h` and reports whether the parse succeeded."""

    def __init__(self, binary: str, cwd: str) -> None:
        self.binary = binary
        self.cwd = cwd  # probes like `--log-file abc` create files: keep them out of the repository
        self.cache: dict[tuple[str, ...], bool] = {}

    def accepts(self, *argv: str) -> bool:
        if argv not in self.cache:
            # "-h --help": if a value-taking flag swallows the first, the second still ends the parse.
            # A fresh empty directory per probe: `--log-file abc` creates abc, and a later
            # `--chat-template-file abc` must not find it (the verdict would depend on probe order).
            with tempfile.TemporaryDirectory(dir=self.cwd) as cwd:
                proc = subprocess.run(
                    [self.binary, *argv, "-h", "--help"], capture_output=True, timeout=30, check=False, cwd=cwd,
                    env={"PATH": "/usr/bin:/bin", "HOME": cwd},
                )  # fmt: skip
            self.cache[argv] = proc.returncode == 0
        return self.cache[argv]


def _documented_choices(hint: str | None, help_text: str) -> list[str] | None:
    if hint:
        for pattern in (r"^\{(.+)\}$", r"^\[(.+)\]$", r"^<(.+)>$"):
            match = re.match(pattern, hint)
            if match and ("|" in match.group(1) or "," in match.group(1)) and "..." not in match.group(1):
                values = re.split(r"[|,]", match.group(1))
                if all(re.fullmatch(r"[\w.+-]+", v) for v in values) and not any(".." in v for v in values):
                    return values
        if "," in hint and re.fullmatch(r"[a-z0-9-]+(,[a-z0-9-]+)+", hint):
            return hint.split(",")  # e.g. --spec-type none,draft-simple,...
    match = re.search(r"allowed values: ((?:[\w.]+, )*[\w.]+)", help_text)
    if match:
        return match.group(1).split(", ")
    bullets = re.findall(r"(?:^|\s)- ([a-z0-9+_-]+): ", help_text)
    if len(bullets) >= 2:
        return bullets
    return None


def _probe_value_kind(prober: Prober, flag: str, hint: str | None) -> str:
    """int, float, string or checked (a string llama.cpp validates itself, e.g. by reading a file)."""
    if prober.accepts(flag, "abc"):
        return "string"
    # std::stoi/stof accept trailing junk ("1x"); a value that is really JSON or a file name does not.
    for one, junk, big in (("1", "1x", "99999999999"), ("1,2", "1x,2", "99999999999,1")):
        if prober.accepts(flag, one) and prober.accepts(flag, junk):
            return "float" if prober.accepts(flag, big) else "int"
    return "checked"


def classify(prober: Prober, raw: dict) -> dict:
    names, negatives = _split_negatives(raw["names"])
    hint, help_text = raw["hint"], raw["help"]
    env = ENV_RE.search(help_text)
    removed = REMOVED_RE.search(ENV_RE.sub("", help_text).strip())
    option: dict = {
        "names": names,
        "negatives": negatives,
        "section": raw["section"],
        "value_hint": hint,
        "values": 0,
        "kind": "bool" if negatives else "flag",
        "choices": None,
        "keywords": None,
        "list": False,
        "env": env.group("env") if env else None,
        "removed": removed.group("hint").strip() if removed else None,
        "deprecated": "(DEPRECATED)" in help_text,
        "help": ENV_RE.sub("", help_text).strip(),
    }
    if hint is None:
        return option
    flag = names[-1]
    if " " in hint and re.fullmatch(r"[A-Z]+ [A-Z]+", hint):
        # two positional values (--control-vector-layer-range START END)
        option["values"] = 2
        option["kind"] = "int" if not prober.accepts(flag, "a", "b") and prober.accepts(flag, "1", "2") else "string"
        return option
    option["values"] = 1
    option["list"] = "," in hint or "comma-separated" in help_text
    kind = _probe_value_kind(prober, flag, hint)
    choices = _documented_choices(hint, help_text)
    if choices:
        # Documented choices are kept even where llama.cpp's parser is laxer (it takes -fa true, --poll 200):
        # the validator enforces them exactly.
        default = re.search(r"\(default: '?([\w.+-]+)'?\)", help_text)
        if default and default.group(1) not in choices and prober.accepts(flag, default.group(1)):
            choices = [*choices, default.group(1)]  # e.g. --reasoning-format's undocumented-in-list "auto"
        # Only values this binary really accepts: the validator must never allow what llama-server rejects.
        option["choices"] = [choice for choice in choices if prober.accepts(flag, choice)]
        option["kind"] = "enum"
        option["list"] = bool(re.fullmatch(r"[a-z0-9-]+(,[a-z0-9-]+)+", hint))
        return option
    if kind in ("int", "float"):
        keywords = [word for word in ("auto", "all", "none") if prober.accepts(flag, word)]
        option["keywords"] = keywords or None
    if kind == "string" and hint.split(" ")[0] in PATH_HINTS:
        kind = "path"
    option["kind"] = kind
    return option


def build_catalog(binary: str) -> dict:
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True, timeout=30).stdout
    raws = parse_help(text)
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=4) as pool:
        prober = Prober(binary, scratch)
        options = list(pool.map(lambda raw: classify(prober, raw), raws))
    return {"build": LLAMA_CPP_BUILD, "commit": LLAMA_CPP_COMMIT, "options": options}


def render(catalog: dict) -> str:
    return json.dumps(catalog, indent=1, sort_keys=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary", help="path of the pinned llama-server")
    root = Path(__file__).resolve().parents[1]
    default_out = root / f"operator/llama_operator/llamacpp/catalog-{LLAMA_CPP_BUILD}.json"
    parser.add_argument("--out", default=str(default_out), help="where to write the JSON ('-' for stdout)")
    args = parser.parse_args()
    output = render(build_catalog(args.binary))
    if args.out == "-":
        sys.stdout.write(output)
    else:
        Path(args.out).write_text(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
