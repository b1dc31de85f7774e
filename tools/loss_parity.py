#!/usr/bin/env python
"""Loss parity: train several variants of one preset on the same data for the same tokens, one after
another in this process's machine, and compare their final losses with their dense baselines.

    python tools/loss_parity.py --config configs/llama-125m.yaml --steps 200 \\
        --variant dense= --variant epas=epas.enabled=true,epas.final_region=9,epas.start_step=20,epas.interval=15 \\
        --baseline epas=dense --out-dir runs/parity --png loss.png --json parity.json

Each variant is `name=key=value,key=value` (config overrides on top of --set). Every run uses the same
seed and data order, so the curves differ only by the method. The final loss of a run is the mean over
its last --window logged steps; the ratio is variant / baseline. With --eval-data, each run's final
checkpoint is also scored on held-out data by `effdist eval` at the region it was trained with
(`heldout_loss`, and `heldout_ratio_vs_baseline`); tools/epas_quality.py gathers such runs, made in
separate calls, into docs/results/epas_quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    return name, [o for o in rest.split(",") if o]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def clipping(recs: list[dict], clip: float) -> dict:
    """The gradient norm of every step and the share of steps whose update clipping scaled down: two runs of one
    recipe can differ in loss through clipping alone (a variant whose gradients are smaller, e.g. EPAS with its
    frozen Wq/Wk rows, is scaled less at the same clip), so a comparison keeps what it needs to tell."""
    norms = [(r["step"], r["grad_norm"]) for r in recs if r.get("grad_norm") is not None]
    clipped = sum(1 for _, g in norms if clip > 0 and g > clip)
    return {"grad_norm_curve": norms, "clip_grad": clip,
            "clipped_fraction": clipped / len(norms) if norms else None}


def plot(results: dict, window: int, title: str, png: str) -> None:
    """Loss curves, and below them each variant's loss over its baseline's (``results[name]["baseline"]``,
    moving average over `window` steps): a gap of 1% is invisible on the loss axis but not on the ratio axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ratio_ax) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for name, r in results.items():
        if "curve" not in r:
            continue
        xs, ys = zip(*[(s, l) for s, l in r["curve"] if l is not None])
        line, = ax.plot(xs, ys, label=f"{name} ({r['final_loss']:.3f})", linewidth=1)
        base_name = r.get("baseline")
        base = results.get(base_name, {})
        if "curve" in base and base_name != name:
            base_loss = dict(base["curve"])
            steps = [s for s in xs if base_loss.get(s) is not None]
            own = dict(zip(xs, ys))
            ratio = moving_average([own[s] / base_loss[s] for s in steps], window)
            ratio_ax.plot(steps, ratio, color=line.get_color(), linewidth=1,
                          label=f"{name} / {base_name} ({r['ratio_vs_baseline']:.3f})")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    ratio_ax.axhline(1.0, color="black", linewidth=0.8)
    ratio_ax.axhline(1.01, color="black", linewidth=0.8, linestyle=":")
    ratio_ax.set_ylabel(f"loss / baseline ({window}-step mean)")
    ratio_ax.set_xlabel("step")
    ratio_ax.grid(alpha=0.3)
    if len(ratio_ax.lines) > 2:
        ratio_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def replot(json_path: str, png: str, window: int, title: str) -> int:
    """Draw the picture of an earlier run from its --json file (no training)."""
    plot(json.loads(Path(json_path).read_text()), window, title, png)
    return 0


def compare(results: dict, variants: list, baselines: dict) -> None:
    """Each run's ratio to its baseline (the first variant unless --baseline says otherwise), of the final training
    loss and, where both were scored held out, of the held-out loss; printed as a table."""
    first = variants[0][0]
    print(f"\n{'variant':<10} {'baseline':<10} {'final loss':>10} {'vs base':>8} {'tok/s':>10}")
    for name, _ in variants:
        r = results[name]
        if "error" in r:
            print(f"{name:<10} FAILED")
            continue
        base = baselines.get(name, first)
        b = results.get(base, {})
        if "final_loss" in b:
            r["baseline"] = base
            r["ratio_vs_baseline"] = r["final_loss"] / b["final_loss"]
            if "heldout_loss" in r and "heldout_loss" in b:
                r["heldout_ratio_vs_baseline"] = r["heldout_loss"] / b["heldout_loss"]
        print(f"{name:<10} {base:<10} {r['final_loss']:>10.4f} {r.get('ratio_vs_baseline', float('nan')):>8.4f} "
              f"{r['median_tokens_per_s'] or 0:>10.0f}")


def evaluate_held_out(run_dir: Path, data: str, windows: int, timeout: int) -> dict:
    """`effdist eval` of a run's final checkpoint: {"heldout": what it measured (regions, losses, data, windows),
    "heldout_loss": the loss at the region the run was trained with}, or {"heldout_error": ...}."""
    out = run_dir / "heldout.json"
    cmd = [sys.executable, "-m", "effdist.cli", "eval", "--checkpoint", str(run_dir), "--windows", str(windows),
           "--json", str(out)] + ([] if data == "train" else ["--data", data])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"heldout_error": proc.stderr[-2000:]}
    result = json.loads(out.read_text())
    kept = {k: result[k] for k in ("data", "windows", "seq_length", "step", "trained_region", "losses")}
    return {"heldout": kept, "heldout_loss": result["losses"][str(result["trained_region"])]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only draw --png from the --json file of an earlier run (--window: its moving average)")
    p.add_argument("--title", default=None, help="with --replot: the picture's title")
    p.add_argument("--config", required=False)
    p.add_argument("--steps", type=int, required=False)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--variant", action="append", default=[], help="name=k=v,k=v (at least one, unless --replot)")
    p.add_argument("--baseline", action="append", default=[], help="variant=its_baseline (default: the first variant)")
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--out-dir", default="runs/parity")
    p.add_argument("--png", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--eval-data", default=None, metavar="PREFIX",
                   help="after each run, its held-out loss at its trained EPAS region with `effdist eval` on this "
                        "dataset prefix (e.g. data/english-large/heldout; 'train': the run's own training data), "
                        "recorded as `heldout` / `heldout_loss` (the run's final checkpoint is kept for it)")
    p.add_argument("--eval-windows", type=int, default=32, help="with --eval-data: windows of data.seq_length tokens")
    args = p.parse_args(argv)
    if args.replot:
        if not args.png:
            p.error("--replot needs --png")
        return replot(args.replot, args.png, args.window, args.title or Path(args.replot).stem)
    if not args.config or args.steps is None or not args.variant:
        p.error("--config, --steps and --variant are required (unless --replot)")
    if args.eval_windows < 1:
        p.error(f"--eval-windows {args.eval_windows}: must be at least 1")

    from effdist.train.metrics import read_metrics

    from effdist.config import load_config

    base_cfg = load_config(args.config, args.overrides)
    tokens_per_step = base_cfg.train.global_batch * base_cfg.data.seq_length
    variants = [parse_variant(v) for v in args.variant]
    baselines = dict(b.split("=") for b in args.baseline)
    out = Path(args.out_dir)
    results = {}
    for name, extra in variants:
        run_dir = out / name
        keep = "true" if args.eval_data else "false"
        cmd = [sys.executable, "-m", "effdist.train", "--config", args.config, "--run-dir", str(run_dir),
               "--resume", "none", "--set", f"train.steps={args.steps}", "--set", f"checkpoint.save_at_end={keep}"]
        for o in args.overrides + extra:
            cmd += ["--set", o]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        wall = time.time() - t0
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr[-2000:], "overrides": extra}
            print(f"{name}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        recs = read_metrics(run_dir)
        tail = [r["loss"] for r in recs[-args.window:] if r.get("loss") is not None]
        tps = [r["tokens_per_s"] for r in recs[len(recs) // 4:] if r.get("tokens_per_s")]
        cfg = load_config(args.config, args.overrides + extra)
        results[name] = {"overrides": extra, "final_loss": sum(tail) / len(tail), "wall_s": wall,
                         "median_tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
                         "curve": [(r["step"], r["loss"]) for r in recs], "tokens": args.steps * tokens_per_step,
                         "model": cfg.model.name, "seed": cfg.train.seed,
                         **clipping(recs, cfg.optim.clip_grad)}
        if args.eval_data:
            held_out = evaluate_held_out(run_dir, args.eval_data, args.eval_windows, args.timeout)
            results[name].update(held_out)
            if "heldout_error" in held_out:
                print(f"{name}: held-out evaluation FAILED\n{held_out['heldout_error']}", flush=True)
        shown = f", held-out {results[name]['heldout_loss']:.4f}" if "heldout_loss" in results[name] else ""
        print(f"{name}: final loss {results[name]['final_loss']:.4f}{shown} in {wall:.0f}s", flush=True)

    compare(results, variants, baselines)
    if args.png:
        plot(results, args.window, f"{Path(args.config).stem}: {args.steps} steps, same data and seed", args.png)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r and "heldout_error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
