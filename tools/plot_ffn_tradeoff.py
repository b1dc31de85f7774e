#!/usr/bin/env python
"""The sparse FFN kinds' training speed against their peak memory, each relative to its dense baseline, with the
issue's goal regions shaded: docs/img/ffn_speed_memory_h100.png (no GPU: it reads the runs in docs/results).

    python tools/plot_ffn_tradeoff.py --out docs/img/ffn_speed_memory_h100.png

The points are the generated table "sparse-ffn-train-after-fix" (tools/benchmark_tables.py): at llama-350m the
median of the rounds with its range as an error bar, at llama-1b each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from benchmark_tables import ffn_after_fix_points  # noqa: E402

COLOURS = {"moc": "tab:blue", "topk": "tab:green", "elas": "tab:orange"}
MARKERS = {"llama-350m": "o", "llama-1b": "s"}


def points() -> list[dict]:
    """One point per model, run and kind: the generated table's (benchmark_tables.ffn_after_fix_points)."""
    return ffn_after_fix_points()


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(7.5, 5))
    # The goals of issue 23: MoC >= 0.95x and top-k >= 0.97x SwiGLU at <= 0.80x its peak; ELAS >= 1.00x ReLU².
    ax.add_patch(Rectangle((0.6, 0.95), 0.2, 0.25, color=COLOURS["moc"], alpha=0.08, lw=0))
    ax.add_patch(Rectangle((0.6, 0.97), 0.2, 0.23, color=COLOURS["topk"], alpha=0.08, lw=0))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axvline(0.8, color="grey", lw=0.8, ls=":")
    ax.text(0.605, 1.17, "MoC / top-k goal:\n≥ 0.95 / 0.97x speed at ≤ 0.80x peak", fontsize=8, va="top")
    seen = set()
    for p in points():
        key = (p["kind"], p["model"])
        ax.errorbar(p["memory"], p["speed"], yerr=[[p["speed"] - p["speed_min"]], [p["speed_max"] - p["speed"]]],
                    fmt=MARKERS[p["model"]], color=COLOURS[p["kind"]], capsize=3, ms=7,
                    label=f"{p['label']} vs {p['baseline']}, {p['model']}" if key not in seen else None)
        seen.add(key)
    ax.set_xlim(0.6, 1.02)
    ax.set_ylim(0.75, 1.2)
    ax.set_xlabel("peak memory vs its dense baseline")
    ax.set_ylabel("training tokens/s vs its dense baseline")
    ax.set_title("Sparse FFNs after the fc2-input fix, 1x H100, 2026-12-07", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "ffn_speed_memory_h100.png"))
    args = p.parse_args(argv)
    for pt in points():
        print(f"{pt['model']:<11} {pt['kind']:<5} speed {pt['speed']:.3f} ({pt['speed_min']:.3f}-"
              f"{pt['speed_max']:.3f}) peak {pt['memory']:.3f}  {pt['run']}")
    print(f"wrote {plot(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
