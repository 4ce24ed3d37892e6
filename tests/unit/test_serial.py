"""reconcile/serial.py: one run at a time per key, bursts folded, and every caller told the real outcome."""

from __future__ import annotations

import asyncio

import pytest

from llama_operator.reconcile.serial import Coalescer


class Job:
    """A job whose runs block until released; each run returns (or raises) what the test scripted."""

    def __init__(self, outcomes: list[object]) -> None:
        self.outcomes = outcomes
        self.runs = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self) -> object:
        outcome = self.outcomes[self.runs]
        self.runs += 1
        self.started.set()
        await self.gate.wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_single_caller_gets_the_result() -> None:
    job = Job(["ok"])
    job.gate.set()
    assert await Coalescer().run("k", job) == "ok"


async def test_triggers_during_a_run_cause_exactly_one_more_run() -> None:
    job = Job(["first", "second"])
    coalescer = Coalescer()
    first = asyncio.create_task(coalescer.run("k", job))
    await job.started.wait()
    burst = [asyncio.create_task(coalescer.run("k", job)) for _ in range(5)]
    await _settle()
    job.gate.set()
    results = await asyncio.gather(first, *burst)
    assert job.runs == 2
    assert results == ["first"] + ["second"] * 5  # the covered callers see the run that covered them


@pytest.mark.parametrize("failure", [RuntimeError("boom"), ValueError("bad")])
async def test_covered_callers_see_the_failure_of_the_run_that_covered_them(failure: Exception) -> None:
    job = Job(["first", failure])
    coalescer = Coalescer()
    first = asyncio.create_task(coalescer.run("k", job))
    await job.started.wait()
    covered = [asyncio.create_task(coalescer.run("k", job)) for _ in range(3)]
    await _settle()
    job.gate.set()
    assert await first == "first"
    for task in covered:
        with pytest.raises(type(failure), match=str(failure)):
            await task
    assert job.runs == 2


async def test_a_failed_run_does_not_poison_the_next_one() -> None:
    job = Job([RuntimeError("boom"), "ok"])
    job.gate.set()
    coalescer = Coalescer()
    with pytest.raises(RuntimeError):
        await coalescer.run("k", job)
    assert await coalescer.run("k", job) == "ok"


async def test_keys_do_not_wait_for_each_other() -> None:
    slow, fast = Job(["slow"]), Job(["fast"])
    fast.gate.set()
    coalescer = Coalescer()
    slow_task = asyncio.create_task(coalescer.run("a", slow))
    await slow.started.wait()
    assert await asyncio.wait_for(coalescer.run("b", fast), 1) == "fast"
    slow.gate.set()
    assert await slow_task == "slow"


async def test_cancelled_caller_does_not_leak_its_entry() -> None:
    job = Job(["ok"])
    coalescer = Coalescer()
    task = asyncio.create_task(coalescer.run("k", job))
    await job.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert coalescer._entries == {}
