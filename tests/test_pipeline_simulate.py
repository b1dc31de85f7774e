"""Simulator timing and memory, the activation-bytes model, the timeline pictures and the `effdist simulate` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from effdist.pipeline.ir import BW, F, Action, Placement, Schedule
from effdist.pipeline.memory_model import (
    ActivationShape, chunk_activation_bytes, layer_partition, megatron_layer_bytes, shape_from_config,
)
from effdist.pipeline.render import render_svg, write_png, write_svg
from effdist.pipeline.schedules import SCHEDULE_NAMES, build_schedule
from effdist.pipeline.simulate import Costs, rank_seconds, simulate
from effdist.pipeline.simulate_cli import main

REPO = Path(__file__).resolve().parents[1]
SVG_NS = "{http://www.w3.org/2000/svg}"


# ------------------------------------------------------------------------------------------ timing

def test_costs_reject_non_positive_times():
    with pytest.raises(ValueError, match="Costs.forward = 0"):
        Costs(forward=0)
    with pytest.raises(ValueError, match="Costs.comm = -1"):
        Costs(comm=-1)
    assert Costs(1, 2, 3).of(BW) == 5


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_action_starts_as_early_as_order_dependencies_and_latency_allow(name):
    costs = Costs(1.0, 1.5, 0.7, 0.3)
    result = simulate(build_schedule(name, 3, 7, costs=costs), costs)
    schedule = result.schedule
    end = {t.action: t.end for row in result.timings for t in row}
    fraction = schedule.placement.chunk_fraction()
    for rank, row in enumerate(result.timings):
        previous_end = 0.0
        for t in row:
            assert t.rank == rank and t.end - t.start == pytest.approx(costs.of(t.action.kind) * fraction)
            ready = previous_end
            for producer in schedule.producers(t.action):
                latency = 0.0 if schedule.rank_of(producer.chunk) == rank else costs.comm
                ready = max(ready, end[producer] + latency)
            assert t.start == pytest.approx(ready)  # "squeezed": no later than needed, never earlier
            previous_end = t.end
    assert result.makespan == pytest.approx(max(end.values()))


def test_bubble_rates_follow_their_definitions():
    result = simulate(build_schedule("v-half", 4, 9), Costs(1, 2, 1, 0.1))
    for r in result.ranks:
        assert r.bubble_rate == pytest.approx((result.makespan - r.busy) / result.makespan)
    total_busy = sum(r.busy for r in result.ranks)
    assert result.bubble_rate == pytest.approx(1 - total_busy / (4 * result.makespan))


def test_hand_built_schedule_timeline_and_memory():
    # 2 ranks, 1 chunk each, fused backward, 2 microbatches in GPipe order on rank 0.
    s = Schedule(Placement.plain(2), 2, [
        [Action(F, 0, 0), Action(F, 0, 1), Action(BW, 0, 0), Action(BW, 0, 1)],
        [Action(F, 1, 0), Action(BW, 1, 0), Action(F, 1, 1), Action(BW, 1, 1)],
    ])
    result = simulate(s, Costs(1, 1, 1, 0.5))
    start = {t.action: t.start for row in result.timings for t in row}
    assert start[Action(F, 1, 0)] == 1.5  # after 0F0 (ends 1) + latency 0.5
    assert start[Action(BW, 1, 0)] == 2.5  # loss: right after its own forward, no latency on the same rank
    assert start[Action(F, 1, 1)] == 4.5
    assert start[Action(BW, 0, 0)] == 5.0  # 1BW0 ends 4.5, + 0.5
    assert result.makespan == 10.0
    assert [r.peak_activation_units for r in result.ranks] == [2, 1]
    assert result.ranks[0].memory_units == [(0.0, 1.0), (1.0, 2.0), (7.0, 1.0), (10.0, 0.0)]



@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_chunk_costs_equal_to_the_stage_costs_reproduce_the_default_exactly(name):
    # Dyadic costs and chunk fractions (1, 1/2): costs x fraction is exact, so the timelines must match bit for bit.
    costs = Costs(1.0, 1.5, 0.75, 0.25)
    schedule = build_schedule(name, 4, 9, costs=costs)
    f = schedule.placement.chunk_fraction()
    per_chunk = [Costs(costs.forward * f, costs.backward_input * f, costs.backward_weight * f)] * schedule.num_chunks
    old, new = simulate(schedule, costs), simulate(schedule, costs, chunk_costs=per_chunk)
    assert new.makespan == old.makespan and new.bubble_rate == old.bubble_rate
    assert [[(t.action, t.start, t.end) for t in row] for row in new.timings] == \
        [[(t.action, t.start, t.end) for t in row] for row in old.timings]
    assert old.chunk_costs is None and "chunk_costs" not in old.to_dict()
    assert new.to_dict()["chunk_costs"][0] == per_chunk[0].to_dict()
    with pytest.raises(ValueError, match="chunk_costs has 1 entries"):
        simulate(schedule, costs, chunk_costs=per_chunk[:1])


def test_one_heavy_chunk_by_hand_on_a_v_schedule():
    # V-Min, pp = 2, 2 microbatches: chunks 0 and 3 on rank 0, 1 and 2 on rank 1. Chunk 3 holds the LM head and
    # loss: F = 2, B = 2 (W = 1); every other chunk F = B = W = 1 (seconds of the whole chunk), no latency.
    schedule = build_schedule("v-min", 2, 2)
    assert schedule.placement.rank_of_chunk == (0, 1, 1, 0)
    light, heavy = Costs(1, 1, 1), Costs(2, 2, 1)
    result = simulate(schedule, Costs(comm=0.0), chunk_costs=[light, light, light, heavy])
    # Hand timeline (start, end); each action waits for its rank and its producers:
    #   rank 0: 0F0 0-1, 0F1 1-2, 3F0 3-5 (after 2F0), 3B0 5-7, 3W0 7-8, 3F1 8-10, 0B0 10-11 (after 1B0 at 9),
    #           3B1 11-13, 0W0 13-14, 3W1 14-15, 0B1 15-16 (after 1B1), 0W1 16-17
    #   rank 1: 1F0 1-2, 2F0 2-3, 1F1 3-4, 2F1 4-5, 2B0 7-8 (after 3B0), 1B0 8-9, 2W0 9-10, 1W0 10-11,
    #           2B1 13-14 (after 3B1), 1B1 14-15, 2W1 15-16, 1W1 16-17
    want = [
        [(0, 1), (1, 2), (3, 5), (5, 7), (7, 8), (8, 10), (10, 11), (11, 13), (13, 14), (14, 15), (15, 16), (16, 17)],
        [(1, 2), (2, 3), (3, 4), (4, 5), (7, 8), (8, 9), (9, 10), (10, 11), (13, 14), (14, 15), (15, 16), (16, 17)],
    ]
    assert [[(t.start, t.end) for t in row] for row in result.timings] == want
    assert result.makespan == 17
    assert rank_seconds(schedule, [light, light, light, heavy]) == [8, 6]  # per microbatch: 3 + 5 and 3 + 3
    assert result.bubble_rate == pytest.approx(1 - (2 * 8 + 2 * 6) / (2 * 17))
    # The old model charged every chunk as the heavy one (per 1F1B stage: 2 chunks x the slowest): much later.
    slowest = Costs(2 * heavy.forward, 2 * heavy.backward_input, 2 * heavy.backward_weight)
    assert simulate(schedule, slowest).makespan >= 2 * 2 * 5 > 17


def test_chunk_costs_take_the_latency_from_costs():
    # 1F1B, pp = 2, one microbatch: 0F0, (comm) 1F0, 1BW0, (comm) 0BW0.
    schedule = build_schedule("1f1b", 2, 1)
    result = simulate(schedule, Costs(comm=0.5), chunk_costs=[Costs(1, 2, 3, comm=9), Costs(2, 3, 4, comm=9)])
    assert result.makespan == 1 + 0.5 + 2 + (3 + 4) + 0.5 + (2 + 3)

# ------------------------------------------------------------------------------------------ memory

def test_chunk_activation_is_a_fraction_of_a_stage():
    v = simulate(build_schedule("v-zb", 2, 2))
    assert v.ranks[0].memory_units[0] == (0.0, 0.5)  # first forward of a V chunk: half a unit
    inter = simulate(build_schedule("interleaved", 2, 2, chunks_per_rank=4))
    assert inter.ranks[0].memory_units[0] == (0.0, 0.25)


def test_b_frees_moves_memory_release_from_w_to_b():
    schedule = build_schedule("zb-h1", 4, 8)
    peaks = lambda frac: [r.peak_activation_units for r in simulate(schedule, b_frees=frac).ranks]
    assert peaks(0.0) == [4, 4, 4, 4]  # everything held until the deferred W
    assert peaks(1.0) == [4, 3, 2, 1]  # everything freed at B: the 1F1B profile
    half = peaks(0.5)
    assert all(lo <= x <= hi for lo, x, hi in zip(peaks(1.0), half, peaks(0.0)))
    assert half[3] == pytest.approx(2.5)  # rank 3: one live microbatch plus half of the 3 deferred ones
    with pytest.raises(ValueError, match="b_frees = 1.5"):
        simulate(schedule, b_frees=1.5)


def test_bytes_follow_units_when_layers_split_evenly():
    shape = ActivationShape(seq_length=128, micro_batch=2, hidden_size=256, num_attention_heads=4, num_layers=16)
    per_layer = megatron_layer_bytes(shape)
    for name in ("1f1b", "v-min", "interleaved"):
        schedule = build_schedule(name, 4, 8)
        chunk_bytes = chunk_activation_bytes(16, schedule.num_chunks, lambda _: per_layer)
        result = simulate(schedule, chunk_bytes=chunk_bytes)
        stage_bytes = 4 * per_layer  # 16 layers over 4 stages
        for r in result.ranks:
            assert r.peak_activation_bytes == pytest.approx(r.peak_activation_units * stage_bytes)


def test_megatron_formula_by_hand():
    shape = ActivationShape(seq_length=4, micro_batch=2, hidden_size=8, num_attention_heads=2, num_layers=1,
                            flash_attention=False)
    sbh = 4 * 2 * 8
    assert megatron_layer_bytes(shape) == sbh * (34 + 5 * 2 * 4 / 8)
    flash = ActivationShape(4, 2, 8, 2, 1)
    assert megatron_layer_bytes(flash) == sbh * 34  # no stored score matrix with flash/SDPA attention
    tp2 = ActivationShape(4, 2, 8, 2, 1, tp=2, flash_attention=False)
    assert megatron_layer_bytes(tp2) == sbh * (10 + 24 / 2 + 5 * 2 * 4 / (8 * 2))
    sp2 = ActivationShape(4, 2, 8, 2, 1, tp=2, sequence_parallel=True, flash_attention=False)
    assert megatron_layer_bytes(sp2) == sbh * (34 + 5 * 2 * 4 / 8) / 2
    fp32 = ActivationShape(4, 2, 8, 2, 1, bytes_per_element=4)
    assert megatron_layer_bytes(fp32) == 2 * sbh * 34


def test_layer_partition_and_per_layer_hook():
    assert [len(r) for r in layer_partition(10, 4)] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 chunks"):
        layer_partition(3, 4)
    # e.g. an EPAS-like variant where layers 4..7 store 25% less
    bytes_ = chunk_activation_bytes(8, 4, lambda i: 75.0 if i >= 4 else 100.0)
    assert bytes_ == [200.0, 200.0, 150.0, 150.0]


def test_shape_from_an_effdist_config(tmp_path):
    from effdist.config import load_config

    cfg_path = tmp_path / "m.yaml"
    cfg_path.write_text("model: {num_layers: 8, hidden_size: 64, num_attention_heads: 4}\n"
                        "data: {seq_length: 32}\ntrain: {micro_batch: 2, dtype: fp32}\nparallel: {tp: 2}\n")
    shape = shape_from_config(load_config(cfg_path))
    assert (shape.seq_length, shape.micro_batch, shape.hidden_size, shape.num_layers, shape.tp,
            shape.bytes_per_element) == (32, 2, 64, 8, 2, 4)


# ------------------------------------------------------------------------------------------ pictures

def test_svg_has_one_rect_per_action(tmp_path):
    results = [simulate(build_schedule(n, 3, 5)) for n in ("1f1b", "v-half")]
    path = write_svg(results, tmp_path / "t.svg")
    root = ET.parse(path).getroot()
    rects = root.findall(f".//{SVG_NS}rect")
    assert len(rects) == sum(len(r.schedule) for r in results)
    labelled = sorted((int(r.get("data-rank")), r.get("data-action")) for r in rects)
    expected = sorted((rank, str(a)) for res in results for rank, acts in enumerate(res.schedule.actions) for a in acts)
    assert labelled == expected
    assert "v-half" in render_svg(results[1])


def test_png_is_written(tmp_path):
    path = write_png(simulate(build_schedule("v-min", 2, 3)), tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ CLI

def test_cli_prints_a_table_and_writes_the_json_contract(tmp_path, capsys):
    out = tmp_path / "one.json"
    assert main(["--schedule", "v-half", "--pp", "4", "--microbatches", "16", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "v-half" in table and "5.0%" in table
    data = json.loads(out.read_text())
    assert {"schedule", "pp", "microbatches", "makespan", "bubble_rate", "ranks"} <= set(data)
    assert data["schedule"] == "v-half" and data["pp"] == 4 and data["microbatches"] == 16
    assert [r["rank"] for r in data["ranks"]] == [0, 1, 2, 3]
    assert all(r["peak_activation_units"] == 3 and 0 <= r["bubble_rate"] < 1 for r in data["ranks"])
    assert "peak_activation_bytes" not in data["ranks"][0]


def test_cli_compare_with_model_writes_schedules_list_and_pictures(tmp_path, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model: {num_layers: 8, hidden_size: 64, num_attention_heads: 4}\n"
                   "data: {seq_length: 32}\ntrain: {micro_batch: 2, dtype: bf16}\n")
    out, svg, png = tmp_path / "c.json", tmp_path / "c.svg", tmp_path / "c.png"
    rc = main(["--compare", "1f1b,v-half,v-min", "--pp", "2", "--microbatches", "4", "--cost-comm", "0.1",
               "--model", str(cfg), "--json", str(out), "--svg", str(svg), "--png", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "peak GiB" in printed and printed.splitlines()[-1] == f"wrote {out}, {svg}, {png}"  # where to look
    data = json.loads(out.read_text())
    assert [s["schedule"] for s in data["schedules"]] == ["1f1b", "v-half", "v-min"]
    stage_bytes = 4 * 32 * 2 * 64 * 34  # 8 layers over 2 stages, flash attention, bf16
    for entry in data["schedules"]:
        for r in entry["ranks"]:
            assert r["peak_activation_bytes"] == pytest.approx(r["peak_activation_units"] * stage_bytes)
    rects = ET.parse(svg).getroot().findall(f".//{SVG_NS}rect")
    assert len(rects) == sum(len(build_schedule(n, 2, 4)) for n in ("1f1b", "v-half", "v-min"))
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["--schedule", "1f1b", "--pp", "1", "--microbatches", "4"], "--pp 1: a pipeline needs at least 2 ranks"),
    (["--schedule", "gpipe", "--pp", "4", "--microbatches", "4"], "unknown schedule 'gpipe'"),
    (["--schedule", "v-half", "--pp", "4", "--microbatches", "4", "--chunks-per-rank", "3"], "exactly 2 chunks per rank"),
    (["--schedule", "v-half", "--pp", "4", "--microbatches", "0"], "--microbatches 0: must be >= 1"),
    (["--schedule", "v-half", "--pp", "4", "--microbatches", "4", "--cost-w", "-1"], "--cost-w = -1.0"),
    (["--pp", "4", "--microbatches", "4"], "give --schedule NAME or --compare"),
    (["--schedule", "v-min", "--pp", "4", "--microbatches", "4", "--model", "no/such.yaml"], "does not exist"),
    (["--schedule", "v-min", "--pp", "4"], "required: --microbatches"),
    # sizes that would run for hours and grow memory until the OOM killer ends them
    (["--schedule", "1f1b", "--pp", "4", "--microbatches", "10000000000"],
     "--microbatches 10000000000: 4 ranks x 10000000000 microbatches x 1 chunk(s) per rank is more than 1,000,000"),
    (["--schedule", "v-zb", "--pp", "10000", "--microbatches", "1"], "--pp 10000: 10000 ranks x 2 chunk(s)"),
    (["--schedule", "interleaved", "--pp", "4", "--microbatches", "16", "--chunks-per-rank", "1000000"],
     "--chunks-per-rank 1000000: 4 ranks x 1000000 chunk(s)"),
])
def test_cli_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_model_takes_a_presets_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--compare", "1f1b,v-min", "--pp", "4", "--microbatches", "8", "--model", "llama-1b",
                 "--json", "out.json"]) == 0
    assert "peak GiB" in capsys.readouterr().out
    first, v_min = json.loads((tmp_path / "out.json").read_text())["schedules"]
    assert 0 < v_min["peak_activation_bytes"] < first["peak_activation_bytes"]


def test_tools_script_is_the_same_entry_point():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "simulate_pipeline.py"), "--compare", "1f1b,v-zb",
                           "--pp", "2", "--microbatches", "3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "1f1b" in proc.stdout and "v-zb" in proc.stdout
