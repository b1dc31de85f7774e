"""Discrete-event simulation of a pipeline Schedule: when every action runs, the bubbles, and activation memory.

Each rank runs its action list in order; an action starts when the rank is free and every producer it consumes
has finished (plus `Costs.comm` when the producer ran on another rank; chunks on the same rank hand tensors over
for free). This is the "squeeze" of the building-block framework: everything as early as the order allows.

Durations. `Costs` gives the time of one microbatch through one **1F1B stage** (1/pp of the layers). An action on
a chunk that is a fraction `f` of a stage (1/2 for V schedules, 1/v for interleaved) takes `f` times as long, so
makespans of schedules with different chunk counts are comparable. A fused BW takes backward_input +
backward_weight. Communication latency is not scaled.
Chunks of unequal cost (the chunk with the LM head and loss, the one with the embedding, EPAS sharing layers):
`chunk_costs` gives one `Costs` per chunk, each the time of one microbatch through **that chunk as a whole** (not
scaled by `f`); every action of chunk c then takes `chunk_costs[c].of(kind)`. The latency between ranks stays
`costs.comm` (the chunks' own `comm` are not read). Without `chunk_costs` every chunk costs `costs` x `f`, as
before. `rank_seconds` sums a rank's chunks (F + B + W of one microbatch): the slowest rank's sum bounds the
steady-state time per microbatch from below (V-Min, for one, idles in its steady state when F, B and W differ).

Memory. An F adds its chunk's activation when it starts; a B frees `b_frees` of it when it ends (the part only the
input gradient needed), the W frees the rest; a BW frees all. Units: one unit is the activation of one microbatch
on one 1F1B stage (so a V chunk holds 1/2 unit per microbatch and an interleaved chunk 1/v). With per-chunk byte
sizes (see memory_model.py) the same walk gives bytes.

Bubble rate of a rank = its idle time / makespan; of the schedule = 1 - total busy time / (pp * makespan).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

from effdist.pipeline.ir import B, BW, F, W, Action, ActionKind, Schedule, ScheduleError

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Costs:
    """Per-op times for one microbatch through one 1F1B stage, and the P2P latency between ranks."""

    forward: float = 1.0
    backward_input: float = 1.0
    backward_weight: float = 1.0
    comm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("forward", "backward_input", "backward_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"Costs.{name} = {value!r}: must be a positive number")
        if not (isinstance(self.comm, (int, float)) and math.isfinite(self.comm) and self.comm >= 0):
            raise ValueError(f"Costs.comm = {self.comm!r}: must be a number >= 0")

    def of(self, kind: ActionKind) -> float:
        return {F: self.forward, B: self.backward_input, W: self.backward_weight,
                BW: self.backward_input + self.backward_weight}[kind]

    @property
    def balanced(self) -> bool:
        return self.forward == self.backward_input == self.backward_weight

    def to_dict(self) -> dict[str, float]:
        return {"forward": self.forward, "backward_input": self.backward_input,
                "backward_weight": self.backward_weight, "comm": self.comm}


def run_in_order(orders: Sequence[Sequence[K]], producers: Callable[[K], Iterable[K]],
                 duration: Callable[[K], float], latency: Callable[[K, K], float]) -> dict[K, tuple[float, float]]:
    """Start/end of every item when each rank runs its list in order, each item as early as possible.

    `producers(item)` are the items it waits for; `latency(producer, item)` is added to the producer's end.
    Raises ScheduleError when the orders deadlock. Shared by the simulator and the schedule generators.
    """
    times: dict[K, tuple[float, float]] = {}
    heads = [0] * len(orders)
    free_at = [0.0] * len(orders)
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for rank, order in enumerate(orders):
            while heads[rank] < len(order):
                item = order[heads[rank]]
                ready = free_at[rank]
                blocked = False
                for p in producers(item):
                    if p not in times:
                        blocked = True
                        break
                    ready = max(ready, times[p][1] + latency(p, item))
                if blocked:
                    break
                end = ready + duration(item)
                times[item] = (ready, end)
                free_at[rank] = end
                heads[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [(r, order[heads[r]]) for r, order in enumerate(orders) if heads[r] < len(order)]
            raise ScheduleError(f"deadlock: every unfinished rank waits on another; first stuck: rank {stuck[0][0]} at {stuck[0][1]}")
    return times


@dataclass(frozen=True)
class Timing:
    action: Action
    rank: int
    start: float
    end: float


@dataclass
class RankResult:
    rank: int
    busy: float
    bubble_rate: float
    peak_activation_units: float
    # step curve [(time, activation units held from this time on)], beginning at time 0
    memory_units: list[tuple[float, float]]
    peak_activation_bytes: float | None = None
    memory_bytes: list[tuple[float, float]] | None = None


@dataclass
class SimulationResult:
    schedule: Schedule
    costs: Costs
    b_frees: float
    timings: list[list[Timing]]
    makespan: float
    bubble_rate: float
    ranks: list[RankResult] = field(default_factory=list)
    chunk_costs: list[Costs] | None = None  # per-chunk costs when simulated with them (then `costs` gives only comm)

    @property
    def peak_activation_units(self) -> float:
        return max(r.peak_activation_units for r in self.ranks)

    @property
    def peak_activation_bytes(self) -> float | None:
        values = [r.peak_activation_bytes for r in self.ranks]
        return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]

    def to_dict(self) -> dict:
        """The JSON contract of `effdist simulate --json` (see docs/pipeline.md)."""
        out = {
            "schedule": self.schedule.name,
            "pp": self.schedule.pp,
            "microbatches": self.schedule.num_microbatches,
            "chunks_per_rank": self.schedule.num_chunks // self.schedule.pp,
            "makespan": self.makespan,
            "bubble_rate": self.bubble_rate,
            "peak_activation_units": self.peak_activation_units,
            "costs": self.costs.to_dict(),
            "ranks": [],
        }
        if self.chunk_costs is not None:
            out["chunk_costs"] = [c.to_dict() for c in self.chunk_costs]
        if self.peak_activation_bytes is not None:
            out["peak_activation_bytes"] = self.peak_activation_bytes
        for r in self.ranks:
            entry = {"rank": r.rank, "peak_activation_units": r.peak_activation_units, "bubble_rate": r.bubble_rate}
            if r.peak_activation_bytes is not None:
                entry["peak_activation_bytes"] = r.peak_activation_bytes
            out["ranks"].append(entry)
        return out


def _memory_walk(timings: list[Timing], sizes: Sequence[float], b_frees: float) -> tuple[float, list[tuple[float, float]]]:
    """Peak and step curve of activation memory on one rank; frees at a time instant apply before allocations."""
    events: list[tuple[float, float]] = []
    for t in timings:
        size = sizes[t.action.chunk]
        if t.action.kind is F:
            events.append((t.start, size))
        elif t.action.kind is B:
            events.append((t.end, -b_frees * size))
        elif t.action.kind is W:
            events.append((t.end, -(1.0 - b_frees) * size))
        else:
            events.append((t.end, -size))
    events.sort(key=lambda e: (e[0], e[1]))
    level, peak = 0.0, 0.0
    curve = [(0.0, 0.0)]
    for time, delta in events:
        level += delta
        if abs(level) < 1e-9:
            level = 0.0
        peak = max(peak, level)
        if curve[-1][0] == time:
            curve[-1] = (time, level)
        else:
            curve.append((time, level))
    return peak, curve


def simulate(schedule: Schedule, costs: Costs | None = None, b_frees: float = 0.0,
             chunk_units: Sequence[float] | None = None, chunk_bytes: Sequence[float] | None = None,
             check: bool = True, chunk_costs: Sequence[Costs] | None = None) -> SimulationResult:
    """Simulate `schedule` (validated first).

    b_frees: fraction of a chunk's activation that its B frees (the rest waits for W); 0 keeps everything until W,
      which is how the Zero Bubble / PPCM generators count memory.
    chunk_units: activation per microbatch of each chunk in 1F1B-stage units (default: pp/num_chunks each).
    chunk_bytes: the same in bytes (see memory_model.chunk_activation_bytes); adds peak_activation_bytes.
    check: validate the schedule first; False only for a schedule validated before (the planner simulates one
      schedule under many costs).
    chunk_costs: one Costs per chunk, seconds (or units) of one microbatch through that whole chunk, used instead of
      `costs` x the chunk fraction; `costs` then supplies only the latency between ranks (`comm`).
    """
    costs = costs or Costs()
    if not 0.0 <= b_frees <= 1.0:
        raise ValueError(f"b_frees = {b_frees}: the fraction of activation freed by B must lie in [0, 1]")
    if check:
        schedule.validate()
    fraction = schedule.placement.chunk_fraction()
    units = list(chunk_units) if chunk_units is not None else [fraction] * schedule.num_chunks
    for name, sizes in (("chunk_units", units), ("chunk_bytes", chunk_bytes)):
        if sizes is not None and len(sizes) != schedule.num_chunks:
            raise ValueError(f"{name} has {len(sizes)} entries; the schedule has {schedule.num_chunks} chunks")

    per_chunk = list(chunk_costs) if chunk_costs is not None else None
    if per_chunk is not None:
        if len(per_chunk) != schedule.num_chunks:
            raise ValueError(f"chunk_costs has {len(per_chunk)} entries; the schedule has "
                             f"{schedule.num_chunks} chunks")
        if not all(isinstance(c, Costs) for c in per_chunk):
            raise ValueError("chunk_costs: give one simulate.Costs per chunk")

    kinds = schedule.backward_kind()
    rank_of = schedule.placement.rank_of_chunk
    if per_chunk is None:
        def duration(a: Action) -> float:
            return costs.of(a.kind) * fraction
    else:
        def duration(a: Action) -> float:
            return per_chunk[a.chunk].of(a.kind)
    times = run_in_order(
        schedule.actions,
        producers=lambda a: schedule.producers(a, kinds),
        duration=duration,
        latency=lambda p, a: 0.0 if rank_of[p.chunk] == rank_of[a.chunk] else costs.comm,
    )
    timings = [[Timing(a, rank, *times[a]) for a in acts] for rank, acts in enumerate(schedule.actions)]
    makespan = max((t.end for row in timings for t in row), default=0.0)
    result = SimulationResult(schedule, costs, b_frees, timings, makespan, 0.0, chunk_costs=per_chunk)
    total_busy = 0.0
    for rank, row in enumerate(timings):
        busy = sum(t.end - t.start for t in row)
        total_busy += busy
        peak, curve = _memory_walk(row, units, b_frees)
        rank_result = RankResult(rank, busy, (makespan - busy) / makespan if makespan else 0.0, peak, curve)
        if chunk_bytes is not None:
            rank_result.peak_activation_bytes, rank_result.memory_bytes = _memory_walk(row, chunk_bytes, b_frees)
        result.ranks.append(rank_result)
    result.bubble_rate = 1.0 - total_busy / (schedule.pp * makespan) if makespan else 0.0
    return result


def rank_seconds(schedule: Schedule, chunk_costs: Sequence[Costs]) -> list[float]:
    """Per rank, F + B + W of one microbatch through all of its chunks (`chunk_costs` as in `simulate`): the
    slowest rank's value is the least each microbatch can add to a step (the pipeline's compute per microbatch)."""
    if len(chunk_costs) != schedule.num_chunks:
        raise ValueError(f"chunk_costs has {len(chunk_costs)} entries; the schedule has {schedule.num_chunks} chunks")
    return [sum(chunk_costs[c].forward + chunk_costs[c].backward_input + chunk_costs[c].backward_weight
                for c in schedule.placement.chunks_of(r)) for r in range(schedule.pp)]
