#!/usr/bin/env python
"""Gather EPAS-vs-dense runs into docs/results/epas_quality.json (issue 25): one entry per comparison.

The runs are tools/loss_parity.py JSONs made with --eval-data (held-out loss at each run's trained region), often
one run per device call. A comparison pairs, per model seed, a dense run with an EPAS run of the same model, seed
and tokens:

    python tools/epas_quality.py --name "llama-1b 3L/4 from scratch" \\
        --pair quality_1b_dense_s1.json=quality_1b_epas_s1.json \\
        --pair quality_1b_dense_s2.json=quality_1b_epas_s2.json \\
        --json docs/results/epas_quality.json --png docs/img/epas_quality_1b.png

A side is `FILE` (its only run) or `FILE:VARIANT` (one run of a file with several). The entry holds `model`,
`final_region`, `tokens`, `seeds`, `dense_loss` and `epas_loss` (held-out, one per seed, in the order of
--pair), `ratio_per_seed`, `ratio_mean` (the mean of the per-seed ratios) and whether it is within --goal
(1.01: within 1.0% of dense); an entry of the same --name is replaced, the others kept. --png draws every
run's training curve in one picture, each EPAS run against its dense run below.

Quality at every inference region (item 4): `--regions-of FILE[:VARIANT]` (one per seed) reads the held-out loss that
`effdist eval` measured at each region of an EPAS run's final checkpoint, and writes an entry to the file's `regions`
list: `model`, `trained_region`, `tokens`, `seeds`, `regions`, `losses` (one {region: loss} per seed), `mean_loss`,
`excess` (mean loss over the trained region's, 0.004 = +0.4%), `tolerance` and `usable` (the regions within it):

    python tools/epas_quality.py --name "llama-1b 3L/4 regions" --regions-of quality_1b_epas_s1.json \
        --json docs/results/epas_quality.json --png docs/img/epas_regions_1b.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

SCHEMA = "effdist.epas_quality.v1"


class QualityError(ValueError):
    """Input that cannot make a comparison: one line saying which and why."""


def load_run(side: str) -> tuple[str, dict]:
    """`FILE` or `FILE:VARIANT` -> (its label, the run's record)."""
    path, _, variant = side.partition(":")
    try:
        runs = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QualityError(f"--pair {side}: cannot read {path} ({e.__class__.__name__})") from None
    runs = {k: v for k, v in runs.items() if isinstance(v, dict)}
    if not variant:
        if len(runs) != 1:
            raise QualityError(f"--pair {side}: {path} holds {len(runs)} runs ({', '.join(runs)}); name one as "
                               f"{path}:VARIANT")
        (variant,) = runs
    if variant not in runs:
        raise QualityError(f"--pair {side}: no run {variant!r} in {path} (it holds {', '.join(runs)})")
    run = runs[variant]
    if "heldout_loss" not in run:
        raise QualityError(f"--pair {side}: run {variant!r} has no held-out loss; make it with tools/loss_parity.py "
                           "--eval-data PREFIX")
    return f"{Path(path).stem}:{variant}", run


def comparison(name: str, pairs: list[tuple[tuple[str, dict], tuple[str, dict]]], goal: float | None) -> dict:
    """One epas_quality.json entry from (dense, epas) runs, one pair per seed. `goal` None: a comparison the issue
    asks to report without a threshold (item 5, continual pretraining); its `goal` and `met` are null."""
    if not pairs:
        raise QualityError("give at least one --pair DENSE=EPAS")
    seeds, dense_loss, epas_loss, sources = [], [], [], []
    first = pairs[0][1][1]
    for (dense_label, dense), (epas_label, epas) in pairs:
        where = f"--pair {dense_label}={epas_label}"
        if dense["heldout"]["trained_region"] != 0:
            raise QualityError(f"{where}: the dense side was trained with EPAS region "
                               f"{dense['heldout']['trained_region']}; give a run without sharing first")
        if epas["heldout"]["trained_region"] == 0:
            raise QualityError(f"{where}: the EPAS side shares no layer (trained region 0)")
        for key in ("model", "seed", "tokens"):
            if dense[key] != epas[key]:
                raise QualityError(f"{where}: {key} differs ({dense[key]} against {epas[key]}); a pair is one seed "
                                   "of one model after the same tokens")
        for key, want in (("model", first["model"]), ("tokens", first["tokens"])):
            if epas[key] != want:
                raise QualityError(f"{where}: {key} {epas[key]} where the first pair has {want}")
        if epas["heldout"]["trained_region"] != first["heldout"]["trained_region"]:
            raise QualityError(f"{where}: trained region {epas['heldout']['trained_region']} where the first pair "
                               f"has {first['heldout']['trained_region']}")
        if dense["heldout"]["data"] != epas["heldout"]["data"]:
            raise QualityError(f"{where}: held-out data differs ({dense['heldout']['data']} against "
                               f"{epas['heldout']['data']})")
        if dense["seed"] in seeds:
            raise QualityError(f"{where}: seed {dense['seed']} is already in an earlier pair")
        seeds.append(dense["seed"])
        dense_loss.append(dense["heldout_loss"])
        epas_loss.append(epas["heldout_loss"])
        sources.append({"dense": dense_label, "epas": epas_label})
    ratios = [e / d for d, e in zip(dense_loss, epas_loss)]
    ratio_mean = statistics.fmean(ratios)
    return {"name": name, "model": first["model"], "final_region": first["heldout"]["trained_region"],
            "tokens": first["tokens"], "seeds": seeds, "dense_loss": dense_loss, "epas_loss": epas_loss,
            "ratio_per_seed": ratios, "ratio_mean": ratio_mean, "goal": goal,
            "met": None if goal is None else ratio_mean <= goal,
            "heldout_data": first["heldout"]["data"], "windows": first["heldout"]["windows"], "sources": sources,
            "date": dt.date.today().isoformat()}


def region_entry(name: str, runs: list[tuple[str, dict]], tolerance: float) -> dict:
    """One `regions` entry from EPAS runs of one model and trained region, one per seed: the held-out loss at each
    region measured in all of them, its mean over the seeds, and the regions within `tolerance` of the trained one."""
    if not runs:
        raise QualityError("give at least one --regions-of FILE[:VARIANT]")
    first_label, first = runs[0]
    trained = first["heldout"]["trained_region"]
    if trained == 0:
        raise QualityError(f"--regions-of {first_label}: the run shares no layer (trained region 0)")
    seeds, losses, sources = [], [], []
    for label, run in runs:
        for key, have, want in (("model", run["model"], first["model"]), ("tokens", run["tokens"], first["tokens"]),
                                ("trained region", run["heldout"]["trained_region"], trained),
                                ("held-out data", run["heldout"]["data"], first["heldout"]["data"])):
            if have != want:
                raise QualityError(f"--regions-of {label}: {key} {have} where {first_label} has {want}")
        if run["seed"] in seeds:
            raise QualityError(f"--regions-of {label}: seed {run['seed']} is already given")
        seeds.append(run["seed"])
        losses.append({int(r): float(v) for r, v in run["heldout"]["losses"].items()})
        sources.append(label)
    from effdist.infer.region_quality import RegionQuality

    regions = sorted(set.intersection(*(set(one) for one in losses)))
    mean = {r: statistics.fmean(one[r] for one in losses) for r in regions}
    # What `effdist eval` records for one checkpoint, here of the mean over the seeds: the same usable regions.
    quality = RegionQuality(Path(), None, trained, mean, tolerance)
    return {"name": name, "model": first["model"], "trained_region": trained, "tokens": first["tokens"],
            "seeds": seeds, "regions": regions, "losses": [{str(r): one[r] for r in regions} for one in losses],
            "mean_loss": {str(r): mean[r] for r in regions}, "excess": {str(r): quality.excess(r) for r in regions},
            "tolerance": tolerance, "usable": quality.usable,
            "heldout_data": first["heldout"]["data"], "windows": first["heldout"]["windows"], "sources": sources,
            "date": dt.date.today().isoformat()}


def merge(path: Path, entry: dict, key: str = "comparisons") -> dict:
    """The file's entries with `entry` in place of the one of the same name in its `key` list (appended otherwise)."""
    data = json.loads(path.read_text()) if path.exists() else {"schema": SCHEMA, "comparisons": []}
    if data.get("schema") != SCHEMA:
        raise QualityError(f"--json {path}: not an epas_quality file (schema {data.get('schema')!r}); "
                           "give another path")
    kept = [c for c in data.get(key, []) if c["name"] != entry["name"]]
    return {**data, key: kept + [entry]}


def draw_regions(entry: dict, png: str) -> None:
    """Held-out loss against the inference region: one line per seed, the mean, the trained region and the band
    within the tolerance of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions, trained = entry["regions"], entry["trained_region"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for seed, losses in zip(entry["seeds"], entry["losses"]):
        ax.plot(regions, [losses[str(r)] for r in regions], "o-", alpha=0.5, label=f"seed {seed}")
    mean = [entry["mean_loss"][str(r)] for r in regions]
    ax.plot(regions, mean, "ks-", lw=2, label="mean")
    base = entry["mean_loss"][str(trained)]
    ax.axhspan(base, base * (1 + entry["tolerance"]), color="tab:green", alpha=0.15,
               label=f"within {entry['tolerance']:.1%} of the trained region")
    ax.axvline(trained, color="tab:green", ls="--", lw=1)
    ax.set_xticks(regions)
    ax.set_xlabel("EPAS inference region (sharing layers)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{entry['name']}: trained at region {trained}; usable: {', '.join(map(str, entry['usable']))}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def regions_main(args) -> int:
    try:
        entry = region_entry(args.name, [load_run(side) for side in args.regions_of], args.tolerance)
        data = merge(Path(args.json), entry, "regions")
    except QualityError as e:
        print(f"epas_quality: {e}", file=sys.stderr)
        return 2
    Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    print(f"{entry['name']}: {entry['model']} trained at region {entry['trained_region']}, {entry['tokens']:,} "
          f"tokens, seeds {', '.join(map(str, entry['seeds']))}")
    print(f"{'region':>7} {'held-out loss':>14} {'vs trained':>11}")
    for r in entry["regions"]:
        mark = " (trained)" if r == entry["trained_region"] else ""
        print(f"{r:>7} {entry['mean_loss'][str(r)]:>14.4f} {entry['excess'][str(r)]:>+11.2%}{mark}")
    print(f"usable within {entry['tolerance']:.1%}: {', '.join(map(str, entry['usable']))} -> {args.json}")
    if args.png:
        draw_regions(entry, args.png)
    return 0


def draw(pairs, png: str, title: str, window: int) -> None:
    from loss_parity import plot

    results = {}
    for (dense_label, dense), (epas_label, epas) in pairs:
        results[dense_label] = dense
        results[epas_label] = {**epas, "baseline": dense_label,
                               "ratio_vs_baseline": epas["final_loss"] / dense["final_loss"]}
    plot(results, window, title, png)


def _goal(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a ratio such as 1.01, or none") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="FILE: a tools/loss_parity.py --json made with --eval-data")
    p.add_argument("--name", required=True, help="the comparison's name (an entry of this name is replaced)")
    p.add_argument("--pair", action="append", default=[], metavar="DENSE=EPAS",
                   help="FILE[:VARIANT]=FILE[:VARIANT], one per model seed")
    p.add_argument("--goal", type=_goal, default=1.01,
                   help="EPAS / dense held-out loss to meet (default 1.01), or none: a comparison reported without one")
    p.add_argument("--json", required=True, help="the epas_quality.json to update")
    p.add_argument("--png", default=None, help="also draw the runs' training curves in one picture")
    p.add_argument("--window", type=int, default=20, help="moving average of the curves in --png")
    p.add_argument("--regions-of", action="append", default=[], metavar="FILE[:VARIANT]",
                   help="instead of --pair: an EPAS run's held-out loss at every region it was evaluated at, one per "
                        "seed (written to the file's `regions` list; --png draws loss against region)")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="with --regions-of: the loss over the trained region's that a usable region may cost "
                        "(default 0.005 = 0.5%%)")
    args = p.parse_args(argv)
    if args.regions_of and args.pair:
        print("epas_quality: give --pair (a comparison) or --regions-of (one model's regions), not both",
              file=sys.stderr)
        return 2
    if args.regions_of:
        return regions_main(args)
    try:
        pairs = []
        for text in args.pair:
            dense, sep, epas = text.partition("=")
            if not sep or not dense or not epas:
                raise QualityError(f"--pair {text!r}: expected DENSE_FILE[:VARIANT]=EPAS_FILE[:VARIANT]")
            pairs.append((load_run(dense), load_run(epas)))
        entry = comparison(args.name, pairs, args.goal)
        data = merge(Path(args.json), entry)
    except QualityError as e:
        print(f"epas_quality: {e}", file=sys.stderr)
        return 2
    Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
    per_seed = ", ".join(f"seed {s}: {r:.4f}" for s, r in zip(entry["seeds"], entry["ratio_per_seed"]))
    print(f"{entry['name']}: {entry['model']} at region {entry['final_region']} after {entry['tokens']:,} tokens, "
          f"held-out EPAS / dense {entry['ratio_mean']:.4f} (mean; {per_seed}); "
          + ("no goal (reported)" if entry["goal"] is None else
             f"goal <= {entry['goal']}: {'met' if entry['met'] else 'not met'}") + f"; -> {args.json}")
    if args.png:
        draw(pairs, args.png, f"{entry['name']}: {entry['tokens']:,} tokens per run, held-out ratio "
                              f"{entry['ratio_mean']:.4f}", args.window)
    return 0


if __name__ == "__main__":
    sys.exit(main())
