"""Measured pipeline timelines without processes: the recorder's marks, the record helpers (bubbles, fitted costs,
checks against a schedule) and the measured-vs-simulated picture, on synthetic records. The multi-process checks
(records of real gloo ranks, the wait for a peer counted as idle) run in test_pipeline_executor.py's pp=2 launch."""

from __future__ import annotations

import random
import time

import pytest

from effdist.pipeline import timeline
from effdist.pipeline.ir import BW, F, W, Action
from effdist.pipeline.render import write_measured_png
from effdist.pipeline.schedules import build_schedule
from effdist.pipeline.simulate import Costs, Timing, simulate

PNG = b"\x89PNG\r\n\x1a\n"


def _flat(result) -> list[Timing]:
    return [t for row in result.timings for t in row]


def _jittered(result, seconds_per_unit: float, seed: int = 0) -> list[Timing]:
    """A 'measured' step: the simulation in seconds, each action shortened by up to 10% (gaps appear)."""
    rng = random.Random(seed)
    out = []
    for t in _flat(result):
        start, end = t.start * seconds_per_unit, t.end * seconds_per_unit
        out.append(Timing(t.action, t.rank, start, end - rng.random() * 0.1 * (end - start)))
    return out


def test_recorder_marks_each_action_in_order_on_cpu():
    import torch

    recorder = timeline.StepRecorder(rank=3, device=torch.device("cpu"))
    recorder.begin()
    actions = [Action(F, 0, 0), Action(F, 0, 1), Action(BW, 0, 0)]
    for action in actions:
        time.sleep(0.002)  # idle between actions
        recorder.start()
        time.sleep(0.01)
        recorder.stop(action)
    records = recorder.timings()
    assert [r.action for r in records] == actions and {r.rank for r in records} == {3}
    assert records[0].start >= 0.002
    for r in records:
        assert r.end - r.start >= 0.01
    for a, b in zip(records, records[1:]):
        assert b.start >= a.end + 0.002


def test_recorder_refuses_unpaired_marks():
    import torch

    recorder = timeline.StepRecorder(rank=0, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="begin"):
        recorder.start()
    recorder.begin()
    with pytest.raises(RuntimeError, match="without a matching start"):
        recorder.stop(Action(F, 0, 0))


def test_records_survive_json():
    records = _flat(simulate(build_schedule("v-zb", 2, 3)))
    assert timeline.from_dicts(timeline.to_dicts(records)) == records


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "v-min", "interleaved"])
def test_bubbles_of_a_simulated_timeline_are_the_simulators(name):
    result = simulate(build_schedule(name, 4, 8), Costs(1.0, 1.3, 0.7, comm=0.2))
    seen = timeline.bubbles(timeline.by_rank(_flat(result), 4))
    assert seen.makespan == pytest.approx(result.makespan)
    assert seen.overall == pytest.approx(result.bubble_rate)
    assert seen.ranks == pytest.approx([r.bubble_rate for r in result.ranks])


def test_measured_bubbles_count_leading_and_trailing_idle():
    rows = [[Timing(Action(F, 0, 0), 0, 0.0, 1.0), Timing(Action(BW, 0, 0), 0, 3.0, 4.0)],
            [Timing(Action(F, 1, 0), 1, 1.0, 2.0), Timing(Action(BW, 1, 0), 1, 2.0, 3.0)]]
    seen = timeline.bubbles(rows)
    assert seen.makespan == 4.0
    assert seen.ranks == [0.5, 0.5]
    assert seen.overall == 0.5


@pytest.mark.parametrize("name", ["zb-h1", "v-zb", "v-min"])
def test_fit_costs_recovers_the_costs_of_a_split_schedule(name):
    schedule = build_schedule(name, 4, 8)
    costs = Costs(forward=3.0, backward_input=2.0, backward_weight=1.5)
    fitted = timeline.fit_costs(_flat(simulate(schedule, costs)), schedule)
    assert (fitted.forward, fitted.backward_input, fitted.backward_weight) == pytest.approx((3.0, 2.0, 1.5))


def test_fit_costs_splits_a_fused_backward_evenly():
    schedule = build_schedule("interleaved", 2, 4, chunks_per_rank=2)
    fitted = timeline.fit_costs(_flat(simulate(schedule, Costs(3.0, 2.0, 1.0))), schedule)
    assert (fitted.forward, fitted.backward_input, fitted.backward_weight) == pytest.approx((3.0, 1.5, 1.5))


def test_records_are_checked_against_the_schedule():
    schedule = build_schedule("1f1b", 2, 3)
    rows = timeline.by_rank(_flat(simulate(schedule)), 2)
    timeline.check_against(rows, schedule)
    swapped = [list(rows[0]), list(rows[1])]
    a, b = swapped[1][1], swapped[1][2]
    swapped[1][1], swapped[1][2] = Timing(b.action, 1, a.start, a.end), Timing(a.action, 1, b.start, b.end)
    with pytest.raises(ValueError, match="rank 1: .* at position 1"):
        timeline.check_against(swapped, schedule)
    with pytest.raises(ValueError, match=r"rank 0: .*\(5 recorded, 6 scheduled\)"):
        timeline.check_against([rows[0][:-1], rows[1]], schedule)
    with pytest.raises(ValueError, match="rank 2, outside"):
        timeline.by_rank(_flat(simulate(build_schedule("1f1b", 3, 3))), 2)


@pytest.mark.parametrize("in_seconds", [False, True])
def test_measured_png_from_synthetic_records(tmp_path, in_seconds):
    schedule = build_schedule("v-half", 4, 8)
    measured = _jittered(simulate(schedule, Costs(1.0, 1.2, 0.8, comm=0.1)), seconds_per_unit=0.004)
    simulated = simulate(schedule, timeline.fit_costs(measured, schedule)) if in_seconds else simulate(schedule)
    path = write_measured_png(measured, simulated, tmp_path / "deep" / "t.png", simulated_in_seconds=in_seconds)
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000


def test_measured_png_refuses_records_of_another_schedule(tmp_path):
    measured = _jittered(simulate(build_schedule("1f1b", 2, 4)), seconds_per_unit=0.01)
    with pytest.raises(ValueError, match="differ from schedule zb-h1"):
        write_measured_png(measured, simulate(build_schedule("zb-h1", 2, 4)), tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "v-min", "interleaved"])
def test_fit_chunk_costs_keeps_a_slow_last_chunk_that_fit_costs_averages_away(name):
    # The last chunk carries the LM head and loss: 1.8x the others' time, as on the p=4 runs of docs/benchmarks.md.
    schedule = build_schedule(name, 4, 8, chunks_per_rank=2) if name == "interleaved" else build_schedule(name, 4, 8)
    base = Costs(forward=3.0, backward_input=2.0, backward_weight=1.5)
    chunks = [base] * (schedule.num_chunks - 1) + [Costs(5.4, 3.6, 2.7)]
    measured = simulate(schedule, chunk_costs=chunks)
    fitted = timeline.fit_chunk_costs(_flat(measured), schedule)
    fused = not any(a.kind is W for row in schedule.actions for a in row)  # one BW action: B + W, split evenly
    for got, want in zip(fitted, chunks):
        assert got.forward == pytest.approx(want.forward)
        if fused:
            assert got.backward_input == got.backward_weight == pytest.approx(
                (want.backward_input + want.backward_weight) / 2)
        else:
            assert (got.backward_input, got.backward_weight) == pytest.approx(
                (want.backward_input, want.backward_weight))
    # Simulated again with them: the measured timeline exactly (nothing unmodelled in a simulated one).
    again = simulate(schedule, chunk_costs=fitted)
    assert again.makespan == pytest.approx(measured.makespan)
    assert [r.bubble_rate for r in again.ranks] == pytest.approx([r.bubble_rate for r in measured.ranks])
    # One cost for every chunk (the median) hides the slow stage: a step at least 5% shorter than measured.
    uniform = simulate(schedule, timeline.fit_costs(_flat(measured), schedule))
    assert uniform.makespan < 0.95 * measured.makespan, (uniform.makespan, measured.makespan)


def test_measured_png_titles_per_chunk_costs(tmp_path, monkeypatch):
    from effdist.pipeline import render

    schedule = build_schedule("1f1b", 2, 4)
    measured = _flat(simulate(schedule, chunk_costs=[Costs(0.010, 0.012, 0.012), Costs(0.015, 0.020, 0.020)]))
    per_chunk = simulate(schedule, chunk_costs=timeline.fit_chunk_costs(measured, schedule))
    titles = []
    real = render._rank_axis

    def rank_axis(ax, pp, span, title):
        titles.append(title)
        real(ax, pp, span, title)

    monkeypatch.setattr(render, "_rank_axis", rank_axis)
    write_measured_png(measured, per_chunk, tmp_path / "t.png", simulated_in_seconds=True)
    assert titles[1].startswith("simulated, costs per chunk F 10-15 ms, B 12-20 ms, W 12-20 ms: makespan="), titles[1]
    uniform = simulate(schedule, timeline.fit_costs(measured, schedule))
    write_measured_png(measured, uniform, tmp_path / "u.png", simulated_in_seconds=True)
    assert titles[3].startswith("simulated, costs per stage F "), titles[3]
