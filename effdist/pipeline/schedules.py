"""Schedule generators: 1F1B, interleaved 1F1B, ZB-H1, V-Min, V-Half, V-ZB.

Building blocks (Qi et al., "Pipeline Parallelism with Controllable Memory", NeurIPS 2024). A schedule is one
*building block* -- the ops of a single microbatch on every rank, each at a planned time slot -- repeated every
`period` slots for microbatch 0, 1, 2, ... Ordering each rank's ops by planned slot gives its action list, and the
simulator "squeezes" it (every op as early as dependencies allow, keeping the order). When a block plans every op
strictly after the ops it consumes, the per-rank order can never deadlock: a wait cycle would need a dependency
that does not move forward in planned time. A rank's peak activation is about sum over its chunks of
ceil(lifespan / period), lifespan = planned slots from an F to the W that frees it, which is why memory is chosen
by choosing the offsets inside the block.

Slots are one op of unit cost (F = B = W = 1; a fused BW takes 2). What each generator does:

* ``1f1b``: F of rank r at slot r, BW at 3p-2-2r, period 3. Sorting gives exactly the 1F1B order
  (p-r forwards, then one-forward-one-backward, then the remaining backwards). Fused BW.
* ``interleaved``: Megatron's interleaved 1F1B; here the repeated block is one *round* of g >= p microbatches
  through the v chunks of a rank (forwards chunk-major within a round, backwards in reverse chunk order), with
  (v-1)g + 2(p-1-r) warm-up forwards. m is cut into max(1, m // p) rounds of near-equal size, which equals
  torch's ScheduleInterleaved1F1B where that one is defined (m a multiple of its round count). Fused BW.
* ``zb-h1``: the 1F1B block with the backward split: F at r, B at 3p-2-2r, W at 3p-1+r (each W deferred by r
  periods, so every rank holds p microbatches like 1F1B's first rank). Equals torch's ZB1P
  (ScheduleInterleavedZeroBubble with one stage per rank). Bubble ~ (p-1)(T_F+T_B-T_W), a third of 1F1B's when
  F = B = W.
* ``v-min`` / ``v-half``: V placement and the paper's stable patterns (period 6 slots; rank i; chunk i = first
  leg, chunk 2p-1-i = second leg), as in the reference generator zbv_greedy.py:
    V-Min:  F(i) at i,  F(2p-1-i) at 2p-1-i,  B(2p-1-i) at 2p+d+i,    B(i) at 4p+d-1-i,  d = 2 if p % 3 == 0 else 0
    V-Half: F(i) at 2i, F(2p-1-i) at 3p-2-i,  B(2p-1-i) at 3p+d+2i-1, B(i) at 6p+d-i-2,  d = 3 if p even else 0
  W's go into the first free slot after their B. Then the paper's two greedy passes: move warm-up and cool-down
  ops (W's included) into earlier free slots when dependencies allow and no rank's peak memory grows, squeeze;
  drop W's, move cool-down ops again (memory counted with W's refilled greedily), squeeze; finally refill W's,
  each tied to its own B. Peak: (p+4)//3 units (V-Min), (p+2)//2 (V-Half).
* ``v-zb``: V placement with 1F1B's memory (p units). With balanced costs it is the hand-written ZB-V order of
  the Zero Bubble paper, the same order as torch's ScheduleZBVZeroBubble: warm-up 2(p-r)-1 F(r); r x (F(2p-1-r),
  F(r)); (p-r) x (F, B, W of 2p-1-r); then the repeated block F, B, W of chunk r and F, B, W of chunk 2p-1-r;
  cool-down r x (B(r), B(2p-1-r)), (p-r) x (B(r), W(r)), leftover W's. For m < 2p-1 the order is built for 2p-1
  microbatches and the extra ones are dropped (as torch does).

Costs. Planned slots assume F = B = W, so 1f1b, interleaved, zb-h1, v-min and v-half produce the same order for
any costs (as in the paper, where costs only enter the final squeeze); the simulator applies the real costs.
v-zb is cost-aware like the paper's V-ZB generator: when costs are given, a second candidate keeps the F/B order
and re-inserts each W greedily into gaps at least T_W long (or earlier when the rank would exceed p units), and
the faster of the two candidates under the simulated costs is returned.
"""

from __future__ import annotations

import importlib.util
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

from effdist.config import ConfigError, ModelConfig, ParallelConfig, PipelineConfig
from effdist.pipeline.ir import B, BW, F, W, Action, ActionKind, Placement, Schedule, ScheduleError
from effdist.pipeline.simulate import Costs, run_in_order, simulate

SCHEDULE_NAMES = ("1f1b", "interleaved", "zb-h1", "v-min", "v-half", "v-zb")
V_SCHEDULES = ("v-min", "v-half", "v-zb")

_KIND_ORDER = {F: 0, B: 1, BW: 1, W: 2}


# ------------------------------------------------------------------------------------------ building blocks

@dataclass(frozen=True)
class BlockOp:
    kind: ActionKind
    chunk: int
    slot: int  # planned start for microbatch 0; microbatch n starts n * period later


@dataclass(frozen=True)
class BuildingBlock:
    period: int
    ops: tuple[tuple[BlockOp, ...], ...]  # per rank

    def plan(self, microbatches: int) -> list[dict[Action, int]]:
        """Planned slot of every action when the block is repeated for `microbatches` microbatches."""
        return [{Action(op.kind, op.chunk, n): op.slot + n * self.period for op in rank_ops for n in range(microbatches)}
                for rank_ops in self.ops]


def order_by_plan(plan: Sequence[dict[Action, int]]) -> list[list[Action]]:
    """Each rank's actions sorted by planned slot (ties: lower microbatch, then F before B before W)."""
    return [sorted(p, key=lambda a: (p[a], a.microbatch, _KIND_ORDER[a.kind], a.chunk)) for p in plan]


def one_f_one_b_block(pp: int) -> BuildingBlock:
    return BuildingBlock(3, tuple((BlockOp(F, r, r), BlockOp(BW, r, 3 * pp - 2 - 2 * r)) for r in range(pp)))


def zb_h1_block(pp: int) -> BuildingBlock:
    return BuildingBlock(3, tuple((BlockOp(F, r, r), BlockOp(B, r, 3 * pp - 2 - 2 * r), BlockOp(W, r, 3 * pp - 1 + r))
                                  for r in range(pp)))


def v_min_block(pp: int, offset: int | None = None) -> BuildingBlock:
    """The V-Min stable pattern; `offset` (the paper's d) defaults to 2 when p % 3 == 0, where the undelayed
    pattern would put two ops of a rank into the same slot of the period, else 0."""
    d = (2 if pp % 3 == 0 else 0) if offset is None else offset
    return _v_block(pp, lambda i: (i, 2 * pp - 1 - i, 2 * pp + d + i, 4 * pp + d - 1 - i))


def v_half_block(pp: int, offset: int | None = None) -> BuildingBlock:
    """The V-Half stable pattern; `offset` (d) defaults to 3 for even p (where the undelayed pattern collides)."""
    d = (3 if pp % 2 == 0 else 0) if offset is None else offset
    return _v_block(pp, lambda i: (2 * i, 3 * pp - 2 - i, 3 * pp + d + 2 * i - 1, 6 * pp + d - i - 2))


def _v_block(pp: int, slots: Callable[[int], tuple[int, int, int, int]]) -> BuildingBlock:
    ops = []
    for i in range(pp):
        f_first, f_second, b_second, b_first = slots(i)
        second = 2 * pp - 1 - i
        ops.append((BlockOp(F, i, f_first), BlockOp(F, second, f_second), BlockOp(B, second, b_second), BlockOp(B, i, b_first)))
    return BuildingBlock(6, tuple(ops))


# ------------------------------------------------------------------------------------------ 1F1B family

def one_f_one_b(pp: int, microbatches: int) -> Schedule:
    actions = order_by_plan(one_f_one_b_block(pp).plan(microbatches))
    return Schedule(Placement.plain(pp), microbatches, actions, name="1f1b")


def zb_h1(pp: int, microbatches: int) -> Schedule:
    actions = order_by_plan(zb_h1_block(pp).plan(microbatches))
    return Schedule(Placement.plain(pp), microbatches, actions, name="zb-h1")


def round_sizes(pp: int, microbatches: int) -> list[int]:
    """Microbatches per round of interleaved 1F1B: max(1, m // p) rounds of near-equal size (each >= p if m >= p)."""
    rounds = max(1, microbatches // pp)
    return [microbatches // rounds + (1 if i < microbatches % rounds else 0) for i in range(rounds)]


def interleaved(pp: int, microbatches: int, chunks_per_rank: int) -> Schedule:
    placement = Placement.interleaved(pp, chunks_per_rank)
    sizes = round_sizes(pp, microbatches)
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    actions = []
    for r in range(pp):
        forwards = [Action(F, k * pp + r, s + i) for s, g in zip(starts, sizes)
                    for k in range(chunks_per_rank) for i in range(g)]
        backwards = [Action(BW, k * pp + r, s + i) for s, g in zip(starts, sizes)
                     for k in reversed(range(chunks_per_rank)) for i in range(g)]
        warmup = min((chunks_per_rank - 1) * sizes[0] + 2 * (pp - 1 - r), len(forwards))
        order = forwards[:warmup]
        for fwd, bwd in zip(forwards[warmup:], backwards):
            order += [fwd, bwd]
        order += backwards[len(forwards) - warmup:]
        actions.append(order)
    return Schedule(placement, microbatches, actions, name="interleaved")


# ------------------------------------------------------------------------------------------ V-Min / V-Half

def _split_producers(a: Action, num_chunks: int) -> list[Action]:
    if a.kind is F:
        return [] if a.chunk == 0 else [Action(F, a.chunk - 1, a.microbatch)]
    if a.kind is W:
        return [Action(B, a.chunk, a.microbatch)]
    last = num_chunks - 1
    return [Action(F, last, a.microbatch)] if a.chunk == last else [Action(B, a.chunk + 1, a.microbatch)]


@dataclass(frozen=True)
class _AnonW:
    """A weight-gradient slot not yet tied to a particular B (the k-th W of a rank); frees one chunk activation."""

    rank: int
    index: int


def _fill_w(fb: dict[Action, int], rank: int, assign: bool) -> dict:
    """Put a W into every free slot that follows an unmatched B; leftovers go after the last op.

    assign=False gives anonymous W's (_AnonW), which is all the memory count needs; assign=True ties each W to
    the oldest unmatched B.
    """
    by_slot = {s: a for a, s in fb.items()}
    if len(by_slot) != len(fb):
        raise AssertionError("two ops share a slot")  # the patterns and passes never do this
    pending: deque[Action] = deque()
    out: dict = {}

    def take() -> object:
        b = pending.popleft()
        return Action(W, b.chunk, b.microbatch) if assign else _AnonW(rank, len(out))

    last = max(by_slot, default=-1)
    for s in range(last + 1):
        a = by_slot.get(s)
        if a is not None:
            if a.kind is B:
                pending.append(a)
        elif pending:
            out[take()] = s
    s = last
    while pending:
        s += 1
        out[take()] = s
    return out


def _peak(fb: dict[Action, int], ws: dict | None, rank: int) -> int:
    """Peak chunk activations held by a rank: +1 at each F, -1 at each W (implicit W's when ws is None)."""
    ws = _fill_w(fb, rank, assign=False) if ws is None else ws
    delta: dict[int, int] = {}
    for a, s in fb.items():
        if a.kind is F:
            delta[s] = delta.get(s, 0) + 1
    for s in ws.values():
        delta[s] = delta.get(s, 0) - 1
    level = peak = 0
    for s in sorted(delta):
        level += delta[s]
        peak = max(peak, level)
    return peak


def _reorder(pp: int, microbatches: int, fb: list[dict[Action, int]], ws: list[dict] | None,
             move_warmup: bool) -> list[dict]:
    """One greedy pass of the paper: visit ops in planned order and move each warm-up (if move_warmup) and
    cool-down op into the earliest free earlier slot its dependencies allow, if the rank's peak memory does not
    exceed the current maximum over ranks. Steady state (from the first completed backward of microbatch 0 to the
    first forward of the last microbatch) is kept. Returns per-rank slots of all ops (W's included), squeezed."""
    num_chunks = 2 * pp
    slots: list[dict] = [dict(f) for f in fb]
    if ws is not None:
        for r in range(pp):
            slots[r].update(ws[r])

    def fb_of(r: int) -> dict[Action, int]:
        return {a: s for a, s in slots[r].items() if isinstance(a, Action)}

    def peak_of(r: int) -> int:
        if ws is None:
            return _peak(slots[r], None, r)
        return _peak(fb_of(r), {k: s for k, s in slots[r].items() if isinstance(k, _AnonW)}, r)

    cap = max(peak_of(r) for r in range(pp))
    rank_of = Placement.v_shape(pp).rank_of_chunk
    leg_class = {}  # class order of the paper: F first leg, F second leg, B second leg, B first leg, W
    for r in range(pp):
        leg_class[(F, r)], leg_class[(F, num_chunks - 1 - r)] = 0, 1
        leg_class[(B, num_chunks - 1 - r)], leg_class[(B, r)] = 2, 3

    def key(r: int, item) -> tuple:
        if isinstance(item, _AnonW):
            return (slots[r][item], r, 4, item.index)
        return (slots[r][item], r, leg_class[(item.kind, item.chunk)], item.microbatch)

    visit = sorted(((r, item) for r in range(pp) for item in slots[r]), key=lambda ri: key(*ri))
    occupied: list[set[int]] = [set() for _ in range(pp)]
    # Phases in visiting order: warm-up until chunk 0's first backward (rank 0), steady until the first-leg
    # forward of the last microbatch, cool-down after. With few microbatches that forward can come first; then
    # the cool-down starts right after chunk 0's first backward.
    phase, last_forward_seen = "warmup", False
    for r, item in visit:
        current = slots[r][item]
        is_action = isinstance(item, Action)
        is_last_forward = is_action and item.kind is F and item.chunk == r and item.microbatch == microbatches - 1
        if phase == "warmup" and is_action and item.kind is B and item.chunk == 0:
            phase, movable = ("cooldown" if last_forward_seen else "steady"), False
        elif phase == "steady":
            movable = False
            if is_last_forward:
                phase = "cooldown"
        else:
            movable = move_warmup if phase == "warmup" else True
        last_forward_seen = last_forward_seen or is_last_forward
        if movable:
            if isinstance(item, _AnonW):
                b_slots = sorted(s for a, s in slots[r].items() if isinstance(a, Action) and a.kind is B)
                deps = [b_slots[item.index]] + ([slots[r][_AnonW(r, item.index - 1)]] if item.index else [])
            else:
                deps = []
                for p in _split_producers(item, num_chunks):
                    deps.append(slots[rank_of[p.chunk]][p])
                if item.microbatch:
                    deps.append(slots[r][Action(item.kind, item.chunk, item.microbatch - 1)])
            earliest = max(deps, default=-1) + 1
            for s in range(earliest, current):
                if s in occupied[r]:
                    continue
                slots[r][item] = s
                if peak_of(r) <= cap:
                    break
                slots[r][item] = current
        occupied[r].add(slots[r][item])
    if ws is None:  # the squeeze runs with the W's the memory count assumed
        for r in range(pp):
            slots[r].update(_fill_w(slots[r], r, assign=False))
    return _squeeze(pp, slots)


def _squeeze(pp: int, slots: list[dict]) -> list[dict]:
    """Run every rank's ops in slot order as early as possible with unit costs; return the new slots."""
    orders = [sorted(s, key=lambda item: s[item]) for s in slots]
    num_chunks = 2 * pp
    times = run_in_order(
        orders,
        producers=lambda item: [] if isinstance(item, _AnonW) else _split_producers(item, num_chunks),
        duration=lambda item: 1.0,
        latency=lambda p, item: 0.0,
    )
    return [{item: int(times[item][0]) for item in order} for order in orders]


def v_shape_controlled(pp: int, microbatches: int, block: BuildingBlock, name: str) -> Schedule:
    """V-Min / V-Half: repeat the stable pattern, fill W's, then the paper's two greedy reorder passes."""
    fb = block.plan(microbatches)
    ws = [_fill_w(f, r, assign=False) for r, f in enumerate(fb)]
    first = _reorder(pp, microbatches, fb, ws, move_warmup=True)
    fb = [{a: s for a, s in r.items() if isinstance(a, Action)} for r in first]
    second = _reorder(pp, microbatches, fb, None, move_warmup=False)
    fb = [{a: s for a, s in r.items() if isinstance(a, Action)} for r in second]
    plan = []
    for r, f in enumerate(fb):
        full = dict(f)
        full.update(_fill_w(f, r, assign=True))
        plan.append(full)
    return Schedule(Placement.v_shape(pp), microbatches, order_by_plan(plan), name=name)


# ------------------------------------------------------------------------------------------ V-ZB

def zb_v(pp: int, microbatches: int) -> Schedule:
    """The hand-written ZB-V order (Zero Bubble paper, section 6; torch's ScheduleZBVZeroBubble)."""
    n = max(2 * pp - 1, microbatches)
    actions = []
    for r in range(pp):
        first, second = r, 2 * pp - 1 - r
        order: list[Action] = []
        count = {(F, first): 0, (F, second): 0, (B, first): 0, (B, second): 0, (W, first): 0, (W, second): 0}

        def emit(kind: ActionKind, chunk: int) -> None:
            order.append(Action(kind, chunk, count[(kind, chunk)]))
            count[(kind, chunk)] += 1

        for _ in range(2 * (pp - r) - 1):
            emit(F, first)
        for _ in range(r):
            emit(F, second)
            emit(F, first)
        for _ in range(pp - r):
            emit(F, second), emit(B, second), emit(W, second)
        while count[(F, second)] < count[(F, first)] or count[(F, first)] < n:
            if count[(F, first)] < n:
                emit(F, first)
            emit(B, first), emit(W, first)
            emit(F, second), emit(B, second), emit(W, second)
        for _ in range(r):
            emit(B, first), emit(B, second)
        for _ in range(pp - r):
            emit(B, first), emit(W, first)
        while count[(W, second)] < count[(B, second)]:
            emit(W, second)
        while count[(W, first)] < count[(B, first)]:
            emit(W, first)
        actions.append([a for a in order if a.microbatch < microbatches])
    return Schedule(Placement.v_shape(pp), microbatches, actions, name="v-zb")


def refill_weight_grads(schedule: Schedule, costs: Costs, cap_units: float) -> Schedule:
    """Keep the F/B order; re-insert each W (oldest first) into the first gap before an F/B that is at least
    T_W long, or before an F that would push the rank above `cap_units`; leftovers at the end."""
    fraction = schedule.placement.chunk_fraction()
    kinds = schedule.backward_kind()
    rank_of = schedule.placement.rank_of_chunk
    fb_orders = [[a for a in acts if a.kind is not W] for acts in schedule.actions]
    out: list[list[Action]] = [[] for _ in fb_orders]
    end: dict[Action, float] = {}
    heads = [0] * schedule.pp
    free_at = [0.0] * schedule.pp
    held = [0.0] * schedule.pp
    pending: list[deque[Action]] = [deque() for _ in fb_orders]
    w_time = costs.backward_weight * fraction

    def run(rank: int, a: Action, start: float) -> None:
        end[a] = start + costs.of(a.kind) * fraction
        free_at[rank] = end[a]
        out[rank].append(a)
        if a.kind is F:
            held[rank] += fraction
        elif a.kind is W:
            held[rank] -= fraction
        else:
            pending[rank].append(Action(W, a.chunk, a.microbatch))

    remaining = sum(len(o) for o in fb_orders)
    while remaining:
        progressed = False
        for rank, order in enumerate(fb_orders):
            while heads[rank] < len(order):
                a = order[heads[rank]]
                producers = schedule.producers(a, kinds)
                if any(p not in end for p in producers):
                    break
                ready = max([free_at[rank]] + [end[p] + (0.0 if rank_of[p.chunk] == rank else costs.comm) for p in producers])
                while pending[rank] and (free_at[rank] + w_time <= ready + 1e-9
                                         or (a.kind is F and held[rank] + fraction > cap_units + 1e-9)):
                    run(rank, pending[rank].popleft(), free_at[rank])
                    ready = max(ready, free_at[rank])
                run(rank, a, ready)
                heads[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ScheduleError("refill_weight_grads: the F/B order deadlocks")  # the input was validated
    for rank in range(schedule.pp):
        while pending[rank]:
            run(rank, pending[rank].popleft(), free_at[rank])
    return Schedule(schedule.placement, schedule.num_microbatches, out, name=schedule.name)


def v_zb(pp: int, microbatches: int, costs: Costs | None = None) -> Schedule:
    handwritten = zb_v(pp, microbatches)
    handwritten.info["variant"] = "handwritten"
    if costs is None or (costs.balanced and costs.comm == 0):
        return handwritten
    refilled = refill_weight_grads(handwritten, costs, cap_units=pp)
    refilled.info["variant"] = "refilled-w"
    best = min((handwritten, refilled), key=lambda s: simulate(s, costs).makespan)
    return best


# ------------------------------------------------------------------------------------------ registry

def build_schedule(name: str, pp: int, microbatches: int, costs: Costs | None = None, chunks_per_rank: int = 2) -> Schedule:
    """Generate and validate schedule `name` for `pp` ranks and `microbatches` microbatches.

    chunks_per_rank is used by ``interleaved`` (v chunks per rank); V schedules always place 2 chunks per rank and
    reject any other value; 1f1b and zb-h1 place one and ignore it.
    """
    if name not in SCHEDULE_NAMES:
        raise ScheduleError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    if not isinstance(pp, int) or pp < 2:
        raise ScheduleError(f"pp = {pp!r}: a pipeline needs at least 2 ranks")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ScheduleError(f"microbatches = {microbatches!r}: must be >= 1")
    if name in V_SCHEDULES and chunks_per_rank != 2:
        raise ScheduleError(f"{name} uses the V placement, exactly 2 chunks per rank (2p chunks in all); "
                            f"got chunks_per_rank = {chunks_per_rank}")
    if name == "interleaved" and (not isinstance(chunks_per_rank, int) or chunks_per_rank < 1):
        raise ScheduleError(f"chunks_per_rank = {chunks_per_rank!r}: interleaved needs an integer >= 1 (2 is typical)")
    if name == "1f1b":
        schedule = one_f_one_b(pp, microbatches)
    elif name == "interleaved":
        schedule = interleaved(pp, microbatches, chunks_per_rank)
    elif name == "zb-h1":
        schedule = zb_h1(pp, microbatches)
    elif name == "v-min":
        schedule = v_shape_controlled(pp, microbatches, v_min_block(pp), "v-min")
    elif name == "v-half":
        schedule = v_shape_controlled(pp, microbatches, v_half_block(pp), "v-half")
    else:
        schedule = v_zb(pp, microbatches, costs)
    schedule.info.setdefault("generator", name)
    return schedule.validate()


# ------------------------------------------------------------------------------------------ config checks

def chunks_per_rank(name: str, interleaved_chunks: int) -> int:
    """Model chunks each rank holds under schedule `name` (pipeline.chunks_per_rank counts for interleaved only)."""
    if name in V_SCHEDULES:
        return 2
    return interleaved_chunks if name == "interleaved" else 1


def check_untied_embeddings(model: ModelConfig) -> None:
    if model.tie_embeddings:
        raise ConfigError("model.tie_embeddings = True: with parallel.pp > 1 the embedding and the output layer live in "
                          "different model chunks, which effdist's pipeline does not synchronise; set "
                          "model.tie_embeddings=false or parallel.pp=1")


def check_pipeline_config(model: ModelConfig, parallel: ParallelConfig, pipeline: PipelineConfig) -> None:
    """What a pipeline run (parallel.pp > 1) needs of the model: untied embeddings, a layer per chunk, and the
    executor in this build. Raises ConfigError naming the field; called by effdist.train.preflight."""
    if parallel.pp == 1:
        return
    check_untied_embeddings(model)
    chunks = parallel.pp * chunks_per_rank(pipeline.schedule, pipeline.chunks_per_rank)
    if model.num_layers < chunks:
        raise ConfigError(f"model.num_layers = {model.num_layers!r}: pipeline.schedule={pipeline.schedule} with "
                          f"parallel.pp={parallel.pp} splits the model into {chunks} chunks; it needs at least that "
                          "many layers")
    # The executor imports megatron-core; find it without importing it, so the dry run stays light.
    if importlib.util.find_spec("effdist.pipeline.executor") is None:
        raise ConfigError(f"parallel.pp = {parallel.pp!r}: pipeline parallelism is not available in this build "
                          "(effdist.pipeline.executor is missing); use parallel.pp=1")
