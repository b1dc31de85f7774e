"""Schedule generators: memory and bubbles as the papers state them, agreement with torch.distributed.pipelining,
validity for any (p, m, costs)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effdist.pipeline.ir import B, BW, F, W, Action, ScheduleError
from effdist.pipeline.schedules import (
    SCHEDULE_NAMES, build_schedule, one_f_one_b_block, round_sizes, v_half_block, v_min_block, zb_h1_block, zb_v,
)
from effdist.pipeline.simulate import Costs, simulate

UNIT = Costs(1.0, 1.0, 1.0, 0.0)


def peak_units(name: str, p: int, m: int, **kw) -> float:
    return simulate(build_schedule(name, p, m, **kw), UNIT).peak_activation_units


def idle_per_rank(name: str, p: int, m: int, costs: Costs = UNIT, **kw) -> list[float]:
    result = simulate(build_schedule(name, p, m, costs=costs, **kw), costs)
    return [result.makespan - r.busy for r in result.ranks]


# ------------------------------------------------------------------------------------------ memory

EXPECTED_PEAK = {
    "1f1b": lambda p: p,
    "v-zb": lambda p: p,
    "v-half": lambda p: (p + 2) // 2,
    "v-min": lambda p: (p + 4) // 3,
}


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8, 12, 16])
def test_peak_activation_matches_the_paper(p):
    """Unit costs, m >= 2p (including m not a multiple of p). The paper's offset adjustment d is applied where the
    undelayed stable pattern would collide (V-Min: p % 3 == 0, i.e. p = 3, 6, 12 here; V-Half: even p, i.e.
    p = 2, 4, 6, 8, 12, 16); see test_offset_adjustment_is_needed_exactly_where_the_pattern_collides."""
    ms = [2 * p, 2 * p + 1, 3 * p] if p <= 8 else [2 * p]
    for m in ms:
        for name, expected in EXPECTED_PEAK.items():
            assert peak_units(name, p, m) == expected(p), (name, p, m)


def test_offset_adjustment_is_needed_exactly_where_the_pattern_collides():
    def collides(block) -> bool:
        return any(len({op.slot % block.period for op in ops}) < len(ops) for ops in block.ops)

    for p in range(2, 17):
        assert collides(v_min_block(p, offset=0)) == (p % 3 == 0)
        assert collides(v_half_block(p, offset=0)) == (p % 2 == 0)
        assert not collides(v_min_block(p)) and not collides(v_half_block(p))


def test_peak_memory_per_rank_shapes():
    per_rank = lambda name: [r.peak_activation_units for r in simulate(build_schedule(name, 4, 16), UNIT).ranks]
    assert per_rank("1f1b") == [4, 3, 2, 1]  # 1F1B: rank r holds p - r microbatches
    assert per_rank("zb-h1") == [4, 4, 4, 4]  # W's deferred by r periods: every rank at 1F1B's peak
    assert per_rank("v-half") == [3, 3, 3, 3]  # V schedules balance memory across ranks
    assert per_rank("v-min") == [2, 2, 2, 2]


@pytest.mark.parametrize("p,v", [(2, 2), (4, 2), (4, 3), (5, 2), (8, 4)])
def test_interleaved_peak_is_p_plus_warmup_overhead(p, v):
    # warm-up of rank 0: (v-1)p + 2(p-1) chunk forwards, plus one in the steady state, each 1/v unit
    assert peak_units("interleaved", p, 2 * p, chunks_per_rank=v) == pytest.approx(p + (p - 1) / v)


# ------------------------------------------------------------------------------------------ bubbles

def test_reference_bubbles_of_the_paper_generator():
    """zbv_greedy.py with F=B=W=1000, comm=1 per chunk op: p=4, m=16: V-Min 10.3%, V-Half 5.0%, 1F1B 15.8%;
    p=8, m=32: V-Min 12.4%, V-Half 8.2%. Our costs are per 1F1B stage, so a chunk op of 1000 is a stage op of 2000."""
    chunk_costs = Costs(2000, 2000, 2000, 1)
    stage_costs = Costs(1000, 1000, 1000, 1)
    bubble = lambda name, p, m, c: round(100 * simulate(build_schedule(name, p, m, costs=c), c).bubble_rate, 1)
    assert bubble("v-min", 4, 16, chunk_costs) == 10.3
    assert bubble("v-half", 4, 16, chunk_costs) == 5.0
    assert bubble("1f1b", 4, 16, stage_costs) == 15.8
    assert bubble("v-min", 8, 32, chunk_costs) == 12.4
    assert bubble("v-half", 8, 32, chunk_costs) == 8.2
    # 1F1B's (p-1)/(m+p-1) = 17.9%; comm latency in the steady state adds a few hundredths of a point
    assert simulate(build_schedule("1f1b", 8, 32), stage_costs).bubble_rate == pytest.approx(7 / 39, abs=1e-3)


def test_bubble_order_at_p4_m16():
    rate = {n: simulate(build_schedule(n, 4, 16), UNIT).bubble_rate for n in SCHEDULE_NAMES}
    assert rate["v-half"] < rate["v-min"] < rate["1f1b"]
    assert rate["v-zb"] < rate["zb-h1"] < rate["interleaved"] < rate["1f1b"]


@pytest.mark.parametrize("p,m", [(2, 6), (4, 8), (4, 16), (5, 11), (8, 24)])
def test_zb_h1_idle_is_a_third_of_1f1b(p, m):
    """ZB-H1: (p-1)(T_F + T_B - T_W) idle per rank, against 1F1B's (p-1)(T_F + T_B + T_W) when F = B = W."""
    zb, base = idle_per_rank("zb-h1", p, m), idle_per_rank("1f1b", p, m)
    assert zb == pytest.approx([p - 1] * p) and base == pytest.approx([3 * (p - 1)] * p)


@pytest.mark.parametrize("p,v", [(4, 2), (4, 4), (3, 3)])
def test_interleaved_idle_is_one_vth_of_1f1b(p, v):
    inter, base = idle_per_rank("interleaved", p, 4 * p, chunks_per_rank=v), idle_per_rank("1f1b", p, 4 * p)
    assert inter == pytest.approx([b / v for b in base])


@pytest.mark.parametrize("p,m", [(2, 8), (4, 16), (4, 64), (6, 12), (8, 32)])
def test_v_zb_has_only_the_pipeline_fill_when_costs_are_balanced(p, m):
    """With T_F = T_B = T_W and no latency, every rank is idle only for the (p-1) chunk forwards it takes the first
    microbatch to reach the last rank, so the bubble rate falls like 1/m (< 1% at p=4, m=64)."""
    assert idle_per_rank("v-zb", p, m) == pytest.approx([(p - 1) * 0.5] * p)
    if m >= 16 * p:
        assert simulate(build_schedule("v-zb", p, m), UNIT).bubble_rate < 0.01


# ------------------------------------------------------------------------------------------ torch agreement

def _torch_order(cls_name: str, p: int, m: int, local_stages: int) -> dict[int, list[str]] | None:
    """torch's compute-only pipeline_order, built without a process group: the order generators are plain methods
    that read a few attributes, so set those on an uninitialised instance and call them."""
    ts = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = getattr(ts, cls_name)
    obj = object.__new__(cls)
    obj.pp_group_size, obj._n_microbatches, obj.n_local_stages = p, m, local_stages
    obj.num_stages = obj._num_stages = p * local_stages
    if cls_name in ("ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble"):
        obj.number_of_rounds = max(1, m // p)
        obj.microbatches_per_round = m // obj.number_of_rounds
        if m % obj.number_of_rounds:
            return None  # torch rejects this m; our round split handles it (tested for validity elsewhere)
    if cls_name == "Schedule1F1B":
        order = obj._get_pipeline_order()
    else:
        order = {r: obj._calculate_single_rank_operations(r) for r in range(p)}
        if cls_name == "ScheduleInterleavedZeroBubble":
            obj.pipeline_order = order
            order = obj._add_bubbles_to_actions(p * local_stages)
    return {r: [str(a) for a in acts if a is not None and a.is_compute_op] for r, acts in order.items()}


GRID = [(p, m) for p in (2, 3, 4, 5, 8) for m in sorted({1, 2, p - 1, p, p + 1, 2 * p - 1, 2 * p, 2 * p + 3, 3 * p}) if m >= 1]


@pytest.mark.parametrize("name,cls_name,local", [
    ("v-zb", "ScheduleZBVZeroBubble", 2),
    ("zb-h1", "ScheduleInterleavedZeroBubble", 1),  # torch's ZB1P with one stage per rank
    ("interleaved", "ScheduleInterleaved1F1B", 2),
])
def test_order_equals_torch(name, cls_name, local):
    compared = 0
    for p, m in GRID:
        expected = _torch_order(cls_name, p, m, local)
        if expected is None:
            continue
        assert build_schedule(name, p, m).to_torch_order() == expected, (p, m)
        compared += 1
    assert compared >= 30


def test_1f1b_equals_torch_except_its_last_rank_numbering():
    """torch's Schedule1F1B._get_pipeline_order (the introspection copy of its order; its runtime loop is
    separate) has two quirks: it numbers the last rank's forwards from 1 (['1F1', '1B0', '1F2', ...] for p=2), and
    for m < p - 1 it emits p-1-r warm-up forwards even for microbatches that do not exist. So compare where
    m >= p - 1, and on the last rank accept either our numbering or torch's shifted one (a fix in torch keeps
    this passing)."""
    compared = 0
    for p, m in GRID:
        if m < p - 1:
            continue
        compared += 1
        ours, theirs = build_schedule("1f1b", p, m).to_torch_order(), _torch_order("Schedule1F1B", p, m, 1)
        for r in range(p - 1):
            assert ours[r] == theirs[r], (p, m, r)
        shifted = [f"{p - 1}F{int(a.split('F')[1]) + 1}" if "F" in a else a for a in ours[p - 1]]
        assert theirs[p - 1] in (ours[p - 1], shifted), (p, m)
    assert compared >= 30


# ------------------------------------------------------------------------------------------ costs

def test_costs_change_the_v_zb_order_and_never_make_it_slower():
    slow_forward = Costs(2.0, 1.0, 1.0, 0.0)
    cost_aware = build_schedule("v-zb", 4, 16, costs=slow_forward)
    handwritten = zb_v(4, 16)
    assert cost_aware.actions != handwritten.actions
    assert cost_aware.info["variant"] == "refilled-w"
    fast = simulate(cost_aware, slow_forward)
    assert fast.makespan < simulate(handwritten, slow_forward).makespan
    assert fast.peak_activation_units <= 4  # still within 1F1B's memory
    assert build_schedule("v-zb", 4, 16, costs=UNIT).actions == handwritten.actions


def test_fixed_order_schedules_ignore_costs():
    """1F1B, interleaved, ZB-H1, V-Min and V-Half plan in unit slots (as the paper does); costs only change timing."""
    skewed = Costs(1.0, 3.0, 0.5, 0.2)
    for name in ("1f1b", "interleaved", "zb-h1", "v-min", "v-half"):
        assert build_schedule(name, 4, 9, costs=skewed).actions == build_schedule(name, 4, 9).actions


# ------------------------------------------------------------------------------------------ building blocks

@pytest.mark.parametrize("p", [2, 3, 4, 7, 16])
def test_blocks_plan_every_op_after_what_it_consumes(p):
    """The deadlock-freedom argument of the building-block construction: producers finish before consumers start
    in planned time (unit slots; a fused BW takes two)."""
    for block in (one_f_one_b_block(p), zb_h1_block(p), v_min_block(p), v_half_block(p)):
        num_chunks = max(op.chunk for ops in block.ops for op in ops) + 1
        slot = {}
        for plan in block.plan(3):
            slot.update(plan)
        for a, start in slot.items():
            if a.kind is F and a.chunk > 0:
                producer = Action(F, a.chunk - 1, a.microbatch)
            elif a.kind in (B, BW):
                producer = Action(F if a.chunk == num_chunks - 1 else a.kind, min(a.chunk + 1, num_chunks - 1), a.microbatch)
            elif a.kind is W:
                producer = Action(B, a.chunk, a.microbatch)
            else:
                continue
            duration = 2 if producer.kind is BW else 1
            assert slot[producer] + duration <= start, (p, a, producer)


def test_round_sizes_cover_every_microbatch():
    assert round_sizes(4, 16) == [4, 4, 4, 4]
    assert round_sizes(4, 9) == [5, 4]
    assert round_sizes(4, 3) == [3]
    for p in range(2, 9):
        for m in range(1, 40):
            sizes = round_sizes(p, m)
            assert sum(sizes) == m and (m < p or min(sizes) >= p)


# ------------------------------------------------------------------------------------------ registry and validity

def test_registry_rejects_bad_arguments():
    with pytest.raises(ScheduleError, match="unknown schedule 'gpipe'; valid: 1f1b, interleaved"):
        build_schedule("gpipe", 4, 8)
    with pytest.raises(ScheduleError, match="pp = 1: a pipeline needs at least 2 ranks"):
        build_schedule("1f1b", 1, 8)
    with pytest.raises(ScheduleError, match="microbatches = 0: must be >= 1"):
        build_schedule("v-half", 4, 0)
    with pytest.raises(ScheduleError, match="exactly 2 chunks per rank.*chunks_per_rank = 3"):
        build_schedule("v-min", 4, 8, chunks_per_rank=3)
    with pytest.raises(ScheduleError, match="chunks_per_rank = 0"):
        build_schedule("interleaved", 4, 8, chunks_per_rank=0)


def test_split_and_fused_backward_choice():
    for name in ("1f1b", "interleaved"):
        assert not build_schedule(name, 3, 5).splits_backward
    for name in ("zb-h1", "v-min", "v-half", "v-zb"):
        assert build_schedule(name, 3, 5).splits_backward


def test_every_schedule_is_valid_for_small_and_uneven_microbatch_counts():
    for p in (2, 3, 4, 5):
        for m in range(1, 2 * p + 2):
            for name in SCHEDULE_NAMES:
                s = build_schedule(name, p, m, chunks_per_rank=3 if name == "interleaved" else 2)
                assert len(s) == s.num_chunks * m * (2 if not s.splits_backward else 3)


costs_strategy = st.builds(
    Costs,
    forward=st.floats(0.2, 4.0), backward_input=st.floats(0.2, 4.0), backward_weight=st.floats(0.1, 4.0),
    comm=st.floats(0.0, 1.0),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(SCHEDULE_NAMES), p=st.integers(2, 7), m=st.integers(1, 20), costs=costs_strategy,
       v=st.integers(1, 4))
def test_random_schedules_never_deadlock_and_respect_memory_bounds(name, p, m, costs, v):
    schedule = build_schedule(name, p, m, costs=costs, chunks_per_rank=v if name == "interleaved" else 2)
    result = simulate(schedule, costs)  # validates: every (chunk, microbatch) complete, no deadlock
    assert 0.0 <= result.bubble_rate < 1.0
    if name in EXPECTED_PEAK:
        assert result.peak_activation_units <= EXPECTED_PEAK[name](p)
    if name == "zb-h1":
        assert result.peak_activation_units <= p
