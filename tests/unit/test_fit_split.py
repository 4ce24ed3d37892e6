"""The placement of a model split over llama.cpp RPC workers: `-ngl`, `--tensor-split`, and what the leader and
each worker then hold (fit/split.py). Pure arithmetic over the estimate of test_fit's shapes."""

from __future__ import annotations

import pytest

from llama_operator.api.v1beta1 import ModelMemoryShape
from llama_operator.fit import FitSettings, estimate, format_bytes
from llama_operator.fit.estimate import GiB, MiB
from llama_operator.fit.split import RPC_WORKER_OVERHEAD, NoPlacement, Placement, place
from tests.unit.test_fit import DENSE, GEMMA

CONTEXT = FitSettings(context_size=8192)
# A model whose every slot costs the same: seven blocks without a KV cache and an output head of one block.
EVEN = ModelMemoryShape(
    weight_bytes=9 * 64 * MiB, layer_weight_bytes=7 * 64 * MiB, embedding_weight_bytes=64 * MiB,
    output_weight_bytes=64 * MiB, layers=7, vocab_size=32_000, embedding_length=1024, feed_forward_length=4096,
    head_count=16,
)  # fmt: skip
RECURRENT = ModelMemoryShape(
    weight_bytes=GiB, layer_weight_bytes=GiB // 2, embedding_weight_bytes=GiB // 4, output_weight_bytes=GiB // 4,
    layers=24, vocab_size=50_000, embedding_length=2048, feed_forward_length=8192, head_count=16,
    recurrent_layers=24, recurrent_state_width=2_000_000,
)  # fmt: skip


def _placed(shape: ModelMemoryShape, *, workers: int, worker_memory: int, leader_memory: int | None) -> Placement:
    result = place(shape, CONTEXT, workers=workers, worker_memory=worker_memory, leader_memory=leader_memory)
    assert isinstance(result, Placement), result
    return result


def _refused(shape: ModelMemoryShape, *, workers: int, worker_memory: int, leader_memory: int | None,
             worker_memory_text: str | None = None) -> NoPlacement:
    result = place(shape, CONTEXT, workers=workers, worker_memory=worker_memory, leader_memory=leader_memory,
                   worker_memory_text=worker_memory_text)
    assert isinstance(result, NoPlacement), result
    return result


CASES = [
    (DENSE, 1, 64 * GiB, None), (DENSE, 2, 8 * GiB, None), (DENSE, 3, 4 * GiB, None), (DENSE, 5, 2 * GiB, None),
    (DENSE, 2, 4 * GiB, 4 * GiB), (DENSE, 1, 7 * GiB, 3 * GiB),
    (GEMMA, 1, GiB, None), (GEMMA, 3, 512 * MiB, None), (GEMMA, 2, 512 * MiB, 512 * MiB),
    (RECURRENT, 4, GiB, None), (RECURRENT, 2, GiB, 2 * GiB), (EVEN, 3, GiB, None),
]


@pytest.mark.parametrize(("shape", "workers", "memory", "leader"), CASES)
def test_the_split_places_every_slot_once_and_every_device_fits(shape: ModelMemoryShape, workers: int,
                                                                memory: int, leader: int | None) -> None:
    placed = _placed(shape, workers=workers, worker_memory=memory, leader_memory=leader)
    assert len(placed.worker_slots) == len(placed.workers) == workers
    assert sum(placed.worker_slots) == placed.gpu_layers <= shape.layers + 1
    if leader is None:
        assert placed.gpu_layers == shape.layers + 1
    assert all(worker.total <= memory for worker in placed.workers)
    assert leader is None or placed.leader.total <= leader
    assert [w.name for w in placed.workers] == [f"worker{i}" for i in range(workers)]
    assert placed.leader.name == "leader"
    # Nothing is lost or counted twice: KV cache and recurrent state add up to the one-device estimate's.
    whole = estimate(shape, CONTEXT)
    devices = [placed.leader, *placed.workers]
    assert sum(d.kv_cache for d in devices) == pytest.approx(whole.host.kv_cache, abs=2)
    assert sum(d.recurrent_state for d in devices) == pytest.approx(whole.host.recurrent_state, abs=2)
    tied_copy = shape.embedding_weight_bytes if not shape.output_weight_bytes and placed.gpu_layers else 0
    assert sum(d.weights for d in devices) == pytest.approx(shape.weight_bytes + tied_copy, abs=2)
    # A worker without slots holds the process alone; one with slots a compute buffer too.
    for count, worker in zip(placed.worker_slots, placed.workers, strict=True):
        assert (worker.compute > 0) == (count > 0) and worker.overhead == RPC_WORKER_OVERHEAD


def test_one_large_worker_holds_what_one_gpu_would() -> None:
    placed = _placed(DENSE, workers=1, worker_memory=64 * GiB, leader_memory=None)
    assert (placed.gpu_layers, placed.worker_slots, placed.tensor_split()) == (33, (33,), "33")
    gpu = estimate(DENSE, FitSettings(context_size=8192, gpu_count=1))
    (worker,) = placed.workers
    assert (worker.weights, worker.kv_cache, worker.compute) == (gpu.gpus[0].weights, gpu.gpus[0].kv_cache,
                                                                gpu.gpus[0].compute)
    assert worker.weights == DENSE.layer_weight_bytes + DENSE.output_weight_bytes
    assert worker.total == gpu.gpus[0].total - gpu.gpus[0].overhead + RPC_WORKER_OVERHEAD
    # The leader keeps the embeddings, its small buffers and the process, without a GPU runtime.
    assert placed.leader.weights == DENSE.embedding_weight_bytes
    assert placed.leader.kv_cache == 0 and placed.leader.compute == gpu.host.compute
    assert placed.leader.overhead < gpu.host.overhead


def test_equal_workers_get_even_shares() -> None:
    # Every slot of EVEN costs the same: 8 slots over 3 workers are 3, 3 and 2 in some order.
    placed = _placed(EVEN, workers=3, worker_memory=GiB, leader_memory=None)
    assert sorted(placed.worker_slots) == [2, 3, 3]
    # DENSE's output head costs two blocks (0.5 GiB against 224 MiB of weights + 32 MiB of KV cache): the worker
    # that holds it takes two blocks fewer, and the totals come out equal.
    placed = _placed(DENSE, workers=2, worker_memory=8 * GiB, leader_memory=None)
    assert placed.worker_slots == (17, 16) and placed.tensor_split() == "17,16"
    assert placed.workers[0].total == placed.workers[1].total
    placed = _placed(DENSE, workers=3, worker_memory=4 * GiB, leader_memory=None)
    totals = [worker.total for worker in placed.workers]
    assert max(totals) - min(totals) <= 256 * MiB  # one block with its KV cache


def test_a_heavy_output_head_gets_a_worker_of_its_own_and_the_rest_is_shared() -> None:
    # gemma3's tied head is token_embd again (170 MiB) on the worker that holds the output slot: the largest
    # share there is. The 18 blocks split evenly over the other two; filling worker0 first would leave worker1
    # with almost nothing.
    placed = _placed(GEMMA, workers=3, worker_memory=512 * MiB, leader_memory=None)
    assert placed.worker_slots == (9, 9, 1)
    assert placed.workers[2].weights == GEMMA.embedding_weight_bytes


def test_a_leader_with_memory_takes_the_first_slots() -> None:
    placed = _placed(DENSE, workers=2, worker_memory=4 * GiB, leader_memory=4 * GiB)
    leader_slots = DENSE.layers + 1 - placed.gpu_layers
    assert 0 < leader_slots < DENSE.layers and placed.worker_slots == (12, 11)
    per_block = DENSE.layer_weight_bytes // DENSE.layers
    assert placed.leader.weights == DENSE.embedding_weight_bytes + leader_slots * per_block
    assert placed.leader.kv_cache == leader_slots * 8192 * 32768 * 4 // 32
    # A leader that holds blocks runs them: its compute buffer is the whole graph's, as on a CPU server.
    assert placed.leader.compute == estimate(DENSE, CONTEXT).host.compute
    uses = [placed.leader.total / (4 * GiB)] + [w.total / (4 * GiB) for w in placed.workers]
    assert max(uses) - min(uses) < 0.07  # balanced: a block is 6% of 4 GiB


def test_a_leader_with_room_for_everything_keeps_it_all() -> None:
    placed = _placed(DENSE, workers=0, worker_memory=GiB, leader_memory=64 * GiB)
    assert (placed.gpu_layers, placed.worker_slots, placed.tensor_split()) == (0, (), "")
    assert placed.leader.total == estimate(DENSE, CONTEXT).host.total  # the CPU server's estimate, exactly


def test_too_few_workers_names_the_count_that_fits() -> None:
    refused = _refused(DENSE, workers=2, worker_memory=4 * GiB, leader_memory=None, worker_memory_text="4Gi")
    assert refused.workers_needed == 3
    assert refused.message.startswith("needs 3 workers of 4Gi (has 2): the layers and their KV cache take 8.50 GiB, "
                                      "2 workers hold ")
    assert "beside their compute buffers" in refused.message
    _placed(DENSE, workers=3, worker_memory=4 * GiB, leader_memory=None)
    # Without the text the memory is formatted; with a leader, its room is named too.
    refused = _refused(DENSE, workers=1, worker_memory=2 * GiB, leader_memory=GiB)
    assert refused.message.startswith(f"needs {refused.workers_needed} workers of 2.00 GiB (has 1)")
    assert "1 worker holds" in refused.message and "the leader " in refused.message
    assert refused.workers_needed is not None
    _placed(DENSE, workers=refused.workers_needed, worker_memory=2 * GiB, leader_memory=GiB)
    _refused(DENSE, workers=refused.workers_needed - 1, worker_memory=2 * GiB, leader_memory=GiB)


def test_a_layer_larger_than_a_worker_asks_for_more_memory_per_worker() -> None:
    refused = _refused(DENSE, workers=4, worker_memory=200 * MiB, leader_memory=None, worker_memory_text="200Mi")
    assert refused.workers_needed is None
    # DENSE's largest slot is its output head (512 MiB); gemma3's too (token_embd again).
    assert refused.message.startswith("the output head takes 512.0 MiB, more than a worker of 200Mi holds beside its "
                                      "compute buffer: give each worker at least ")
    wide = DENSE.model_copy(update={"output_weight_bytes": 0, "embedding_weight_bytes": 64 * MiB,
                                    "weight_bytes": DENSE.layer_weight_bytes + 64 * MiB})
    refused = _refused(wide, workers=8, worker_memory=256 * MiB, leader_memory=None, worker_memory_text="256Mi")
    assert refused.message.startswith("one layer takes 256.0 MiB, more than a worker of 256Mi")
    # The memory it asks for holds one layer per worker: 32 blocks and the (tied) output head on 33 workers.
    asked = refused.message.rsplit(" ", 1)[1]
    assert asked == "396Mi"
    bigger = _refused(wide, workers=8, worker_memory=412 * MiB, leader_memory=None)
    assert bigger.workers_needed == 33
    assert _placed(wide, workers=33, worker_memory=412 * MiB, leader_memory=None).worker_slots == (1,) * 33


def test_a_leader_too_small_for_its_own_part() -> None:
    refused = _refused(DENSE, workers=8, worker_memory=8 * GiB, leader_memory=256 * MiB)
    assert refused.workers_needed is None and refused.message.startswith("the leader needs ")


@pytest.mark.parametrize(("shape", "output_on_worker", "output_on_leader"), [
    (DENSE, DENSE.output_weight_bytes, DENSE.output_weight_bytes),
    (GEMMA, GEMMA.embedding_weight_bytes, 0),  # tied: token_embd again on a worker, the mapped one on the leader
])
def test_the_output_head_costs_where_it_lives(shape: ModelMemoryShape, output_on_worker: int,
                                              output_on_leader: int) -> None:
    placed = _placed(shape, workers=1, worker_memory=64 * GiB, leader_memory=None)
    assert placed.workers[0].weights == shape.layer_weight_bytes + output_on_worker
    assert placed.leader.weights == shape.weight_bytes - shape.layer_weight_bytes - shape.output_weight_bytes
    kept = _placed(shape, workers=0, worker_memory=GiB, leader_memory=64 * GiB)
    assert kept.leader.weights == shape.weight_bytes - shape.output_weight_bytes + output_on_leader


def test_no_workers_and_no_leader_memory_needs_one() -> None:
    refused = _refused(GEMMA, workers=0, worker_memory=GiB, leader_memory=None)
    assert refused.workers_needed == 1 and refused.message.startswith("needs 1 worker of 1.00 GiB (has 0)")


def test_the_worked_example_in_the_docs() -> None:
    # docs/memory-fit.md#split-over-rpc-workers quotes these numbers.
    placed = _placed(DENSE, workers=2, worker_memory=8 * GiB, leader_memory=None)
    assert [format_bytes(w.total) for w in placed.workers] == ["4.39 GiB", "4.39 GiB"]
    assert [format_bytes(w.kv_cache) for w in placed.workers] == ["544.0 MiB", "480.0 MiB"]
    assert (format_bytes(placed.leader.total), format_bytes(placed.workers[0].compute)) == ("575.4 MiB", "124.0 MiB")
    assert _refused(DENSE, workers=2, worker_memory=4 * GiB, leader_memory=None, worker_memory_text="4Gi").message \
        == "needs 3 workers of 4Gi (has 2): the layers and their KV cache take 8.50 GiB, 2 workers hold 7.73 GiB " \
        "beside their compute buffers"
    placed = _placed(DENSE, workers=3, worker_memory=4 * GiB, leader_memory=None)
    assert placed.tensor_split() == "11,11,11"
    assert [format_bytes(w.total) for w in placed.workers] == ["2.89 GiB", "2.89 GiB", "3.14 GiB"]
    placed = _placed(DENSE, workers=2, worker_memory=4 * GiB, leader_memory=4 * GiB)
    assert (placed.gpu_layers, placed.tensor_split(), format_bytes(placed.leader.total)) == (23, "12,11", "3.17 GiB")
    assert _refused(DENSE, workers=4, worker_memory=200 * MiB, leader_memory=None, worker_memory_text="200Mi") \
        .message.endswith("give each worker at least 652Mi")
