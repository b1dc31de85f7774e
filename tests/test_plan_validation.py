"""`tools/bench_plan.py --predict-pipeline` (issue 26 item 4): the planner's predictions for the measured p=4
pipeline runs (docs/results/pipeline_p4_*.json), and the generator of its docs/benchmarks.md block. CPU only: the
shipped H100 calibration stands in for the H200 one a GPU run will write."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys

import pytest

from tests.launching import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_plan  # noqa: E402
import benchmark_tables  # noqa: E402

RUNS = sorted((ROOT / "docs" / "results").glob("pipeline_p4_*.json"))
H100_1B = ROOT / "configs" / "calibrations" / "h100-llama-1b.json"


def _model(path) -> str:
    return json.loads(path.read_text())["model"]


def predict(tmp_path, runs=RUNS, *flags: str) -> tuple[int, str, dict]:
    out = tmp_path / "p4.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench_plan.main(["--predict-pipeline", *map(str, runs), *flags, "--json", str(out)])
    return rc, buf.getvalue(), json.loads(out.read_text())


@pytest.fixture(scope="module")
def h100(tmp_path_factory):
    """The mode on the real runs with the shipped calibrations, H100 ones asked for (no h100-llama-7b exists)."""
    return predict(tmp_path_factory.mktemp("p4"), RUNS, "--device-prefix", "h100")


def test_the_measured_runs_are_there():
    assert {_model(p) for p in RUNS} == {"llama-1b", "llama-7b"}
    assert not (ROOT / "configs" / "calibrations" / "h100-llama-7b.json").exists()


def test_every_row_of_the_1b_runs_is_predicted_or_said_why_not(h100):
    rc, _, data = h100
    assert rc == 0
    for path in (p for p in RUNS if _model(p) == "llama-1b"):
        run = json.loads(path.read_text())
        rows = [r for r in data["rows"] if r["file"] == str(path.relative_to(ROOT))]
        assert [(r["schedule"], r["engine"]) for r in rows] == [(m["schedule"], m["engine"]) for m in run["results"]]
        for r, measured in zip(rows, run["results"]):
            assert (r["tp"], r["pp"], r["dp"], r["recompute"]) == (1, 4, 1, False)
            assert (r["micro_batch"], r["microbatches"], r["seq_length"]) == (run["micro_batch"], 16, 2048)
            assert r["measured_tokens_per_s"] == measured["tokens_per_s"]
            assert r["measured_peak_mem_gib"] == max(measured["peak_mem_gib"])
            if r["engine"] == "megatron-core":
                assert not r["predicted"] and r["not_predicted"].startswith("megatron-core's own 1f1b executor")
                continue
            assert r["predicted"] and r["not_predicted"] is None
            for key in ("tokens_per_s_ratio", "peak_mem_ratio", "predicted_tokens_per_s", "predicted_peak_mem_gib",
                        "predicted_bubble"):
                assert math.isfinite(r[key]) and r[key] > 0, (r["schedule"], key, r[key])
            assert r["tokens_per_s_ratio"] == pytest.approx(r["predicted_tokens_per_s"] / r["measured_tokens_per_s"])
            assert r["peak_mem_ratio"] == pytest.approx(r["predicted_peak_mem_gib"] / r["measured_peak_mem_gib"])
            assert f"pipeline.schedule={r['schedule']}" in r["overrides"]
            # bench_pipeline allocates no optimizer: the compared peak leaves Adam's state out, the planner's keeps it
            assert r["planner_peak_mem_gib"] > r["predicted_peak_mem_gib"]
            assert r["planner_tokens_per_s"] < r["predicted_tokens_per_s"]


def test_a_run_without_a_calibration_is_skipped_in_one_line(h100):
    _, out, data = h100
    lines = [line for line in out.splitlines() if "pipeline_p4_7b" in line]
    assert lines == ["docs/results/pipeline_p4_7b_mb1_h200x4.json: no calibration for llama-7b "
                     "(configs/calibrations/h100-llama-7b.json does not exist); skipped"]
    assert not [r for r in data["rows"] if r["model"] == "llama-7b"]
    assert data["skipped"] == [{"file": "docs/results/pipeline_p4_7b_mb1_h200x4.json", "model": "llama-7b",
                                "reason": "no calibration for llama-7b (configs/calibrations/h100-llama-7b.json "
                                          "does not exist)"}]


def test_the_json_names_its_calibration_and_the_table_is_printed(h100):
    _, out, data = h100
    cal = json.loads(H100_1B.read_text())
    assert set(data) >= {"date", "commit", "command", "goal", "compared", "calibrations", "skipped", "rows"}
    assert data["goal"] == {"tokens_per_s_within": 0.15, "peak_mem_within": 0.15}
    assert data["calibrations"] == [{"path": "configs/calibrations/h100-llama-1b.json", "device": cal["device"],
                                     "date": cal["date"], "model": "llama-1b", "command": cal["command"]}]
    assert {r["calibration"] for r in data["rows"]} == {"configs/calibrations/h100-llama-1b.json"}
    assert "calibration configs/calibrations/h100-llama-1b.json is of NVIDIA H100 80GB HBM3, the run of NVIDIA H200" in out
    assert out.count("not predicted: megatron-core") == 2
    assert "within 15%: tokens/s" in out and "not predicted: 2" in out


def test_predicted_memory_follows_the_schedules(h100):
    """1F1B's first rank holds p microbatches of activations, V-Min's (p+4)//3: V-Min's rank 0 is lower."""
    _, _, data = h100
    for mb in (1, 4):
        rows = {r["schedule"]: r for r in data["rows"] if r["micro_batch"] == mb and r["engine"] == "effdist"}
        f1b, vmin = rows["1f1b"]["predicted_peak_mem_gib_per_rank"], rows["v-min"]["predicted_peak_mem_gib_per_rank"]
        assert f1b[0] > vmin[0] + 0.1 * mb
        assert f1b[0] > f1b[1] > f1b[2]
        assert vmin[1] == pytest.approx(vmin[2]) == pytest.approx(vmin[3])
    mb4 = [r for r in data["rows"] if r["micro_batch"] == 4 and r["predicted"]]
    mb1 = {r["schedule"]: r for r in data["rows"] if r["micro_batch"] == 1 and r["predicted"]}
    for r in mb4:
        assert r["predicted_peak_mem_gib"] > 2 * mb1[r["schedule"]]["predicted_peak_mem_gib"]


def test_the_numbers_are_the_planners(h100):
    """Each row is what `effdist plan` itself predicts for that layout (its full step, optimizer included)."""
    from effdist.config import load_config
    from effdist.pipeline.calibration import Calibration
    from effdist.train.planner import Space, plan

    _, _, data = h100
    cal = Calibration.load(H100_1B)
    base = load_config("llama-1b", bench_plan.PIPELINE_BENCH_OVERRIDES)
    for r in (r for r in data["rows"] if r["predicted"]):
        space = Space(gpus=4, schedules=(r["schedule"],), micro_batches=(r["micro_batch"],), recompute=(False,),
                      zero1=(False,), max_tp=1)
        fitting, _ = plan(base, cal, space, 1000.0, global_batch=16 * r["micro_batch"], seq=2048)
        (p,) = [p for p in fitting if p.choice.pp == 4]
        assert p.tokens_per_s == pytest.approx(r["planner_tokens_per_s"], rel=1e-12)
        assert p.peak_mem_gib == pytest.approx(r["planner_peak_mem_gib"], rel=1e-12)
        assert p.bubble == pytest.approx(r["predicted_bubble"], rel=1e-12)
        assert p.overrides == r["overrides"]


def test_the_prediction_follows_the_calibration(tmp_path):
    """Layers twice as slow in the calibration: every schedule predicted slower, its memory unchanged."""
    slow = json.loads(H100_1B.read_text())
    for layer in slow["layers"]:
        layer["forward_s"] *= 2
        layer["backward_s"] *= 2
    cal_dir = tmp_path / "cal"
    cal_dir.mkdir()
    (cal_dir / "h100-llama-1b.json").write_text(json.dumps(slow))
    mb4 = [p for p in RUNS if p.name == "pipeline_p4_1b_mb4_h200x4.json"]
    _, _, shipped = predict(tmp_path, mb4, "--device-prefix", "h100")
    _, _, slower = predict(tmp_path, mb4, "--device-prefix", "h100", "--calibration-dir", str(cal_dir))
    pairs = [(a, b) for a, b in zip(shipped["rows"], slower["rows"]) if a["predicted"]]
    assert len(pairs) == 6
    for a, b in pairs:
        assert 1.5 < a["predicted_tokens_per_s"] / b["predicted_tokens_per_s"] <= 2.0
        assert a["predicted_peak_mem_gib"] == b["predicted_peak_mem_gib"]
    assert slower["calibrations"][0]["path"] == str(cal_dir / "h100-llama-1b.json")


def test_by_default_the_runs_card_is_looked_up_and_7b_is_predicted_once_it_has_one(tmp_path):
    """Without --device-prefix the H200 runs want h200-<model>.json: with those present (here copies of the
    H100 1B table; for 7B the planner scales it by FLOPs) every effdist row of every run is predicted."""
    assert bench_plan.device_prefix("NVIDIA H200") == "h200"
    assert bench_plan.device_prefix("NVIDIA H100 80GB HBM3") == "h100"
    assert bench_plan.device_prefix("cpu") is None
    rc, out, data = predict(tmp_path, RUNS, "--calibration-dir", str(tmp_path))
    assert rc == 1 and len(data["skipped"]) == 3 and not data["rows"]
    assert out.count("skipped") == 3 and "h200-llama-1b.json does not exist" in out
    for model in ("llama-1b", "llama-7b"):
        shutil.copy(H100_1B, tmp_path / f"h200-{model}.json")
    rc, out, data = predict(tmp_path, RUNS, "--calibration-dir", str(tmp_path))
    assert rc == 0 and not data["skipped"]
    seven = [r for r in data["rows"] if r["model"] == "llama-7b" and r["engine"] == "effdist"]
    assert len(seven) == 6 and all(r["predicted"] and r["calibration_shape_differs"] for r in seven)
    assert {r["calibration"] for r in seven} == {str(tmp_path / "h200-llama-7b.json")}
    one = next(r for r in data["rows"] if r["model"] == "llama-1b" and r["predicted"])
    assert one["calibration_shape_differs"] == []
    # 7B at pp=4: weights 2 + gradients 4 bytes of ~1.7B parameters on a rank, about 10 GiB before activations
    assert all(12 < r["predicted_peak_mem_gib"] < 30 for r in seven)


def test_what_the_planner_cannot_express_is_named():
    run = {"model": "llama-1b", "pp": 4, "micro_batch": 1, "microbatches": 16, "seq_length": 2048}
    reason = bench_plan.not_predicted_reason
    assert reason(run, {"schedule": "gpipe", "engine": "effdist"}).startswith("schedule 'gpipe': the planner knows")
    assert "kernel set 'unfused'" in reason(run, {"schedule": "1f1b", "engine": "effdist", "kernels": "unfused"})
    assert "fused kernels" not in reason(run, {"schedule": "1f1b", "engine": "megatron-core", "kernels": "fused"})
    assert reason(run, {"schedule": "v-zb", "engine": "effdist"}) is None


def test_the_generator_says_when_its_json_is_missing_and_renders_it_when_there(h100, tmp_path):
    missing = benchmark_tables.plan_validation_p4(tmp_path / "none.json")
    assert missing.startswith("*Not yet predicted: none.json does not exist") and "--predict-pipeline" in missing
    path = tmp_path / "p4.json"
    path.write_text(json.dumps(h100[2]))
    text = benchmark_tables.plan_validation_p4(path)
    lines = text.splitlines()
    assert len([line for line in lines if line.startswith("| llama-1b")]) == 14
    v_min = next(r for r in h100[2]["rows"] if r["schedule"] == "v-min" and r["micro_batch"] == 1)
    assert (f"| llama-1b mb1 | V-Min | {v_min['predicted_tokens_per_s']:,.0f} | 147,129 | "
            f"{v_min['tokens_per_s_ratio']:.3f} |") in text
    assert "| llama-1b mb4 | 1F1B (megatron-core) | not predicted: megatron-core's own" in text
    assert "Calibrations: configs/calibrations/h100-llama-1b.json (NVIDIA H100 80GB HBM3, 2026-12-05)." in lines
    assert any(line.startswith("Skipped docs/results/pipeline_p4_7b_mb1_h200x4.json: no calibration") for line in lines)
    assert any(line.startswith("tokens/s: ") and "largest miss" in line for line in lines)


def test_the_block_is_registered_only_once_the_doc_holds_its_marker(tmp_path, monkeypatch):
    def registered(doc_text: str) -> set[str]:
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / benchmark_tables.DOC).write_text(doc_text)
        monkeypatch.setattr(benchmark_tables, "ROOT", tmp_path)
        names = set()
        benchmark_tables.register(lambda doc, name: (lambda fn: names.add(name) or fn))
        return names

    doc = (ROOT / benchmark_tables.DOC).read_text()
    assert "<!-- generated:bench-plan-validation-p4 -->" not in doc  # until an H200 calibration exists
    assert "bench-plan-validation-p4" not in registered(doc)
    marked = doc + "\n<!-- generated:bench-plan-validation-p4 -->\n<!-- end generated:bench-plan-validation-p4 -->\n"
    assert "bench-plan-validation-p4" in registered(marked)


def test_compare_timings_predicts_every_measured_row_with_each_table(tmp_path, capsys):
    """--compare-timings: the pp=1 validation's rows and a pipeline run's rows, each predicted with every named
    table; a table with the layers twice as slow predicts every row at about half the tokens/s, and a table that
    lacks a row's FFN kind leaves that ratio empty instead of failing."""
    slow = json.loads(H100_1B.read_text())
    for layer in slow["layers"]:
        layer["forward_s"] *= 2
        layer["backward_s"] *= 2
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    mb4 = ROOT / "docs" / "results" / "pipeline_p4_1b_mb4_h200x4.json"
    pp1 = ROOT / "docs" / "results" / "plan_validation_h100.json"
    out = tmp_path / "timings.json"
    assert bench_plan.main(["--compare-timings", f"shipped={H100_1B}", f"slow={tmp_path / 'slow.json'}",
                            "--against", str(pp1), str(mb4), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["calibrations"]) == {"shipped", "slow"} and data["calibrations"]["slow"]["timing"] == "wall"
    measured_pp1 = json.loads(pp1.read_text())["rows"]
    assert len(data["rows"]) == len(measured_pp1) + len(json.loads(mb4.read_text())["results"])
    both = [r for r in data["rows"] if r["ratios"]["shipped"] is not None]
    assert len(both) >= 10 and all(0.45 < r["ratios"]["slow"] / r["ratios"]["shipped"] < 0.75 for r in both)
    kinds = {r["choice"] for r in data["rows"] if r["ratios"]["shipped"] is None}
    assert {"mb8 moc", "mb8 topk"} <= kinds  # no MoC / top-k layers in the shipped table
    assert "mb8 moc" in capsys.readouterr().out
    assert bench_plan.main(["--compare-timings", f"x={H100_1B}"]) == 2
    assert bench_plan.main(["--compare-timings", "nothing", "--against", str(mb4)]) == 2
