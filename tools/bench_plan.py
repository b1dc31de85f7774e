#!/usr/bin/env python
"""Validate `effdist plan` on this GPU: calibrate, then for several pp=1 choices (micro-batch, recompute, EPAS
region, FFN kind) predict tokens/s and peak memory with the planner's time and memory models and measure them
with tools/bench_train.py (one process per choice). Prints a table and writes JSON (docs/results).

    python tools/bench_plan.py --model llama-1b --global-batch 16 --json docs/results/plan_validation_h100.json \
        --calibration-out configs/calibrations/h100-llama-1b.json

Goal (issue 26): predicted within 10% of measured tokens/s, peak memory within 5%.
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
    from effdist.train.presets import resolve_config_path

    cfg = load_config(resolve_config_path(model), overrides)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--calibration-out", default=None, help="where the calibration is written (default: next to --json)")
    p.add_argument("--micro-batches", default="1,2,4,8")
    p.add_argument("--variants", default="dense,epas,relu2")
    p.add_argument("--only", default=None, help="comma-separated choice labels to run")
    p.add_argument("--json", default=None)
    p.add_argument("--repredict", default=None, metavar="JSON",
                   help="no GPU: recompute the predictions of an earlier run's JSON with today's models (the "
                        "measured values and the calibration stay those of the run) and rewrite it")
    args = p.parse_args(argv)
    if args.repredict:
        return repredict(Path(args.repredict))

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
