"""Placement of a model split over llama.cpp RPC workers (pure): how many layers the leader llama-server
keeps, how many each ggml-rpc-server worker holds (`-ngl`, `--tensor-split`), and the memory every one of them
then needs. Callers import it from here: fit/__init__ does not re-export it, because this module formats its
messages with fit/__init__'s helpers.

How the pinned llama.cpp (b11312, src/llama-model.cpp load_tensors, src/llama.cpp) places a model:

- there are n_layer + 1 slots: the blocks (slot i is blk.i) and the output head (slot n_layer). `-ngl N`
  offloads the last N slots (i_gpu_start = max(n_layer + 1 - N, 0)); the slots below stay on the leader's CPU,
  and so does token_embd, always.
- the devices are the `--rpc` endpoints in order (RPC devices go to the front of the list; the leader has no
  GPU, and a CPU-only ggml-rpc-server exposes one device). Offloaded slot il goes to the first device whose
  cumulative normalized split exceeds (il - i_gpu_start) / N, so integer `--tensor-split` values summing to N
  give device j exactly k_j consecutive slots, device 0 the first.
- a tied output head (no output.weight) loads token_embd again on the device holding the output slot; kept on
  the leader it is the same mapped data.
- a block's KV cache and recurrent state live with the block; a device holding layers gets a compute buffer.

The per-slot costs come from `estimate()` (one GPU standing for a worker), not from formulas of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise

from ..api.v1beta1 import ModelMemoryShape
from . import format_bytes, request_quantity
from .estimate import GPU_CONTEXT_OVERHEAD, GPU_HOST_OVERHEAD, DeviceEstimate, FitSettings, MiB, estimate

RPC_WORKER_OVERHEAD = 16 * MiB
"""Resident memory of a ggml-rpc-server beyond its buffers: binary, threads, the CPU backend. Measured: 5.0 MiB
idle; gemma-3-270m split 18,1 over two workers (contextSize 2048, one slot, after a 1,500-token prompt) measured
121.5 and 177.4 MiB RSS where the estimate with 16 MiB says 122.2 and 206.0 (docs/distributed.md)."""
MAX_WORKERS = 64
"""The largest worker count `NoPlacement.workers_needed` looks at."""
_SEARCH_STEPS = 40
"""Bisections of the balancing ratio: 2^-40 of a device's memory is below a byte for any real size."""


@dataclass(frozen=True)
class Placement:
    """Where the layers go, and what each container then holds."""

    gpu_layers: int
    """`-ngl`: slots offloaded to the workers (n_layer + 1: every block and the output head)."""
    worker_slots: tuple[int, ...]
    """Slots per worker in `--rpc` order (the `--tensor-split` values); they sum to `gpu_layers`."""
    leader: DeviceEstimate
    """What the leader's container holds (name `leader`)."""
    workers: tuple[DeviceEstimate, ...]
    """What each worker holds (names `worker0`, ...)."""

    def tensor_split(self) -> str:
        """`--tensor-split` as llama-server takes it: whole slot counts, which llama.cpp places exactly."""
        return ",".join(str(slots) for slots in self.worker_slots)


@dataclass(frozen=True)
class NoPlacement:
    """Why no split fits, in one line for the Fits condition."""

    message: str
    workers_needed: int | None
    """The smallest worker count of the same memory that fits (None: no count up to `MAX_WORKERS` does)."""


@dataclass(frozen=True)
class _Costs:
    """The parts of the estimate a placement moves between devices; block parts are totals over all blocks,
    spread uniformly per block as estimate() spreads them."""

    blocks: int
    worker_block_weights: int
    leader_block_weights: int
    """On the leader's CPU, with the copies the CPU backend repacks."""
    kv_cache: int
    recurrent_state: int
    output_on_worker: int
    """The output head on a worker (tied: token_embd again)."""
    output_on_leader: int
    worker_compute: int
    leader_base: DeviceEstimate
    """The leader holding no slot: embeddings, other weights, input and output buffers, checkpoint, overhead."""
    leader_compute_with_blocks: int
    worker_overhead: int = RPC_WORKER_OVERHEAD
    """The process beside its buffers; a GPU worker's adds the GPU's context (GPU_CONTEXT_OVERHEAD)."""

    @property
    def slots(self) -> int:
        return self.blocks + 1

    def _part(self, total: int, start: int, end: int) -> int:
        """Blocks [start, end)'s share of `total`: differences of rounded prefixes, so shares add up exactly."""
        n = max(self.blocks, 1)
        start, end = min(start, self.blocks), min(end, self.blocks)
        return (2 * end * total + n) // (2 * n) - (2 * start * total + n) // (2 * n)

    def worker(self, name: str, start: int, end: int) -> DeviceEstimate:
        device = DeviceEstimate(name, overhead=self.worker_overhead)
        if end > start:
            device.weights = self._part(self.worker_block_weights, start, end)
            device.weights += self.output_on_worker if end > self.blocks else 0
            device.kv_cache = self._part(self.kv_cache, start, end)
            device.recurrent_state = self._part(self.recurrent_state, start, end)
            device.compute = self.worker_compute
        return device

    def leader(self, end: int) -> DeviceEstimate:
        """The leader holding slots [0, end)."""
        device = replace(self.leader_base)
        if end > 0:
            device.weights += self._part(self.leader_block_weights, 0, end)
            device.weights += self.output_on_leader if end > self.blocks else 0
            device.kv_cache += self._part(self.kv_cache, 0, end)
            device.recurrent_state += self._part(self.recurrent_state, 0, end)
            if self.blocks:
                device.compute = self.leader_compute_with_blocks
        return device

    @property
    def worker_fixed(self) -> int:
        """A worker holding layers, beside them: its compute buffer and the process."""
        return self.worker_compute + self.worker_overhead

    @property
    def leader_fixed(self) -> int:
        """The leader holding blocks, beside them: its compute buffer grows to a whole graph's."""
        base = self.leader_base
        return base.total + (self.leader_compute_with_blocks - base.compute if self.blocks else 0)

    def layers(self, start: int, end: int) -> int:
        """What slots [start, end) cost a worker beside its fixed part: weights, KV cache, recurrent state."""
        device = self.worker("", start, end)
        return device.weights + device.kv_cache + device.recurrent_state


def _costs(shape: ModelMemoryShape, settings: FitSettings, trained_context: int | None) -> _Costs:
    # One GPU stands for a worker: every slot offloaded, only the blocks, or none.
    def one_gpu(layers: int) -> tuple[DeviceEstimate, DeviceEstimate]:
        fit = estimate(shape, replace(settings, gpu_count=1, gpu_layers=layers, tensor_split=None,
                                      split_mode=None), trained_context=trained_context)
        return fit.host, fit.gpus[0]

    n = shape.layers
    every_host, every_gpu = one_gpu(n + 1)
    blocks_host, blocks_gpu = one_gpu(n)
    none_host, _ = one_gpu(0)
    # The leader loads no GPU runtime: the host overhead of a GPU server is not its.
    leader_base = replace(every_host, name="leader", overhead=every_host.overhead - GPU_HOST_OVERHEAD)
    return _Costs(
        blocks=n,
        worker_block_weights=blocks_gpu.weights,
        leader_block_weights=none_host.weights - blocks_host.weights,
        kv_cache=every_gpu.kv_cache,
        recurrent_state=every_gpu.recurrent_state,
        output_on_worker=every_gpu.weights - blocks_gpu.weights,
        output_on_leader=blocks_host.weights - every_host.weights,
        worker_compute=every_gpu.compute,
        leader_base=leader_base,
        leader_compute_with_blocks=none_host.compute,
    )


class _Devices:
    """The devices that take slots, in llama.cpp's order: the leader first when it has a memory, then the
    workers. Every cut is contiguous: device k holds slots [start, end), the next one starts at end."""

    def __init__(self, costs: _Costs, *, workers: int, worker_memory: int, leader_memory: int | None) -> None:
        self.costs = costs
        self.leads = leader_memory is not None
        self.capacity = ([leader_memory] if leader_memory is not None else []) + [worker_memory] * max(workers, 0)
        # The searches ask for the same ranges again and again; the estimate of one is built once.
        self._totals: dict[tuple[bool, int, int], int] = {}

    def device(self, k: int, start: int, end: int) -> DeviceEstimate:
        if self.leads and k == 0:
            return self.costs.leader(end)
        return self.costs.worker(f"worker{k - 1 if self.leads else k}", start, end)

    def use(self, k: int, start: int, end: int) -> float:
        """The share of device k's memory that slots [start, end) take."""
        key = (self.leads and k == 0, start, end)
        total = self._totals.get(key)
        if total is None:
            total = self._totals[key] = self.device(k, start, end).total
        return total / max(self.capacity[k], 1)

    def latest_starts(self, ratio: float) -> list[int] | None:
        """For each k, the first slot from which devices k.. can hold every later slot within `ratio` of their
        memory: each takes as many as it can from the end, which no other cut beats (a range costs no more
        than any range around it); None when some device cannot hold even nothing."""
        starts = [0] * len(self.capacity) + [self.costs.slots]
        for k in reversed(range(len(self.capacity))):
            start = starts[k + 1]
            if self.use(k, start, start) > ratio:
                return None
            while start > 0 and self.use(k, start - 1, starts[k + 1]) <= ratio:
                start -= 1
            starts[k] = start
        return starts

    def fits(self, ratio: float = 1.0) -> bool:
        starts = self.latest_starts(ratio) if self.capacity else None
        return starts is not None and starts[0] == 0

    def balanced(self) -> list[int]:
        """Slot counts per device: the smallest largest relative use there is, and within it the most even
        uses (least sum of squares). Filling each device to that largest use in turn would leave the last ones
        short, even empty."""
        low, high = 0.0, 1.0
        for _ in range(_SEARCH_STEPS):
            middle = (low + high) / 2
            low, high = (low, middle) if self.fits(middle) else (middle, high)
        starts = self.latest_starts(high)
        assert starts is not None and starts[0] == 0, "balanced() after fits()"
        total = self.costs.slots
        # score: the least sum of squared uses of devices 0..k-1 whose cut ends at a slot; back: its start.
        score: dict[int, float] = {0: 0.0}
        back: list[dict[int, int]] = []
        for k in range(len(self.capacity)):
            reached: dict[int, float] = {}
            back.append({})
            for start, so_far in score.items():
                for end in range(max(start, starts[k + 1]), total + 1):  # below starts[k+1] the rest cannot fit
                    use = self.use(k, start, end)
                    if use > high:
                        break
                    if end not in reached or so_far + use * use < reached[end]:
                        reached[end], back[k][end] = so_far + use * use, start
            score = reached
        ends = [total]
        for step in reversed(back):
            ends.append(step[ends[-1]])
        ends.reverse()
        return [end - start for start, end in pairwise(ends)]


def place(shape: ModelMemoryShape, settings: FitSettings, *, workers: int, worker_memory: int,
          leader_memory: int | None, trained_context: int | None = None,
          worker_memory_text: str | None = None, gpu_workers: bool = False) -> Placement | NoPlacement:
    """The split of this model over `workers` ggml-rpc-servers of `worker_memory` bytes each. `leader_memory`
    None: the leader keeps only its fixed part and every slot goes to the workers; set, the leader takes the
    first slots as well, within it. `worker_memory_text` is the memory as the user wrote it, for messages.
    The GPU settings in `settings` (gpuCount, gpuLayers, tensorSplit, splitMode) are not read: this chooses them.
    `gpu_workers`: each worker lends a GPU, whose memory `worker_memory` is; its context counts there too."""
    costs = _costs(shape, settings, trained_context)
    if gpu_workers:
        costs = replace(costs, worker_overhead=RPC_WORKER_OVERHEAD + GPU_CONTEXT_OVERHEAD)
    devices = _Devices(costs, workers=workers, worker_memory=worker_memory, leader_memory=leader_memory)
    if devices.fits():
        counts = devices.balanced()
        leader_slots = counts[0] if devices.leads else 0
        slots = tuple(counts[1:] if devices.leads else counts)
        start, held = leader_slots, []
        for index, count in enumerate(slots):
            held.append(costs.worker(f"worker{index}", start, start + count))
            start += count
        return Placement(gpu_layers=costs.slots - leader_slots, worker_slots=slots, leader=costs.leader(leader_slots),
                         workers=tuple(held))
    return _no_placement(costs, workers=workers, worker_memory=worker_memory, leader_memory=leader_memory,
                         memory_text=worker_memory_text or format_bytes(worker_memory))


def _no_placement(costs: _Costs, *, workers: int, worker_memory: int, leader_memory: int | None,
                  memory_text: str) -> NoPlacement:
    alone = costs.leader(0).total
    if leader_memory is not None and alone > leader_memory:  # no worker count helps
        return NoPlacement(f"the leader needs {format_bytes(alone)} for the embeddings, its buffers and "
                           f"overhead before any layer, more than its {format_bytes(leader_memory)}", None)
    needed = next((count for count in range(max(workers, 0) + 1, MAX_WORKERS + 1)
                   if _Devices(costs, workers=count, worker_memory=worker_memory, leader_memory=leader_memory)
                   .fits()), None)
    fixed = costs.worker_fixed
    largest_slot = max(range(costs.slots), key=lambda slot: costs.layers(slot, slot + 1))
    largest = costs.layers(largest_slot, largest_slot + 1)
    if needed is None and fixed + largest > worker_memory:
        what = "the output head takes" if largest_slot == costs.blocks else "one layer takes"
        return NoPlacement(f"{what} {format_bytes(largest)}, more than a worker of {memory_text} holds beside its "
                           f"compute buffer: give each worker at least {request_quantity(fixed + largest)}", None)
    layers = costs.layers(0, costs.slots)
    room = f"{_workers(workers)} {'holds' if workers == 1 else 'hold'} " \
        f"{format_bytes(max(0, workers * (worker_memory - fixed)))} beside {'its' if workers == 1 else 'their'} " \
        f"compute buffer{'' if workers == 1 else 's'}"
    if leader_memory is not None:
        room += f", the leader {format_bytes(max(0, leader_memory - costs.leader_fixed))} beside its own part"
    count = f"{_workers(needed)} of {memory_text} (has {workers})" if needed else \
        f"more than {MAX_WORKERS} workers of {memory_text}"
    return NoPlacement(f"needs {count}: the layers and their KV cache take {format_bytes(layers)}, {room}", needed)


def _workers(count: int) -> str:
    return f"{count} worker{'' if count == 1 else 's'}"
