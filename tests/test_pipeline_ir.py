"""The schedule IR: placements, communication peers, validation messages, torch action-string and CSV forms."""

from __future__ import annotations

import csv
import io

import pytest

from effdist.pipeline.ir import B, BW, F, W, Action, Peer, Placement, Schedule, ScheduleError
from effdist.pipeline.schedules import SCHEDULE_NAMES, build_schedule


def _schedule(placement: Placement, m: int, rows: list[str]) -> Schedule:
    return Schedule(placement, m, [[Action.parse(t) for t in row.split()] for row in rows])


# ------------------------------------------------------------------------------------------ placement

def test_v_shape_places_chunk_r_and_its_mirror_on_rank_r():
    p = Placement.v_shape(4)
    assert p.rank_of_chunk == (0, 1, 2, 3, 3, 2, 1, 0)
    assert [p.chunks_of(r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert p.chunk_fraction() == 0.5


def test_interleaved_and_plain_placements():
    inter = Placement.interleaved(3, 3)
    assert inter.chunks_of(1) == (1, 4, 7)
    assert inter.chunk_fraction() == pytest.approx(1 / 3)
    assert Placement.plain(3).chunks_of(2) == (2,)
    with pytest.raises(ScheduleError, match="rank 2 without a chunk"):
        Placement(3, (0, 1, 0, 1))
    with pytest.raises(ScheduleError, match="chunk 9 does not exist"):
        inter.rank_of(9)


def test_infer_names_the_placement_style():
    assert Placement.infer(4, [0, 1, 2, 3, 3, 2, 1, 0]).style == "v"
    assert Placement.infer(2, [0, 1, 0, 1, 0, 1]).style == "interleaved"
    assert Placement.infer(2, [0, 1]).style == "plain"
    assert Placement.infer(2, [1, 0]).style == "custom"


def test_peers_follow_chunk_order_and_turn_locally_in_the_v():
    s = build_schedule("v-half", 4, 4)
    assert s.forward_recipient(0) == Peer(1, 1)
    assert s.forward_recipient(3) == Peer(4, 3) and s.is_local(3, 4)  # the turn of the V: same rank
    assert s.forward_recipient(7) is None  # last chunk: the loss
    assert s.grad_recipient(4) == Peer(3, 3)
    assert s.grad_recipient(0) is None
    assert s.grad_source(6) == Peer(7, 0) and s.forward_source(7) == Peer(6, 1)
    assert (s.pp, s.num_chunks, s.num_microbatches) == (4, 8, 4)
    assert s.chunks_of(2) == (2, 5) and s.placement.rank_of(5) == 2


def test_producers_name_the_consumed_results():
    s = build_schedule("zb-h1", 3, 2)
    assert s.producers(Action(F, 1, 0)) == [Action(F, 0, 0)]
    assert s.producers(Action(B, 1, 1)) == [Action(B, 2, 1)]
    assert s.producers(Action(B, 2, 1)) == [Action(F, 2, 1)]  # last chunk: after its own forward (loss)
    assert s.producers(Action(W, 0, 1)) == [Action(B, 0, 1)]
    fused = build_schedule("1f1b", 3, 2)
    assert fused.producers(Action(BW, 0, 1)) == [Action(BW, 1, 1)]


# ------------------------------------------------------------------------------------------ action strings

def test_torch_notation_maps_B_to_I_and_BW_to_B():
    assert Action(F, 0, 1).to_torch() == "0F1"
    assert Action(B, 2, 0).to_torch() == "2I0"
    assert Action(W, 3, 2).to_torch() == "3W2"
    assert Action(BW, 1, 4).to_torch() == "1B4"
    for text in ("0F1", "2I0", "3W2", "1B4", "12I31"):
        assert Action.from_torch(text).to_torch() == text
    assert Action.parse("5BW3") == Action(BW, 5, 3) and str(Action(BW, 5, 3)) == "5BW3"
    with pytest.raises(ScheduleError, match="communication"):
        Action.from_torch("0SEND_F1")


def test_our_strings_are_torch_action_strings():
    torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    for name in SCHEDULE_NAMES:
        for row in build_schedule(name, 3, 4).to_torch_order().values():
            for text in row:
                parsed = torch_schedules._Action.from_str(text)
                assert parsed.is_compute_op and str(parsed) == text


# ------------------------------------------------------------------------------------------ validation

def test_generated_schedules_validate():
    for name in SCHEDULE_NAMES:
        assert build_schedule(name, 4, 6).validate() is not None


def test_missing_weight_gradient_is_named():
    s = build_schedule("zb-h1", 2, 2)
    s.actions[1] = [a for a in s.actions[1] if a != Action(W, 1, 1)]
    with pytest.raises(ScheduleError, match=r"chunk 1 microbatch 1 \(rank 1\) is missing its weight gradient 1W1"):
        s.validate()


def test_missing_forward_and_missing_backward_are_named():
    s = build_schedule("1f1b", 2, 2)
    s.actions[0] = [a for a in s.actions[0] if a != Action(F, 0, 1)]
    with pytest.raises(ScheduleError, match="chunk 0 microbatch 1 .* has no forward 0F1"):
        s.validate()
    s = build_schedule("1f1b", 2, 2)
    s.actions[0] = [a for a in s.actions[0] if a != Action(BW, 0, 0)]
    with pytest.raises(ScheduleError, match=r"chunk 0 microbatch 0 .* is missing a backward \(B\+W or BW\)"):
        s.validate()


def test_duplicate_wrong_rank_out_of_range_and_mixed_backward():
    s = build_schedule("1f1b", 2, 2)
    s.actions[0].insert(1, Action(F, 0, 0))
    with pytest.raises(ScheduleError, match="0F0 appears twice: rank 0 position 0 and rank 0 position 1"):
        s.validate()
    s = build_schedule("1f1b", 2, 2)
    s.actions[0].append(s.actions[1].pop())
    with pytest.raises(ScheduleError, match="runs chunk 1, which lives on rank 1"):
        s.validate()
    s = build_schedule("1f1b", 2, 2)
    s.actions[0].append(Action(F, 0, 2))
    with pytest.raises(ScheduleError, match="microbatches are 0..1"):
        s.validate()
    s = build_schedule("1f1b", 2, 1)
    s.actions[1].append(Action(B, 1, 0))
    with pytest.raises(ScheduleError, match="fused backward 1BW0 and also a split B/W"):
        s.validate()


def test_same_rank_order_violation_is_reported_with_positions():
    s = _schedule(Placement.plain(2), 1, ["0F0 0BW0", "1BW0 1F0"])
    with pytest.raises(ScheduleError, match="rank 1 position 0 runs 1BW0 before the 1F0 it needs .*position 1"):
        s.validate()


def test_cross_rank_deadlock_names_both_stuck_ranks():
    # rank 1 wants 1F1 (needs 0F1) before 1BW0; rank 0 wants 0BW0 (needs 1BW0) before 0F1: a cycle.
    s = _schedule(Placement.plain(2), 2, ["0F0 0BW0 0F1 0BW1", "1F0 1F1 1BW0 1BW1"])
    with pytest.raises(ScheduleError, match=r"deadlock: rank 0 is stuck at position 1 \(0BW0\) waiting for 1BW0 .*"
                                            r"rank 1 is stuck at position 1 \(1F1\)"):
        s.validate()


def test_rank_count_must_match_placement():
    s = _schedule(Placement.plain(2), 1, ["0F0 0BW0"])
    with pytest.raises(ScheduleError, match="action lists for 1 ranks but the placement has pp = 2"):
        s.validate()


# ------------------------------------------------------------------------------------------ import / export

@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_torch_order_round_trip(name):
    s = build_schedule(name, 4, 5)
    back = Schedule.from_torch_order(s.to_torch_order())
    assert back.actions == s.actions
    assert back.placement.rank_of_chunk == s.placement.rank_of_chunk
    assert back.num_microbatches == 5
    expected_style = {"interleaved": "interleaved", "v-min": "v", "v-half": "v", "v-zb": "v"}.get(name, "plain")
    assert back.placement.style == expected_style


def test_torch_order_with_idle_slots_and_action_objects():
    torch_schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    order = {0: ["0F0", None, "0I0", "0W0"], 1: [None, torch_schedules._Action.from_str("1F0"), "1I0", "", "1W0"]}
    s = Schedule.from_torch_order(order)
    assert s.actions == [[Action(F, 0, 0), Action(B, 0, 0), Action(W, 0, 0)], [Action(F, 1, 0), Action(B, 1, 0), Action(W, 1, 0)]]


def test_torch_order_with_a_stage_on_two_ranks_is_rejected():
    with pytest.raises(ScheduleError, match="stage 0 appears on ranks 0 and 1"):
        Schedule.from_torch_order({0: ["0F0"], 1: ["0B0"]})


def test_csv_is_torch_compute_only_format_and_round_trips():
    s = build_schedule("v-zb", 3, 4)
    text = s.to_csv()
    rows = list(csv.reader(io.StringIO(text)))
    assert len(rows) == 3 and rows[0][0] == "0F0"
    assert rows == [s.to_torch_order()[r] for r in range(3)]
    back = Schedule.from_csv(text)
    assert back.actions == s.actions and back.placement.style == "v"


def test_describe_lists_every_rank():
    text = build_schedule("1f1b", 2, 2).describe().splitlines()
    assert text == ["rank 0: 0F0 0F1 0BW0 0BW1", "rank 1: 1F0 1BW0 1F1 1BW1"]
