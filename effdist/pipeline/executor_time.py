"""The step time of a Schedule as effdist's executor runs it on NCCL: the simulator's timeline plus the waits that
come from how the executor posts its P2P transfers (p2p.StepTransfers), which `simulate` does not model.

Why a second time model. `simulate` lets every action start as soon as its own input has arrived. The executor
(executor.py) instead posts its sends and receives with ``batch_isend_irecv`` in `CommPlan` order: after each
action, every operation that can be posted goes out in **one batch**. On NCCL a batch is one coalesced operation
with one Work, and an action waits for the Work of the batch its message came in, so it waits for **every**
message of that batch. At a rank's cool-down, for one, all the remaining receives go out in one batch after its
last forward, and its first cool-down backward then waits for the last gradient of the step. Two more NCCL facts:
a batch runs on the process group's one NCCL stream, after the batches posted before it (FIFO), and that stream
first waits for the compute the rank had enqueued when it posted the batch (PyTorch's ProcessGroupNCCL makes the
NCCL stream wait on the current stream before each operation).

The p=4 runs of 2026-11-22 (docs/results/pipeline_p4_*.json, 4x H200): with each rank's measured per-microbatch
cost (its busy time in the recorded timeline), `simulate` gives makespans 10-50% below the recorded ones; this
model gives them within 8% for all 18 (run, schedule) rows and each rank's bubble within 0.06 (docs/benchmarks.md,
"Planner against the p=4 pipeline runs"). Without the whole-batch wait (each action waiting for its own message
only) it falls back to within 4% of `simulate`: that wait is the gap.

Assumed: the CPU runs ahead of the GPU (it enqueues an action and posts its batch before the GPU gets there), so a
batch posted after action k is gated on action k's end on the GPU; a transfer moves once the sender's and the
receiver's batches have both started, in `transfer_s`; kernel launch gaps and compute slowed by concurrent NCCL
kernels are not modelled. On gloo (CPU) the executor waits per message and none of this applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from effdist.pipeline.ir import BW, B, F, W, Action, Schedule
from effdist.pipeline.comm_plan import CommPlan, Message
from effdist.pipeline.simulate import Costs

__all__ = ["Batch", "ExecutorModel", "ExecutorTiming", "posted_batches"]


@dataclass(frozen=True)
class Batch:
    """One ``batch_isend_irecv`` of a rank: posted right after its action `after` (-1: before the first action)."""

    after: int
    ops: tuple[tuple[str, Message], ...]  # ("send" | "recv", message), in posting order


def posted_batches(plan: CommPlan, actions: Sequence[Action]) -> list[Batch]:
    """The batches StepTransfers.advance posts on a rank that runs `actions` in order: before the first action,
    then after each action every operation of `plan.posts` up to the first send whose producer has not run."""
    producer_of = {msg: action for action, msgs in plan.sends_of.items() for msg in msgs}
    ran: set[Action] = set()
    batches: list[Batch] = []
    posted = 0

    def advance(after: int) -> None:
        nonlocal posted
        start = posted
        while posted < len(plan.posts):
            op, msg = plan.posts[posted]
            if op == "send" and producer_of[msg] not in ran:
                break
            posted += 1
        if posted > start:
            batches.append(Batch(after, tuple(plan.posts[start:posted])))

    advance(-1)
    for k, action in enumerate(actions):
        ran.add(action)
        advance(k)
    if posted != len(plan.posts):  # the executor raises the same way at the end of the step
        raise ValueError(f"rank {plan.rank}: {plan.posts[posted][0]} of {plan.posts[posted][1].describe()} is never "
                         "posted (its producer is not in the rank's actions)")
    return batches


@dataclass
class ExecutorTiming:
    makespan: float
    busy: list[float]          # per rank, the sum of its actions
    bubble_rates: list[float]  # per rank, (makespan - busy) / makespan, as simulate.py defines it
    _times: list[float]
    _node_of: dict[Action, int]

    @property
    def bubble_rate(self) -> float:
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan) if self.makespan else 0.0

    @property
    def ends(self) -> dict[Action, float]:
        """When each action ends (built on demand: the planner reads only the makespan)."""
        return {a: self._times[n] for a, n in self._node_of.items()}


class ExecutorModel:
    """The timing structure of one schedule (its batches and every wait between them), built once; `run` times it
    for given costs. The planner times one schedule under many candidate costs, so building is kept apart."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        plans = CommPlan.build_all(schedule)
        self.batches = [posted_batches(plans[r], schedule.actions[r]) for r in range(schedule.pp)]
        # Nodes: A (an action ends), S (a batch starts on the NCCL stream), D (a batch is done), X (a message has
        # arrived). preds[n] are the nodes n waits for; a node's time is the latest of theirs plus its own duration.
        self._kind: list[str] = []
        self._preds: list[list[int]] = []
        self._action: list[Action | None] = []
        self._message: list[Message | None] = []

        def node(kind: str, action: Action | None = None, message: Message | None = None) -> int:
            self._kind.append(kind)
            self._preds.append([])
            self._action.append(action)
            self._message.append(message)
            return len(self._kind) - 1

        acts = [[node("A", action=a) for a in schedule.actions[r]] for r in range(schedule.pp)]
        starts = [[node("S") for _ in self.batches[r]] for r in range(schedule.pp)]
        dones = [[node("D") for _ in self.batches[r]] for r in range(schedule.pp)]
        arrived: dict[Message, int] = {}
        batch_of: dict[tuple[int, str, Message], int] = {}
        for r, batches in enumerate(self.batches):
            for j, batch in enumerate(batches):
                for op, msg in batch.ops:
                    batch_of[(r, op, msg)] = j
                    if msg not in arrived:
                        arrived[msg] = node("X", message=msg)
        for r, batches in enumerate(self.batches):
            for j, batch in enumerate(batches):
                if batch.after >= 0:  # the NCCL stream waits for the compute enqueued before the post
                    self._preds[starts[r][j]].append(acts[r][batch.after])
                if j:  # one NCCL stream: batches run in posting order
                    self._preds[starts[r][j]].append(dones[r][j - 1])
                self._preds[dones[r][j]].append(starts[r][j])
                for _, msg in batch.ops:
                    self._preds[dones[r][j]].append(arrived[msg])
        for msg, x in arrived.items():
            self._preds[x] += [starts[msg.src][batch_of[(msg.src, "send", msg)]],
                               starts[msg.dst][batch_of[(msg.dst, "recv", msg)]]]
        for r, row in enumerate(acts):
            for k, a in enumerate(row):
                if k:
                    self._preds[a].append(row[k - 1])
                msg = plans[r].recv_for.get(schedule.actions[r][k])
                if msg is not None:  # the whole batch the message came in, not just the message
                    self._preds[a].append(dones[r][batch_of[(r, "recv", msg)]])
        self._order = self._topological()
        self._preds_t = [tuple(p) for p in self._preds]
        slot = {F: 0, B: 1, W: 2, BW: 3}  # index into run()'s per-chunk (F, B, W, B + W)
        self._action_slots = [(n, a.chunk, slot[a.kind]) for n, a in enumerate(self._action) if a is not None]
        self._transfers = [n for n, kind in enumerate(self._kind) if kind == "X"]
        self._node_of = {self._action[n]: n for row in acts for n in row}
        self._counts: list[dict[tuple[int, int], int]] = []  # per rank, how often each (chunk, slot) runs
        for row in schedule.actions:
            counts: dict[tuple[int, int], int] = {}
            for a in row:
                counts[(a.chunk, slot[a.kind])] = counts.get((a.chunk, slot[a.kind]), 0) + 1
            self._counts.append(counts)

    def _topological(self) -> list[int]:
        succ: list[list[int]] = [[] for _ in self._preds]
        indegree = [len(p) for p in self._preds]
        for n, preds in enumerate(self._preds):
            for p in preds:
                succ[p].append(n)
        ready = [n for n, d in enumerate(indegree) if d == 0]
        order = []
        while ready:
            n = ready.pop()
            order.append(n)
            for s in succ[n]:
                indegree[s] -= 1
                if not indegree[s]:
                    ready.append(s)
        if len(order) != len(self._preds):  # CommPlan's order is deadlock-free; this would be a bug here
            raise ValueError(f"schedule {self.schedule.name}: the executor's posting order deadlocks in the model")
        return order

    def run(self, chunk_costs: Sequence[Costs], transfer_s: float = 0.0) -> ExecutorTiming:
        """Times for one microbatch through each chunk as a whole (`simulate`'s chunk_costs) and `transfer_s` per
        P2P message."""
        if len(chunk_costs) != self.schedule.num_chunks:
            raise ValueError(f"chunk_costs has {len(chunk_costs)} entries; the schedule has "
                             f"{self.schedule.num_chunks} chunks")
        per_chunk = [(c.forward, c.backward_input, c.backward_weight, c.backward_input + c.backward_weight)
                     for c in chunk_costs]
        duration = [0.0] * len(self._preds)
        for n, chunk, k in self._action_slots:
            duration[n] = per_chunk[chunk][k]
        for n in self._transfers:
            duration[n] = transfer_s
        t = [0.0] * len(self._preds)
        preds = self._preds_t
        for n in self._order:  # the planner calls this for every candidate: kept to one pass of plain lists
            ready = max([t[p] for p in preds[n]]) if preds[n] else 0.0
            t[n] = ready + duration[n]
        makespan = max(t) if t else 0.0
        busy = [sum(count * per_chunk[chunk][k] for (chunk, k), count in row.items()) for row in self._counts]
        return ExecutorTiming(makespan, busy, [(makespan - b) / makespan if makespan else 0.0 for b in busy], t,
                              self._node_of)
