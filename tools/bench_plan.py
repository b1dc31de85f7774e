#!/usr/bin/env python
"""Validate `effdist plan` on this GPU: calibrate, then for several pp=1 choices (micro-batch, recompute, EPAS
region, FFN kind) predict tokens/s and peak memory with the planner's time and memory models and measure them
with tools/bench_train.py (one process per choice). Prints a table and writes JSON (docs/results).

    python tools/bench_plan.py --model llama-1b --global-batch 16 --json docs/results/plan_validation_h100.json \
        --calibration-out configs/calibrations/h100-llama-1b.json

Goal (issue 26): predicted within 10% of measured tokens/s, peak memory within 5%.

No GPU: `--predict-pipeline` predicts the multi-GPU pipeline runs already measured by tools/bench_pipeline.py
(docs/results/pipeline_p4_*.json) with the planner's own functions and a calibration per model, and compares
(goal: within 15%):

    python tools/bench_plan.py --predict-pipeline docs/results/pipeline_p4_*.json \
        --calibration-dir configs/calibrations [--device-prefix h200] --json docs/results/plan_validation_p4_h200.json

Which way of timing the layers (`effdist calibrate --timing gpu|wall`) the measured steps follow: every measured
row predicted with each of several tables of one model:

    python tools/bench_plan.py --compare-timings gpu=docs/results/calibration_h100_llama-1b_gpu.json \
        wall=docs/results/calibration_h100_llama-1b_wall.json --against docs/results/plan_validation_h100.json \
        docs/results/pipeline_p4_1b_mb1_h200x4.json docs/results/pipeline_p4_1b_mb4_h200x4.json \
        --json docs/results/plan_timing_h100.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# (label, overrides) of the pp=1 choices to check.
CHOICES = [
    ("mb2", ["train.micro_batch=2"]),
    ("mb4", ["train.micro_batch=4"]),
    ("mb8", ["train.micro_batch=8"]),
    ("mb8 recompute", ["train.micro_batch=8", "train.recompute=true"]),
    ("mb4 epas 0.5", ["train.micro_batch=4", "epas.enabled=true", "epas.mode=fixed", "epas.final_region=0.5"]),
    ("mb4 relu2", ["train.micro_batch=4", "ffn.kind=relu2"]),
    ("mb8 moc", ["train.micro_batch=8", "ffn.kind=moc"]),
    ("mb8 topk", ["train.micro_batch=8", "ffn.kind=topk"]),
]


def calibrate_in_subprocess(model: str, out: Path, micro_batches: str, variants: str) -> None:
    cmd = [sys.executable, "-m", "effdist.cli", "calibrate", "--config", model, "--micro-batches", micro_batches,
           "--variants", variants, "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT)


def predict(model: str, overrides: list[str], cal) -> tuple[float, float, dict]:
    """(tokens/s, peak GiB, step parts) the planner predicts for one pp=1 choice on one GPU."""
    import copy

    from effdist.config import load_config
    from effdist.train.preflight import validate_run
    from effdist.train.estimate import GIB, estimate
    from effdist.train.planner import Space, predict_step

    cfg = load_config(model, overrides)
    validate_run(cfg, world_size=1)
    step, _, parts = predict_step(cfg, cal, Space(gpus=1), dp=1)
    return (cfg.train.global_batch * cfg.data.seq_length / step,
            estimate(copy.deepcopy(cfg), 1, on_gpu=True).peak.total / GIB, parts)


def repredict(path: Path) -> int:
    """Recompute every row's predictions (see --repredict) and record when and with what."""
    import subprocess as sp

    from effdist.pipeline.calibration import Calibration

    data = json.loads(path.read_text())
    cal = Calibration.load(ROOT / "configs" / "calibrations" / f"h100-{data['model']}.json")
    for row in data["rows"]:
        tps, mem, parts = predict(data["model"], row["overrides"], cal)
        row.update(predicted_tokens_per_s=tps, tokens_per_s_ratio=tps / row["measured_tokens_per_s"],
                   predicted_peak_mem_gib=mem, peak_mem_ratio=mem / row["measured_peak_mem_gib"],
                   predicted_parts_s=parts)
    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    data.setdefault("repredicted", []).append({"date": dt.date.today().isoformat(), "commit": commit,
                                               "command": f"python tools/bench_plan.py --repredict {path}"})
    path.write_text(json.dumps(data, indent=1) + "\n")
    for row in data["rows"]:
        print(f"{row['choice']:<16} tokens/s ratio {row['tokens_per_s_ratio']:.3f}, peak ratio {row['peak_mem_ratio']:.3f}")
    return 0


# ------------------------------------------------------------------------ multi-GPU runs (--predict-pipeline)

PIPELINE_GOAL = {"tokens_per_s_within": 0.15, "peak_mem_within": 0.15}
# What tools/bench_pipeline.py's make_config sets besides the layout, so the planner predicts the very model the
# run timed; its effdist rows without a `kernels` key ran the default train.fused_kernels=true, as calibrate does.
PIPELINE_BENCH_OVERRIDES = ["data.kind=mock", "model.tie_embeddings=false"]


def device_prefix(device: str) -> str | None:
    """The card's short name as calibration files are named: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" ->
    "h100"; None when the name holds no such model number."""
    import re

    m = re.search(r"\b([A-Z]\d{2,4})\b", device or "")
    return m.group(1).lower() if m else None


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def not_predicted_reason(run: dict, record: dict) -> str | None:
    """Why the planner cannot express the layout of one measured (file, schedule) row; None when it can."""
    from effdist.config import SCHEDULES

    if record.get("engine", "effdist") != "effdist":
        kernels = ("" if "kernels" in record else
                   "; in this run it also had none of effdist's fused kernels")
        return f"{record['engine']}'s own {record['schedule']} executor (the planner models effdist's executor{kernels})"
    if record["schedule"] not in SCHEDULES:
        return f"schedule {record['schedule']!r}: the planner knows {', '.join(SCHEDULES)}"
    if record.get("kernels", "fused") != "fused":
        return (f"kernel set {record['kernels']!r}: a calibration times the preset's layers with effdist's fused "
                "kernels and does not record another kernel set")
    if run.get("tp", 1) != 1 or run.get("dp", 1) != 1:
        return f"tp = {run.get('tp', 1)}, dp = {run.get('dp', 1)}: bench_pipeline runs tp = 1 and dp = 1 only"
    return None


def predict_pipeline_row(run: dict, record: dict, cal, cal_info: dict) -> dict:
    """One measured (file, schedule) row against the planner's prediction for the layout the run used: tp = 1,
    pp, dp = 1, the schedule, micro-batch, microbatches, recompute as run, the model preset. The planner's step
    is forward + backward + gradient sync + optimizer and its memory counts Adam's state; bench_pipeline times
    and allocates no optimizer, so the compared values leave the optimizer out (the planner's own full-step
    numbers are kept beside them: `planner_*`)."""
    import math

    from effdist.config import ConfigError, load_config
    from effdist.pipeline.calibration import CalibrationError
    from effdist.train.estimate import GIB, estimate
    from effdist.train.planner import MIN_TIMED_MICROBATCHES, Choice, Space, candidate_config, predict_step
    from effdist.train.preflight import validate_run

    pp, mb, m, seq = run["pp"], run["micro_batch"], run["microbatches"], run["seq_length"]
    recompute = bool(record.get("recompute", run.get("recompute", False)))
    peaks = record.get("peak_mem_gib") or []
    row = {"model": run["model"], "schedule": record["schedule"], "engine": record.get("engine", "effdist"),
           "tp": 1, "pp": pp, "dp": 1, "micro_batch": mb, "microbatches": m, "seq_length": seq,
           "recompute": recompute, "measured_device": run.get("device"),
           "measured_tokens_per_s": record["tokens_per_s"], "measured_step_s": record["step_s"],
           "measured_peak_mem_gib": max(peaks) if peaks else None, "measured_peak_mem_gib_per_rank": peaks,
           "measured_bubble": record.get("measured_bubble_rate"), "calibration": cal_info["path"],
           "predicted": False, "not_predicted": None}
    why = not_predicted_reason(run, record)
    if why is None:
        try:
            extra = [f"pipeline.chunks_per_rank={record['chunks_per_rank']}"] if "chunks_per_rank" in record else []
            base = load_config(run["model"], PIPELINE_BENCH_OVERRIDES + extra)
            choice = Choice(tp=1, pp=pp, dp=1, schedule=record["schedule"], micro_batch=mb, recompute=recompute,
                            zero1=False, epas_region=0.0, ffn_kind=base.ffn.kind)
            # What effdist.train.planner.plan does for one candidate.
            cfg = candidate_config(base, choice, global_batch=m * mb, seq=seq)
            validate_run(cfg, world_size=pp)
            est = estimate(cfg, pp, on_gpu=True, max_microbatches=max(MIN_TIMED_MICROBATCHES, 4 * pp))
            step, bubble, parts = predict_step(cfg, cal, Space(gpus=pp), dp=1)
        except (ConfigError, CalibrationError) as e:
            why = f"the planner refuses the layout: {e}"
    if why is not None:
        row["not_predicted"] = why
        return row
    tokens = m * mb * seq
    fwd_bwd = step - parts["optimizer"]
    per_rank = [(s.total - s.optimizer) / GIB for s in est.stages]
    predicted_tps, predicted_mem = tokens / fwd_bwd, max(per_rank)
    row.update(
        predicted=True, overrides=choice.overrides(base, m * mb, seq),
        predicted_tokens_per_s=predicted_tps, tokens_per_s_ratio=predicted_tps / record["tokens_per_s"],
        predicted_step_s=fwd_bwd, predicted_peak_mem_gib=predicted_mem, predicted_peak_mem_gib_per_rank=per_rank,
        peak_mem_ratio=predicted_mem / max(peaks) if peaks and max(peaks) > 0 else None,
        peak_mem_ratio_per_rank=[p / q for p, q in zip(per_rank, peaks)] if len(peaks) == len(per_rank) else None,
        predicted_bubble=bubble, predicted_parts_s=parts,
        planner_tokens_per_s=tokens / step, planner_peak_mem_gib=est.peak.total / GIB,
        calibration_shape_differs=cal.check_shape(cfg))
    for key in ("tokens_per_s_ratio", "peak_mem_ratio"):
        if row[key] is not None and not (math.isfinite(row[key]) and row[key] > 0):
            raise ValueError(f"{run['model']} {record['schedule']}: {key} = {row[key]}")
    return row


def predict_pipeline(files: list[str], calibration_dir: str, prefix: str | None, out: str | None,
                     argv: list[str]) -> int:
    """--predict-pipeline: every (file, schedule) row of bench_pipeline JSONs predicted (or said why not)."""
    import subprocess as sp

    from effdist.pipeline.calibration import Calibration, CalibrationError

    cal_dir = Path(calibration_dir)
    rows, skipped, calibrations = [], [], {}
    for given in files:
        run = json.loads(Path(given).read_text())
        name = _shown(Path(given))
        card = prefix or device_prefix(run.get("device", ""))
        cal_path = cal_dir / f"{card}-{run['model']}.json"
        if card is None or not cal_path.exists():
            reason = (f"no calibration for {run['model']} ({_shown(cal_path)} does not exist)" if card else
                      f"no --device-prefix and the run's device {run.get('device')!r} names no card")
            print(f"{name}: {reason}; skipped")
            skipped.append({"file": name, "model": run["model"], "reason": reason})
            continue
        try:
            cal = Calibration.load(cal_path)
        except CalibrationError as e:
            print(f"{name}: {e}; skipped")
            skipped.append({"file": name, "model": run["model"], "reason": str(e)})
            continue
        info = {"path": _shown(cal_path), "device": cal.device, "date": cal.date, "model": run["model"],
                "command": cal.command}
        calibrations[info["path"]] = info
        if cal.device != run.get("device"):
            print(f"{name}: note: calibration {info['path']} is of {cal.device}, the run of {run.get('device')}")
        for record in run["results"]:
            row = predict_pipeline_row(run, record, cal, info)
            rows.append({"file": name, **row})
    print_pipeline_table(rows)
    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": dt.date.today().isoformat(), "commit": commit,
              "command": "python tools/bench_plan.py " + " ".join(argv), "goal": PIPELINE_GOAL,
              "compared": "forward + backward + gradient sync of one step (no optimizer: bench_pipeline times none) "
                          "and per-rank peak of weights, fp32 gradients, activations and logits (no optimizer "
                          "state); largest rank against largest rank",
              "calibrations": list(calibrations.values()), "skipped": skipped, "rows": rows}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if any(r["predicted"] for r in rows) else 1


def print_pipeline_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"{'run':<14} {'schedule':<20} {'tokens/s pred':>13} {'measured':>9} {'ratio':>6}  "
          f"{'peak GiB pred':>13} {'measured':>8} {'ratio':>6}  bubble pred / measured")
    for r in rows:
        run = f"{r['model']} mb{r['micro_batch']}"
        schedule = r["schedule"] + ("" if r["engine"] == "effdist" else f" ({r['engine']})")
        if not r["predicted"]:
            print(f"{run:<14} {schedule:<20} not predicted: {r['not_predicted']}")
            continue
        measured_bubble = "–" if r["measured_bubble"] is None else f"{100 * r['measured_bubble']:.1f}%"
        print(f"{run:<14} {schedule:<20} {r['predicted_tokens_per_s']:>13,.0f} {r['measured_tokens_per_s']:>9,.0f} "
              f"{r['tokens_per_s_ratio']:>6.3f}  {r['predicted_peak_mem_gib']:>13.2f} {r['measured_peak_mem_gib']:>8.2f} "
              f"{r['peak_mem_ratio']:>6.3f}  {100 * r['predicted_bubble']:.1f}% / {measured_bubble}")
    done = [r for r in rows if r["predicted"]]
    if done:
        within = PIPELINE_GOAL["tokens_per_s_within"]
        ok_t = sum(abs(r["tokens_per_s_ratio"] - 1) <= within for r in done)
        ok_m = sum(abs(r["peak_mem_ratio"] - 1) <= PIPELINE_GOAL["peak_mem_within"] for r in done)
        print(f"within {100 * within:.0f}%: tokens/s {ok_t} of {len(done)}, peak memory {ok_m} of {len(done)}; "
              f"not predicted: {len(rows) - len(done)}")


# ------------------------------------------------------------------------ one run's choices under several tables

def compare_timings(named: list[str], against: list[str], out: str | None, argv: list[str]) -> int:
    """--compare-timings: the measured rows of pp=1 validations (plan_validation_*.json) and of multi-GPU pipeline
    runs (pipeline_p4_*.json) predicted with each of several calibrations of one model, e.g. the same layers timed
    with `effdist calibrate --timing gpu` and `--timing wall`: which timing the planner's step follows."""
    import subprocess as sp

    from effdist.pipeline.calibration import Calibration, CalibrationError

    cals = {}
    for text in named:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            print(f"bench_plan: --compare-timings {text!r}: give NAME=CALIBRATION.json", file=sys.stderr)
            return 2
        try:
            cals[name] = Calibration.load(path)
        except CalibrationError as e:
            print(f"bench_plan: {e}", file=sys.stderr)
            return 2
    rows = []
    for given in against:
        data = json.loads(Path(given).read_text())
        shown = _shown(Path(given))
        if "results" in data:  # tools/bench_pipeline.py
            for record in data["results"]:
                row = {"file": shown, "run": f"{data['model']} mb{data['micro_batch']} p{data['pp']}",
                       "choice": record["schedule"] + ("" if record.get("engine", "effdist") == "effdist"
                                                       else f" ({record['engine']})"),
                       "measured_device": data.get("device"), "measured_tokens_per_s": record["tokens_per_s"],
                       "ratios": {}}
                for name, cal in cals.items():
                    info = {"path": cal.path, "device": cal.device}
                    predicted = predict_pipeline_row(data, record, cal, info)
                    row["ratios"][name] = predicted.get("tokens_per_s_ratio")
                rows.append(row)
        else:  # this tool's pp=1 validation
            for record in data["rows"]:
                row = {"file": shown, "run": f"{data['model']} pp1", "choice": record["choice"],
                       "measured_device": data.get("device"), "measured_tokens_per_s": record["measured_tokens_per_s"],
                       "ratios": {}}
                for name, cal in cals.items():
                    try:
                        tps, _, _ = predict(data["model"], record["overrides"], cal)
                        row["ratios"][name] = tps / record["measured_tokens_per_s"]
                    except CalibrationError:
                        row["ratios"][name] = None  # that table has no layers of this kind
                rows.append(row)
    print(f"{'run':<18} {'choice':<22} {'measured':>9}  " + "  ".join(f"{n:>10}" for n in cals))
    for r in rows:
        shown = "  ".join("         –" if v is None else f"{v:>10.3f}" for v in r["ratios"].values())
        print(f"{r['run']:<18} {r['choice']:<22} {r['measured_tokens_per_s']:>9,.0f}  {shown}")
    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": dt.date.today().isoformat(), "commit": commit,
              "command": "python tools/bench_plan.py " + " ".join(argv),
              "ratio": "predicted / measured tokens/s (pipeline runs: forward + backward of the step, no optimizer)",
              "calibrations": {n: {"path": c.path, "device": c.device, "date": c.date, "timing": c.timing,
                                   "command": c.command} for n, c in cals.items()},
              "rows": rows}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calibration-out", default=None, help="where the calibration is written (default: next to --json)")
    p.add_argument("--micro-batches", default="1,2,4,8")
    p.add_argument("--variants", default="dense,epas,relu2,moc,topk")
    p.add_argument("--only", default=None, help="comma-separated choice labels to run")
    p.add_argument("--json", default=None)
    p.add_argument("--repredict", default=None, metavar="JSON",
                   help="no GPU: recompute the predictions of an earlier run's JSON with today's models (the "
                        "measured values and the calibration stay those of the run) and rewrite it")
    p.add_argument("--predict-pipeline", nargs="+", default=None, metavar="JSON",
                   help="no GPU: predict the multi-GPU runs of tools/bench_pipeline.py (e.g. "
                        "docs/results/pipeline_p4_*.json) with the planner and compare; writes --json")
    p.add_argument("--calibration-dir", default=str(ROOT / "configs" / "calibrations"),
                   help="with --predict-pipeline: where <device-prefix>-<model>.json calibrations are looked up")
    p.add_argument("--device-prefix", default=None,
                   help="with --predict-pipeline: the calibrations' card (e.g. h200; default: the card each run "
                        "names in its JSON)")
    p.add_argument("--compare-timings", nargs="+", default=None, metavar="NAME=CALIBRATION",
                   help="no GPU: predict the rows of the JSONs given with --against with each calibration (e.g. one "
                        "table per `effdist calibrate --timing`) and print the predicted / measured ratios; "
                        "writes --json")
    p.add_argument("--against", nargs="+", default=[], metavar="JSON",
                   help="with --compare-timings: plan_validation_*.json (pp=1) and pipeline_p4_*.json runs")
    args = p.parse_args(argv)
    if args.compare_timings:
        if not args.against:
            print("bench_plan: --compare-timings needs --against JSON ... (measured runs to predict)", file=sys.stderr)
            return 2
        return compare_timings(args.compare_timings, args.against, args.json,
                               sys.argv[1:] if argv is None else list(argv))
    if args.repredict:
        return repredict(Path(args.repredict))
    if args.predict_pipeline:
        return predict_pipeline(args.predict_pipeline, args.calibration_dir, args.device_prefix, args.json,
                                sys.argv[1:] if argv is None else list(argv))

    import torch

    from bench_train import bench_in_subprocess
    from effdist.pipeline.calibration import Calibration

    cal_path = Path(args.calibration_out or (Path(args.json or "plan.json").with_suffix(".calibration.json")))
    calibrate_in_subprocess(args.model, cal_path, args.micro_batches, args.variants)
    cal = Calibration.load(cal_path)
    rows = []
    for label, overrides in CHOICES:
        if args.only and label not in args.only.split(","):
            continue
        ov = ["data.kind=mock", f"train.global_batch={args.global_batch}"] + overrides
        predicted_tps, predicted_mem, parts = predict(args.model, ov, cal)
        measured = bench_in_subprocess(args.model, ov, args.steps, args.warmup)
        row = {"choice": label, "overrides": ov, "predicted_tokens_per_s": predicted_tps,
               "measured_tokens_per_s": measured["tokens_per_s"],
               "tokens_per_s_ratio": predicted_tps / measured["tokens_per_s"],
               "predicted_peak_mem_gib": predicted_mem, "measured_peak_mem_gib": measured["peak_mem_gib"],
               "peak_mem_ratio": predicted_mem / measured["peak_mem_gib"] if measured["peak_mem_gib"] else None,
               "predicted_parts_s": parts, "measured_step_s": measured["step_s"]}
        rows.append(row)
        print(f"{label:<16} tokens/s predicted {predicted_tps:>10,.0f} measured {measured['tokens_per_s']:>10,.0f} "
              f"({row['tokens_per_s_ratio']:.3f}); peak GiB predicted {predicted_mem:6.2f} measured "
              f"{measured['peak_mem_gib'] or float('nan'):6.2f}", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"device": device, "date": dt.date.today().isoformat(), "model": args.model,
              "command": "python tools/bench_plan.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "calibration": str(cal_path), "goal": {"tokens_per_s_within": 0.10, "peak_mem_within": 0.05},
              "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
