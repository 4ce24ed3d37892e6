"""benchmarks/shared_prefix.py, the pure parts of the prefix-affinity benchmark: the workload it feeds guidellm,
guidellm's scenario, a real guidellm 0.8.1 report (trimmed to what is read) read into the table, and the verdict.
Runs neither guidellm nor llama-server."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from llama_operator.api.v1beta1 import RoutingSpec
from llama_operator.gateway.balancer import prompt_prefix

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import shared_prefix  # noqa: E402

REPORT = Path(__file__).parent / "golden" / "guidellm-0.8.1-report.json"


def guidellm_body(row: dict[str, object]) -> dict[str, object]:
    """The chat body guidellm 0.8.1 sends for a dataset row (its report's request_args): the `system` column as a
    system message, the `prompt` column as a text part of the user message."""
    return {"model": "gemma", "stream": True, "messages": [
        {"role": "system", "content": row["system"]},
        {"role": "user", "content": [{"type": "text", "text": row["prompt"]}]}]}


def test_every_document_is_asked_its_questions_in_a_mixed_order() -> None:
    workload = shared_prefix.Workload(documents=6, questions=3)
    rows = shared_prefix.dataset(workload)
    assert len(rows) == workload.requests == 18
    assert set(Counter(row["system"] for row in rows).values()) == {3}
    assert all(row["output_tokens_count"] == workload.output_tokens for row in rows)
    # Not grouped by document: the questions about one document arrive spread over the run.
    firsts = [row["system"] for row in rows[:3]]
    assert len(set(firsts)) > 1
    assert rows == shared_prefix.dataset(workload)  # seeded: every run sends the same requests in the same order
    assert rows != shared_prefix.dataset(shared_prefix.Workload(documents=6, questions=3, seed=1))


def test_the_gateway_keys_each_document_alone() -> None:
    """What PrefixAffinity hashes (the prompt's start, prefixCharacters long): the same for every question about a
    document, different between documents. With documents shorter than that, the question would be hashed too and
    affinity would hold per question, not per shared prompt."""
    chars = RoutingSpec().prefix_characters
    rows = shared_prefix.dataset(shared_prefix.Workload())
    keys: dict[str, set[str | None]] = {}
    for row in rows:
        keys.setdefault(str(row["system"]), set()).add(prompt_prefix(guidellm_body(row), chars))
    assert all(len(k) == 1 for k in keys.values())
    assert len({next(iter(k)) for k in keys.values()}) == len(keys) == shared_prefix.Workload().documents
    assert all(len(system) > chars for system in keys)


def test_dataset_file_is_json_lines(tmp_path: Path) -> None:
    workload = shared_prefix.Workload(documents=2, questions=2, document_words=50)
    path = shared_prefix.write_dataset(tmp_path / "w.jsonl", workload)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == shared_prefix.dataset(workload)
    assert set(json.loads(lines[0])) == {"system", "prompt", "output_tokens_count"}


def test_scenario_asks_for_a_closed_loop_and_every_request_in_the_report(tmp_path: Path) -> None:
    spec = shared_prefix.scenario("http://127.0.0.1:1", tmp_path / "d.jsonl", tmp_path / "r.json", 4, 64)["spec"]
    assert spec["backend"]["target"] == "http://127.0.0.1:1"
    assert spec["profile"] == {"kind": "concurrent", "streams": 4}
    assert spec["constraints"] == [{"kind": "max_requests", "count": 64}]
    assert spec["data"] == [{"kind": "json_file", "path": str(tmp_path / "d.jsonl")}]
    assert spec["outputs"] == [{"kind": "json", "path": str(tmp_path / "r.json")}]
    assert spec["metrics"]["sample_size"] is None  # None keeps every request's token counts (cached ones too)


def test_a_guidellm_report_reads_into_the_tables_numbers() -> None:
    summary = shared_prefix.summarize(json.loads(REPORT.read_text()))
    assert summary["requests"] == 6 and summary["errored"] == 0 and summary["incomplete"] == 0
    assert summary["requests_per_second"] == pytest.approx(1.4408, abs=1e-4)
    assert summary["output_tokens_per_second"] == pytest.approx(11.527, abs=1e-3)
    assert summary["ttft_p50_ms"] == pytest.approx(944.4, abs=0.1)
    assert summary["ttft_p90_ms"] == pytest.approx(1135.5, abs=0.1)
    assert summary["prompt_tokens"] == 226 + 235 + 232 + 237 + 228 + 236
    assert summary["cached_tokens"] == 202 + 206
    assert summary["cached_share"] == pytest.approx(408 / 1394)
    # Three system prompts, each first request cold; one tenant's second request went to the other replica (its
    # prompt, shorter than prefixCharacters, was hashed with the question).
    assert (summary["cold"], summary["cold_first"], summary["cold_in_flight"]) == (4, 3, 0)


def _request(system: str, start: float, end: float, cached: int, prompt: int = 800) -> dict[str, object]:
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "q"}]}
    return {"request_args": json.dumps({"body": body}), "info": {"timings": {"request_start": start,
                                                                             "request_end": end}},
            "input_metrics": {"text_tokens": prompt, "cached_tokens": cached}}


def test_cold_prefills_are_told_apart_by_why() -> None:
    requests = [_request("a", 0, 10, 0), _request("a", 5, 12, 0),  # a's second while its first was in flight
                _request("a", 11, 14, 780), _request("b", 12, 20, 0),  # warm; b's first
                _request("b", 21, 25, 300),  # under half from cache: prefilled on a replica that had not seen b
                ]
    assert shared_prefix.cold_prefills(list(reversed(requests))) == {"cold": 4, "cold_first": 2,
                                                                      "cold_in_flight": 1}


def test_a_report_with_other_than_one_benchmark_is_refused() -> None:
    with pytest.raises(ValueError, match="one benchmark"):
        shared_prefix.summarize({"benchmarks": []})


def _run(rps: float, p90: float, cached: float = 0.5) -> dict[str, float]:
    return {"requests_per_second": rps, "output_tokens_per_second": rps * 48, "ttft_p50_ms": p90 / 2,
            "ttft_p90_ms": p90, "cached_share": cached, "errored": 0, "incomplete": 0, "cold": 20,
            "cold_first": 12, "cold_in_flight": 5}


def _results(service: list[dict[str, float]], prefix: list[dict[str, float]]) -> dict[str, object]:
    ways = {"service": shared_prefix.combine(service), "least_in_flight": shared_prefix.combine(service),
            "prefix_affinity": shared_prefix.combine(prefix)}
    return {"guidellm": "0.8.1", "workload": "w", "streams": 4, "ways": ways, "verdict": shared_prefix.verdict(ways)}


def test_the_goal_is_met_by_throughput_or_by_ttft_p90_and_said_when_missed() -> None:
    by_throughput = _results([_run(1.0, 1000)], [_run(1.3, 1000)])
    assert by_throughput["verdict"]["met"]
    by_ttft = _results([_run(1.0, 1000)], [_run(1.0, 700)])
    assert by_ttft["verdict"]["met"]
    missed = _results([_run(1.0, 1000)], [_run(1.2, 800)])
    assert not missed["verdict"]["met"]
    table = shared_prefix.render(missed)
    assert "1.20x requests/s" in table and "TTFT p90 0.80x" in table and "goal NOT met" in table
    assert "| gateway, PrefixAffinity | 1.200 | 57.6 | 400 ms | 800 ms | 50% | 20 / 12 / 5 |" in table


def test_several_runs_show_the_median_and_the_range() -> None:
    results = _results([_run(1.0, 1000), _run(0.9, 1100), _run(1.1, 900)], [_run(1.5, 600)] * 3)
    assert results["ways"]["service"]["runs"] == 3
    table = shared_prefix.render(results)
    assert "3 runs, median (min–max)" in table
    assert "| Service (random per connection) | 1.000 (0.900–1.100) |" in table
    assert "goal met" in table
