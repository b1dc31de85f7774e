"""`effdist plot RUN_DIR [RUN_DIR ...] [--out loss.png] [--key loss]`: curves of runs in one PNG.

Each run is read from its metrics.jsonl and labelled by its directory name. Steps where the value is
null (a skipped non-finite step) leave a gap instead of a spike. After a rollback only the current line
of history is drawn (the abandoned steps stay in the file, before the rollback event record).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effdist.runtime.cli_parser import ArgumentParser
from effdist.train.metrics import METRICS_FILE, MetricsFileError, current_line, read_metrics


def series(run_dir: str | Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric on the current line of history; null values become NaN, i.e. gaps."""
    steps, values = [], []
    for rec in current_line(read_metrics(run_dir)):
        if key not in rec:
            continue
        value = rec[key]
        steps.append(rec["step"])
        values.append(float(value) if isinstance(value, (int, float)) else float("nan"))
    return steps, values


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names; the paths as given where two runs share a name (a/run vs b/run)."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def plot_runs(run_dirs: list[Path], out: Path, key: str = "loss", log_y: bool = False, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
            steps, values = series(run_dir, key)
            ax.plot(steps, values, label=label, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title or f"{key} per step")
        ax.grid(True, alpha=0.3)
        ax.legend()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def output_problem(out: Path) -> str | None:
    """Why the chart cannot be written to `out`, or None. An earlier chart (a PNG) is replaced; any other file
    (a run's metrics.jsonl or config.yaml given as --out by mistake) never is."""
    if out.is_dir():
        return f"--out {out} is a directory: give a PNG file name, e.g. {out / 'loss.png'}"
    if out.exists():
        try:
            with open(out, "rb") as f:
                head = f.read(len(PNG_SIGNATURE))
        except OSError:
            head = b""
        if head != PNG_SIGNATURE:
            return (f"--out {out} exists and is not a PNG (only an earlier chart is replaced): give another --out, "
                    "or move the file away")
    return None


def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist plot", description="Plot a metric of one or more runs into one PNG.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help=f"run directories (with {METRICS_FILE})")
    p.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG file to write (default: loss.png)")
    p.add_argument("--key", default="loss", help="metrics.jsonl field to plot (default: loss), e.g. grad_norm, "
                                                 "tokens_per_s, epas_region")
    p.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    p.add_argument("--title", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    problem = output_problem(args.out)
    if problem:
        print(f"effdist plot: {problem}", file=sys.stderr)
        return 2
    problems = []
    for run_dir in args.run_dirs:
        try:
            steps, values = series(run_dir, args.key)
        except MetricsFileError as e:
            problems.append(str(e))
            continue
        if not (run_dir / METRICS_FILE).is_file():
            problems.append(f"{run_dir}: no {METRICS_FILE}")
        elif not steps:
            problems.append(f"{run_dir}: no record has the field {args.key!r}")
        elif all(v != v for v in values):  # every value null (NaN): the chart would be empty
            problems.append(f"{run_dir}: every {args.key!r} of its {len(steps)} records is null (non-finite)")
    if problems:
        print("effdist plot: " + "; ".join(problems), file=sys.stderr)
        return 2
    out = plot_runs(args.run_dirs, args.out, key=args.key, log_y=args.log_y, title=args.title)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
