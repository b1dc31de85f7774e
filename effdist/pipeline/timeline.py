"""Measured timelines of one pipeline step: when each action of each rank really ran, to set beside the simulator's.

Records. A measured action is a `simulate.Timing` (action, rank, start, end) with times in seconds since the step
start of its rank: the simulator's own record, so the same drawing code and the same bubble arithmetic serve both.
In JSON a record is ``{"rank", "kind", "chunk", "microbatch", "start", "end"}`` (`to_dicts` / `from_dicts`).

Recording (`StepRecorder`; `Pipeline.record_timeline = True` switches it on for the following steps, off by default
so that an ordinary step pays nothing). On CUDA a pair of `torch.cuda.Event`s brackets each action on the current
stream and the step start is one more event; the events are read once after the step (one synchronize), so the
span of an action is the time the compute stream spent on it, not the time the CPU took to enqueue it. On CPU the
marks are `time.perf_counter()`. The executor takes an action's incoming P2P message *before* its start mark, so
waiting for a peer shows as idle time -- what the simulator calls a bubble -- and not as part of the action.

Clock alignment. Each rank measures from its own step start, taken right after a barrier of the pipeline group (an
all-reduce of one element whose result the CPU reads; on CUDA preceded and followed by a device synchronize so the
stream is empty). The ranks' zeros therefore agree to within the barrier's exit skew: microseconds with NCCL on one
host, up to about a millisecond with gloo. No wall clocks are compared across processes.

Bubble fraction (as in simulate.py): makespan = the latest end over all ranks; a rank's bubble = (makespan - its busy
time) / makespan, idle before its first action included; the schedule's = 1 - total busy / (pp * makespan).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from effdist.pipeline.ir import B, BW, F, W, Action, ActionKind, Schedule
from effdist.pipeline.simulate import Costs, Timing

__all__ = ["StepRecorder", "Bubbles", "bubbles", "by_rank", "check_against", "fit_chunk_costs", "fit_costs",
           "from_dicts", "gather_timings", "to_dicts"]


class StepRecorder:
    """Start and end marks around each action of one step on one rank; `timings()` turns them into records.

    Usage (what Pipeline.forward_backward does): ``begin()`` once before the first action, then
    ``start()`` / ``stop(action)`` around each action, then ``timings()`` after the step.
    """

    def __init__(self, rank: int, device: torch.device, group=None):
        self.rank = rank
        self.device = device
        self.group = group
        self._cuda = device.type == "cuda"
        self._origin: Any = None
        self._open: Any = None
        self._marks: list[tuple[Action, Any, Any]] = []

    def _now(self) -> Any:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self) -> None:
        """Align with the other ranks of `group` (see the module docstring) and take the step's time origin."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        if self.group is not None:
            # A barrier whose completion the CPU observes, on gloo and NCCL alike (.item() waits for the result).
            flag = torch.zeros(1, device=self.device)
            dist.all_reduce(flag, group=self.group)
            flag.item()
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._marks = []
        self._open = None
        self._origin = self._now()

    def start(self) -> None:
        if self._origin is None:
            raise RuntimeError("StepRecorder.start before begin(): call begin() once at the start of the step")
        self._open = self._now()

    def stop(self, action: Action) -> None:
        if self._open is None:
            raise RuntimeError(f"StepRecorder.stop({action}) without a matching start()")
        self._marks.append((action, self._open, self._now()))
        self._open = None

    def timings(self) -> list[Timing]:
        """This rank's records of the step, in execution order, seconds since the step origin."""
        if self._origin is None:
            return []
        if self._cuda:
            torch.cuda.synchronize(self.device)

            def since(mark) -> float:
                return self._origin.elapsed_time(mark) / 1000.0  # elapsed_time is in milliseconds
        else:
            def since(mark) -> float:
                return mark - self._origin
        return [Timing(action, self.rank, since(a), since(b)) for action, a, b in self._marks]


# ---------------------------------------------------------------------------------------------- moving records

def to_dicts(timings: Sequence[Timing]) -> list[dict]:
    return [{"rank": t.rank, "kind": t.action.kind.value, "chunk": t.action.chunk, "microbatch": t.action.microbatch,
             "start": t.start, "end": t.end} for t in timings]


def from_dicts(rows: Sequence[dict]) -> list[Timing]:
    return [Timing(Action(ActionKind(r["kind"]), int(r["chunk"]), int(r["microbatch"])), int(r["rank"]),
                   float(r["start"]), float(r["end"])) for r in rows]


def gather_timings(timings: Sequence[Timing], group, dst: int = 0) -> Optional[list[Timing]]:
    """Collective over `group`: every rank's records on the group's rank `dst` (rank order), None elsewhere."""
    group = group if group is not None else dist.group.WORLD
    size = dist.get_world_size(group)
    mine = dist.get_rank(group)
    received: Optional[list] = [None] * size if mine == dst else None
    dist.gather_object(to_dicts(timings), received, dst=dist.get_global_rank(group, dst), group=group)
    if received is None:
        return None
    return [t for part in received for t in from_dicts(part)]


# ---------------------------------------------------------------------------------------------- reading records

def by_rank(timings: Sequence[Timing], pp: int) -> list[list[Timing]]:
    """Records split into one list per rank (0 .. pp-1), each in start order."""
    rows: list[list[Timing]] = [[] for _ in range(pp)]
    for t in timings:
        if not 0 <= t.rank < pp:
            raise ValueError(f"a timeline record names rank {t.rank}, outside the pipeline's ranks 0..{pp - 1}")
        rows[t.rank].append(t)
    return [sorted(row, key=lambda t: (t.start, t.end)) for row in rows]


def check_against(rows: Sequence[Sequence[Timing]], schedule: Schedule) -> None:
    """Raise ValueError unless each rank's records are exactly its action list of `schedule`, in order."""
    if len(rows) != schedule.pp:
        raise ValueError(f"the timeline has {len(rows)} ranks; schedule {schedule.name} has pp = {schedule.pp}")
    for rank, (row, expected) in enumerate(zip(rows, schedule.actions)):
        got = [t.action for t in row]
        if got != list(expected):
            first = next((i for i, (g, e) in enumerate(zip(got, expected)) if g != e), min(len(got), len(expected)))
            raise ValueError(f"rank {rank}: the recorded actions differ from schedule {schedule.name}'s list at "
                             f"position {first} ({len(got)} recorded, {len(expected)} scheduled); record a step of "
                             "this schedule")


@dataclass(frozen=True)
class Bubbles:
    makespan: float
    ranks: list[float]   # per rank: (makespan - busy) / makespan
    overall: float       # 1 - total busy / (pp * makespan)


def bubbles(rows: Sequence[Sequence[Timing]]) -> Bubbles:
    """Idle fractions of a timeline given per rank (measured or simulated), defined as in simulate.py."""
    makespan = max((t.end for row in rows for t in row), default=0.0)
    busy = [sum(t.end - t.start for t in row) for row in rows]
    if makespan <= 0:
        return Bubbles(0.0, [0.0] * len(rows), 0.0)
    return Bubbles(makespan, [(makespan - b) / makespan for b in busy], 1.0 - sum(busy) / (len(rows) * makespan))


def fit_costs(timings: Sequence[Timing], schedule: Schedule) -> Costs:
    """Simulator costs (seconds per microbatch through one 1F1B stage) from measured durations: the median of each
    kind divided by the schedule's chunk fraction. A fused BW splits evenly into B and W when no split action ran.
    One cost for every chunk: a stage that is slower than the others (the LM head and loss on the last chunk)
    is averaged away; `fit_chunk_costs` keeps it."""
    fraction = schedule.placement.chunk_fraction()
    return _median_costs(timings, "fit_costs", divisor=fraction)


def fit_chunk_costs(timings: Sequence[Timing], schedule: Schedule) -> list[Costs]:
    """One Costs per chunk (seconds of one microbatch through that chunk: `simulate(..., chunk_costs=...)`), the
    medians of that chunk's own actions. With these the simulated timeline differs from the measured one only by
    what the simulator does not model (waits for transfers and peers, launch gaps), not by stage imbalance."""
    return [_median_costs([t for t in timings if t.action.chunk == c], f"fit_chunk_costs (chunk {c})")
            for c in range(schedule.num_chunks)]


def _median_costs(timings: Sequence[Timing], who: str, divisor: float = 1.0) -> Costs:
    durations: dict[ActionKind, list[float]] = {F: [], B: [], W: [], BW: []}
    for t in timings:
        durations[t.action.kind].append((t.end - t.start) / divisor)
    if not durations[F]:
        raise ValueError(f"{who}: the timeline has no F action; record a training step")
    tiny = 1e-12  # Costs wants positive times; an empty W of a chunk without split linears can measure ~0

    def median(kind: ActionKind) -> Optional[float]:
        return max(statistics.median(durations[kind]), tiny) if durations[kind] else None

    forward = median(F)
    backward_input, backward_weight, fused = median(B), median(W), median(BW)
    if backward_input is None or backward_weight is None:
        if fused is None:
            raise ValueError(f"{who}: the timeline has neither B and W nor BW actions")
        backward_input = backward_weight = fused / 2
    return Costs(forward=forward, backward_input=backward_input, backward_weight=backward_weight)
