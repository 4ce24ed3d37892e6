"""The pure parts of prefix_affinity.py: the shared-prefix workload, guidellm's scenario, its report read into the
table, and the table (tests/unit/test_bench_shared_prefix.py checks them; nothing here runs a server).

The workload is a multi-tenant retrieval-augmented assistant: `documents` tenants, each with its own system
prompt (a short instruction naming the tenant, then a handbook of `document_words` words: 500 words make a
~800-token prompt with gemma's tokenizer), each asked `questions` different short questions; every request is
one chat turn (system prompt + question) with a fixed answer length (guidellm sends `ignore_eos` with the
dataset's `output_tokens_count`). The requests come in a seeded random order, so the questions about one tenant
arrive spread over the run and interleaved with every other tenant's, as independent users' would. What is
shared is the system prompt: hundreds of tokens that a replica prefills once and then serves from its cache.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WAYS = ("service", "least_in_flight", "prefix_affinity")
"""The three fronts, in the table's order: the Service stand-in, the gateway with each policy."""

WAY_LABELS = {"service": "Service (random per connection)", "least_in_flight": "gateway, LeastInFlight",
              "prefix_affinity": "gateway, PrefixAffinity"}

GOAL_THROUGHPUT = 1.3
"""Issue #20: PrefixAffinity's requests/s at least 1.3x the Service's, or ..."""
GOAL_TTFT_P90 = 0.7
"""... its TTFT p90 at most 0.7x the Service's."""

_WORDS = ("account access after agreement annual application approval available balance before billing branch "
          "business card change charge claim client closing contract cost coverage customer daily data date "
          "deadline delivery deposit device discount document employee energy equipment exchange fee file form "
          "fund guarantee holder hours identity income insurance interest invoice item level limit loan manager "
          "member method minimum monthly network notice number office online order owner partner payment period "
          "permit plan policy premium price process product program purchase rate record refund renewal report "
          "request reserve return review rule safety schedule service session shipment signature standard "
          "statement storage subscription support system tariff tax term transfer update usage user vehicle "
          "warranty window withdrawal").split()
_VERBS = ("applies to", "covers", "excludes", "requires", "replaces", "extends", "limits", "includes", "follows",
          "depends on", "is charged with", "is reviewed against")
_TENANTS = ("Northwind Bank", "Contoso Insurance", "Fabrikam Energy", "Tailspin Travel", "Wingtip Telecom",
            "Litware Health", "Adatum Logistics", "Proseware Retail")
_QUESTIONS = ("What does the document say about the {0}?", "Is the {0} covered, and under which conditions?",
              "How long does the {0} take?", "Who approves the {0}?", "What happens to the {0} after closing?",
              "Summarise the rules for the {0} in two sentences.", "Which fee applies to the {0}?",
              "Can a customer change the {0} online?")


@dataclass(frozen=True)
class Workload:
    documents: int = 12
    questions: int = 4
    document_words: int = 500
    output_tokens: int = 48
    seed: int = 20

    @property
    def requests(self) -> int:
        return self.documents * self.questions

    def describe(self) -> str:
        return (f"{self.documents} system prompts of ~{self.document_words} words, {self.questions} questions each "
                f"({self.requests} requests, seeded random order), {self.output_tokens} tokens per answer")


def _document(rng: random.Random, index: int, words: int) -> str:
    sentences, count = [], 0
    while count < words:
        length = rng.randint(8, 16)
        picked = [rng.choice(_WORDS) for _ in range(length - 2)]
        sentence = " ".join([picked[0], rng.choice(_VERBS), *picked[1:]])
        sentences.append(f"{index}.{len(sentences) + 1} {sentence.capitalize()}.")
        count += length
    return " ".join(sentences)


def system_prompt(index: int, words: int, seed: int) -> str:
    """Tenant `index`'s system prompt: its own instruction line first, so prompts differ from the first characters
    (the gateway hashes the start of the prompt, at most spec.routing.prefixCharacters)."""
    rng = random.Random(f"{seed}/{index}")
    tenant = f"{_TENANTS[index % len(_TENANTS)]} (region {index // len(_TENANTS) + 1})"
    return (f"You are the customer assistant of {tenant}. Answer only from the handbook below; say so when it does "
            f"not answer the question.\n\nHandbook {index}:\n{_document(rng, index, words)}")


def dataset(workload: Workload) -> list[dict[str, Any]]:
    """The requests, in the order guidellm sends them (columns its generative column mapper knows)."""
    rng = random.Random(workload.seed)
    rows = []
    for index in range(workload.documents):
        system = system_prompt(index, workload.document_words, workload.seed)
        templates = rng.sample(_QUESTIONS, k=min(workload.questions, len(_QUESTIONS)))
        for q in range(workload.questions):
            template = templates[q % len(templates)]
            rows.append({"system": system, "prompt": template.format(rng.choice(_WORDS)),
                         "output_tokens_count": workload.output_tokens})
    rng.shuffle(rows)
    return rows


def write_dataset(path: Path, workload: Workload) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in dataset(workload)))
    return path


def scenario(target: str, data: Path, output: Path, streams: int, requests: int) -> dict[str, Any]:
    """guidellm 0.8.1's scenario (`guidellm run --scenario FILE`): `streams` requests in flight at all times
    (closed loop) until `requests` are done, streamed chat completions, every request kept in the report."""
    return {"spec": {
        "backend": {"kind": "openai_http", "target": target, "model": "gemma",
                    "request_format": "/v1/chat/completions", "timeout": 600},
        "profile": {"kind": "concurrent", "streams": streams},
        "data": [{"kind": "json_file", "path": str(data)}],
        "constraints": [{"kind": "max_requests", "count": requests}],
        "outputs": [{"kind": "json", "path": str(output)}],
        "metrics": {"kind": "generative", "sample_size": None},
    }}


def summarize(report: Mapping[str, Any]) -> dict[str, Any]:
    """One guidellm JSON report (one benchmark) -> the table's numbers. Throughput and TTFT are guidellm's own
    statistics over the successful requests; the cached share adds up each answer's
    usage.prompt_tokens_details.cached_tokens (llama-server's timings.cache_n) that guidellm keeps per request."""
    benchmarks = report.get("benchmarks") or []
    if len(benchmarks) != 1:
        raise ValueError(f"expected one benchmark in guidellm's report, found {len(benchmarks)}")
    bench = benchmarks[0]
    metrics = bench["metrics"]
    ttft = metrics["time_to_first_token_ms"]["successful"]["percentiles"]
    done = bench["requests"]["successful"]
    prompt = sum(r["input_metrics"].get("text_tokens") or 0 for r in done)
    cached = sum(r["input_metrics"].get("cached_tokens") or 0 for r in done)
    totals = metrics["request_totals"]
    return {"requests": totals["successful"], "errored": totals["errored"], "incomplete": totals["incomplete"],
            "duration_s": bench["duration"],
            "requests_per_second": metrics["requests_per_second"]["successful"]["mean"],
            "output_tokens_per_second": metrics["output_tokens_per_second"]["successful"]["mean"],
            "ttft_p50_ms": ttft["p50"], "ttft_p90_ms": ttft["p90"],
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_share": cached / prompt if prompt else math.nan, **cold_prefills(done)}


def _system(request: Mapping[str, Any]) -> str:
    """The system prompt guidellm sent (its request_args keep the body), the key of what requests share."""
    messages = json.loads(request["request_args"])["body"]["messages"]
    return json.dumps(messages[0]["content"]) if messages and messages[0].get("role") == "system" else ""


def cold_prefills(requests: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Why prompts were prefilled whole (under half of them from cache): `cold` all of them; `cold_first` the
    first request of its system prompt (nothing could have cached it); `cold_in_flight` one that started while an
    earlier request with the same system prompt was still in flight (a replica's slots share no prompt while it is
    being served: only a finished one can be reused); the rest went to a replica that had not served the prompt."""
    timed = sorted(requests, key=lambda r: r["info"]["timings"]["request_start"])
    ends: dict[str, list[float]] = {}
    cold = first = in_flight = 0
    for request in timed:
        key, start = _system(request), request["info"]["timings"]["request_start"]
        metrics = request["input_metrics"]
        if (metrics.get("cached_tokens") or 0) * 2 < (metrics.get("text_tokens") or 0):
            cold += 1
            earlier = ends.get(key, [])
            first += not earlier
            in_flight += any(end > start for end in earlier)
        ends.setdefault(key, []).append(request["info"]["timings"]["request_end"])
    return {"cold": cold, "cold_first": first, "cold_in_flight": in_flight}


def combine(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several runs of one way: the median of each number, and (min, max) of each."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    return {"median": {k: statistics.median(run[k] for run in runs) for k in keys},
            "range": {k: (min(run[k] for run in runs), max(run[k] for run in runs)) for k in keys},
            "runs": len(runs)}


def verdict(ways: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's goal, on the medians: PrefixAffinity vs the Service."""
    service, prefix = ways["service"]["median"], ways["prefix_affinity"]["median"]
    throughput = prefix["requests_per_second"] / service["requests_per_second"]
    ttft_p90 = prefix["ttft_p90_ms"] / service["ttft_p90_ms"]
    return {"throughput_ratio": throughput, "ttft_p90_ratio": ttft_p90,
            "met": throughput >= GOAL_THROUGHPUT or ttft_p90 <= GOAL_TTFT_P90}


def _cell(combined: Mapping[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    value = format(combined["median"][key] * scale, fmt)
    if combined["runs"] < 2:
        return value
    low, high = combined["range"][key]
    return f"{value} ({format(low * scale, fmt)}–{format(high * scale, fmt)})"


def render(results: Mapping[str, Any]) -> str:
    ways = results["ways"]
    runs = ways["service"]["runs"]
    lines = [f"shared-prefix benchmark (guidellm {results['guidellm']}): {results['workload']}; "
             f"{results['streams']} streams; 2 replicas of gemma-3-270m Q4_K_M, one core each; "
             f"{runs} run{'s' if runs != 1 else ''}" + (", median (min–max)" if runs > 1 else ""), "",
             "| front | requests/s | output tokens/s | TTFT p50 | TTFT p90 | prompt tokens from cache "
             "| prompts prefilled whole: all / first of their prefix / its prefix in flight |",
             "|---|---|---|---|---|---|---|"]
    for way in WAYS:
        c = ways[way]
        lines.append(f"| {WAY_LABELS[way]} | {_cell(c, 'requests_per_second', '.3f')} | "
                     f"{_cell(c, 'output_tokens_per_second', '.1f')} | {_cell(c, 'ttft_p50_ms', '.0f')} ms"
                     f" | {_cell(c, 'ttft_p90_ms', '.0f')} ms | {_cell(c, 'cached_share', '.0%')} | "
                     + " / ".join(_cell(c, key, '.0f') for key in ('cold', 'cold_first', 'cold_in_flight')) + " |")
    v = results["verdict"]
    lines += ["", f"PrefixAffinity vs the Service: {v['throughput_ratio']:.2f}x requests/s (goal >= "
              f"{GOAL_THROUGHPUT}x), TTFT p90 {v['ttft_p90_ratio']:.2f}x (goal <= {GOAL_TTFT_P90}x): goal "
              + ("met" if v["met"] else "NOT met")]
    failed = {way: ways[way]["median"]["errored"] + ways[way]["median"]["incomplete"] for way in WAYS}
    if any(failed.values()):
        lines.append(f"requests that failed or did not finish (median per run): {failed}")
    return "\n".join(lines)
