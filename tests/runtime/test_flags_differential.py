"""Differential test: our validator against the real llama-server's own parser, on generated flag lists.

Each case is a short list drawn from the catalog (random options under any spelling, negative forms, valid
and invalid values, typos, `--flag=value`, bare values, removed flags, repeats, refused flags). Every list is
run through `llama-server <flags> -h --help` (parses everything, exits 0 only if all flags are valid) and
through `validate_args`. Required:
- never: we accept and llama-server rejects;
- where llama-server accepts and we refuse, every rule we cite is one of STRICTER_RULES (named and counted);
- the syntax rules (unknown flag, bare value, --flag=value, removed) are never "stricter": llama-server
  rejects those too.
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from llama_operator.flags.policy import INT32, RANGES, REFUSED
from llama_operator.flags.validate import validate_args
from llama_operator.llamacpp.catalog import Option, load_catalog

from ..llama_bin import llama_server_bin

CASES = 1000
SEED = 11312

STRICTER_RULES = {
    "managed": "operator-owned flag (llama-server accepts it)",
    "typed-field": "flag has a typed field",
    "exits": "print-and-exit flag",
    "outside": "reaches outside the pod / opens tools",
    "deprecated": "deprecated no-op flag",
    "unverifiable": "value checked against node state we cannot see",
    "int": "strict integer (llama takes 4k as 4, 1.5 as 1)",
    "float": "strict number (llama takes 1.5x as 1.5)",
    "range": "documented range (llama does not check)",
    "enum": "exact documented values (llama takes -fa true, --cpu-strict 5)",
    "format": "strict format (JSON objects, CPU buffers only)",
    "repeated": "flag given twice (llama: last wins)",
    "missing-value": "string flag followed by a flag (llama takes the flag as the value)",
}
NEVER_STRICTER = {"unknown-flag", "bare-value", "flag-equals-value", "removed"}

VALID_CHECKED = {
    "--cpu-range": ["0-3", "2-2"], "--cpu-range-batch": ["0-1"], "--spec-draft-cpu-range": ["0-7"],
    "--logit-bias": ["15043+1", "2-0.5"], "--json-schema": ['{"type":"object"}', "{}"],
    "--chat-template-kwargs": ['{"enable_thinking":false}'], "--override-kv": ["a.b=int:5", "x=bool:true,y=str:hi"],
    "--override-tensor": ["exps=CPU", "blk\\.1\\.ffn=CPU"], "--spec-draft-override-tensor": ["exps=CPU"],
    "--device": ["none"], "--spec-draft-device": ["none"], "--mmproj-device": ["none"],
    "--cpu-mask": ["0xff", "3"], "--cpu-mask-batch": ["f0"], "--spec-draft-cpu-mask": ["1"],
    "--spec-draft-cpu-mask-batch": ["0x3"],
}  # fmt: skip
BAD_CHECKED = ["x", "[]", "3", "exps=CUDA0", "CPU", "1-", "a=bool:maybe"]


def _valid_value(option: Option, rng: random.Random) -> str:
    if option.kind == "enum":
        assert option.choices
        if option.is_list:
            return ",".join(rng.sample(option.choices, rng.randint(1, min(3, len(option.choices)))))
        return rng.choice(option.choices)
    if option.kind in ("int", "float"):
        if option.keywords and rng.random() < 0.3:
            return rng.choice(option.keywords)
        low, high = RANGES.get(option.canonical, (None, None))
        low = 0 if low is None else low
        high = 10_000 if high is None else high
        if option.kind == "int":
            items = [str(rng.randint(int(low), int(high)))]
        else:
            items = [f"{rng.uniform(low, high):.3f}".rstrip("0").rstrip(".") or "0"]
        if option.is_list:
            items = items * rng.randint(1, 3)
        return ",".join(items)
    if option.canonical in VALID_CHECKED:
        return rng.choice(VALID_CHECKED[option.canonical])
    if option.kind == "checked":
        return "x"
    if option.kind == "path":
        return rng.choice(["/tmp/x", "file.bin", "/models/a.gguf"])
    return rng.choice(["abc", "hello world", "x,y", "0"])


def _invalid_value(option: Option, rng: random.Random) -> str:
    if option.kind == "int":
        return rng.choice(["4k", "abc", "1.5", "99999999999", "0x10", "", "-", str(INT32[1] + 1), "1e3"])
    if option.kind == "float":
        return rng.choice(["hot", ".5", "1e40", "nan", "1.5x", "", "--"])
    if option.kind == "enum":
        assert option.choices
        return rng.choice(["bogus", option.choices[0].upper(), "true", "", option.choices[0] + ","])
    if option.kind == "checked" or option.canonical in VALID_CHECKED:
        return rng.choice(BAD_CHECKED)
    return rng.choice(["--jinja", "-c", ""])


def _typo(spelling: str, rng: random.Random, known: set[str]) -> str:
    for _ in range(20):
        chars = list(spelling)
        i = rng.randrange(2 if spelling.startswith("--") else 1, len(chars))
        op = rng.choice(["drop", "dup", "swap", "sub"])
        if op == "drop" and len(chars) > 3:
            del chars[i]
        elif op == "dup":
            chars.insert(i, chars[i])
        elif op == "swap" and i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        else:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        candidate = "".join(chars)
        if candidate not in known and candidate.replace("_", "-") not in known:
            return candidate
    return spelling + "zz"


def _item(rng: random.Random, options: list[Option], known: set[str]) -> list[str]:
    option = rng.choice(options)
    spelling = rng.choice(option.spellings)
    roll = rng.random()
    if roll < 0.45:  # a valid use
        return [spelling, *[_valid_value(option, rng) for _ in range(option.values)]]
    if roll < 0.65 and option.values:  # an invalid value
        return [spelling, _invalid_value(option, rng), *[_valid_value(option, rng)] * (option.values - 1)]
    if roll < 0.75:  # typo
        return [_typo(spelling, rng, known), *[_valid_value(option, rng) for _ in range(option.values)]]
    if roll < 0.80 and option.values == 1:
        return [f"{spelling}={_valid_value(option, rng)}"]
    if roll < 0.85:
        return rng.choice([["--mlock"], ["--no-mmap"], ["--draft-max", "8"], ["--draft-min", "2"],
                           ["--draft", "4"], ["--spec-ngram-size-n", "3"]])
    if roll < 0.90:
        return [rng.choice(["20", "abc", "model.gguf"])]  # bare value
    if roll < 0.95 and option.values == 1 and option.kind in ("string", "path"):
        return [spelling]  # value missing: the next flag (or -h) becomes the value
    return [spelling, *[_valid_value(option, rng) for _ in range(option.values)]] * 2  # repeated


def generate_cases(count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    catalog = load_catalog()
    # Print-and-exit flags end llama-server's parse early (later flags go unchecked): tested separately.
    exits = {name for name, refusal in REFUSED.items() if refusal.category == "exits"}
    options = [o for o in catalog.options if o.canonical not in exits]
    known = set(catalog.by_spelling)
    cases = []
    for _ in range(count):
        args: list[str] = []
        for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
            args += _item(rng, options, known)
        cases.append(args)
    return cases


def _llama_accepts(binary: str, args: list[str], root: str) -> bool:
    # A fresh directory per case: files one case creates (--log-file x) must not satisfy another's reads.
    with tempfile.TemporaryDirectory(dir=root) as cwd:
        proc = subprocess.run(
            [binary, *args, "-h", "--help"], capture_output=True, timeout=20, cwd=cwd, check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": cwd},
        )  # fmt: skip
    return proc.returncode == 0


def test_validator_agrees_with_llama_server():
    binary = llama_server_bin()
    cases = generate_cases(CASES, SEED)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as cwd, ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        verdicts = list(pool.map(lambda args: _llama_accepts(binary, args, cwd), cases))
    elapsed = time.monotonic() - started

    counts: collections.Counter[str] = collections.Counter()
    stricter: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    for args, llama_ok in zip(cases, verdicts, strict=True):
        errors = validate_args(args)
        if not errors:
            counts["both accept" if llama_ok else "WE ACCEPT, LLAMA REJECTS"] += 1
            if not llama_ok:
                failures.append(f"accepted but llama-server rejects: {args}")
        elif not llama_ok:
            counts["both reject"] += 1
        else:
            counts["stricter"] += 1
            rules = {error.rule for error in errors}
            unnamed = rules - set(STRICTER_RULES)
            if unnamed:
                failures.append(f"refused by {sorted(unnamed)} but llama-server accepts: {args} -> {errors}")
            stricter.update(rules & set(STRICTER_RULES))
            if rules & NEVER_STRICTER:
                failures.append(f"syntax rule {sorted(rules & NEVER_STRICTER)} but llama-server accepts: {args}")
    summary = (
        f"{len(cases)} cases in {elapsed:.1f}s: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        + "; stricter by rule: " + ", ".join(f"{k}={v}" for k, v in stricter.most_common())
    )
    print(summary)
    assert not failures, "\n".join(failures[:20])
    assert len(cases) >= 500
    assert counts["both accept"] >= 50 and counts["both reject"] >= 100  # the generator covers both sides


def test_every_refused_option_is_accepted_by_llama_server():
    # The policy refuses these although they parse: proof that "stricter" here is policy, not a parser gap.
    binary = llama_server_bin()
    catalog = load_catalog()
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory() as cwd:
        for canonical in sorted(REFUSED):
            option = catalog.lookup(canonical)[0]
            if option.kind == "checked" or canonical in ("--help", "--version", "--list-devices", "--cache-list",
                                                         "--completion-bash"):
                continue
            args = [canonical, *[_valid_value(option, rng) for _ in range(option.values)]]
            assert _llama_accepts(binary, args, cwd), args
            assert validate_args(args)[0].rule == REFUSED[canonical].category
