#!/usr/bin/env python
"""Measured training peaks of the sparse FFNs against their saved-tensor accounting (no GPU needed).

    python tools/ffn_memory_accounting.py --json docs/results/ffn_memory_accounting.json

For every FFN variant of a `tools/bench_train.py` run that has a SwiGLU row in the same run (same model,
micro-batch, one process per variant), the peak difference to SwiGLU is split into what the parameters explain
(weights, fp32 gradients and AdamW state: effdist.train.estimate, the same numbers `effdist train --dry-run`
prints) and the rest, the activations, per token and layer. That rest is compared with the per-kind saved-tensor
accounting (effdist.pipeline.memory_model, held to the modules by tests/test_ffn_modules.py) with the fused SwiGLU
the runs used. `gap` is what the variant keeps per token and layer beyond its accounting; `gap / fc2 input` is
that gap over the bytes of fc2's dense input, which MoC, top-k and ELAS replace by a recipe
(effdist.model.ffn.saved).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Runs measured before the fix of the dense fc2 input that every compact kind kept alive (2026-12-07).
RUNS = ("bench_train_ffn_350m_h100.json", "bench_train_ffn_350m_select64_h100.json",
        "bench_train_ffn_1b_select64_h100.json", "bench_train_ffn_350m_select64_outlier_h100.json")
# The same kinds measured after the fix (1x H100, 2026-12-07): the gap should be gone.
RUNS_AFTER_FIX = ("bench_train_ffn_350m_fc2fix_h100.json", "bench_train_ffn_1b_fc2fix_h100.json")
# Every run above was measured while a plain top-K (MoC, top-k at TP = 1) saved its selection as K int16 indices;
# since 2026-12-07 it saves a bit mask of the row (effdist.model.ffn.channel), which these runs are accounted with.
INDEX_RUNS = RUNS + RUNS_AFTER_FIX
GIB = 2**30


def _config(row: dict):
    from effdist.config import load_config

    return load_config(ROOT / "configs" / f"{row['model']}.yaml", list(row["overrides"]))


def _static_bytes(cfg) -> float:
    from effdist.train.estimate import estimate

    peak = estimate(cfg, 1, on_gpu=True).peak
    return peak.weights + peak.gradients + peak.optimizer


def account(run_file: Path) -> list[dict]:
    from effdist.pipeline.memory_model import dense_fc2_input_bytes, ffn_saved_bytes_per_token

    data = json.loads(run_file.read_text())
    rows = [r for r in data["runs"] if r.get("peak_mem_gib")]
    out = []
    for base in (r for r in rows if r.get("variant") == "swiglu"):
        base_cfg = _config(base)
        tokens = base_cfg.train.micro_batch * base_cfg.data.seq_length
        layers = base_cfg.model.num_layers
        base_saved = ffn_saved_bytes_per_token(base_cfg.ffn, base_cfg.model)
        for row in rows:
            if row is base or row["model"] != base["model"] or row.get("micro_batch") != base.get("micro_batch"):
                continue
            cfg = _config(row)
            if cfg.ffn.kind == "swiglu":
                continue
            static = _static_bytes(cfg) - _static_bytes(base_cfg)
            measured = (row["peak_mem_gib"] - base["peak_mem_gib"]) * GIB
            per_token_layer = (measured - static) / (tokens * layers)  # activation change, bytes per token and layer
            as_mask = run_file.name not in INDEX_RUNS
            predicted = ffn_saved_bytes_per_token(cfg.ffn, cfg.model, selection_as_mask=as_mask) - base_saved
            fc2_input = dense_fc2_input_bytes(cfg.ffn, cfg.model)
            gap = per_token_layer - predicted
            out.append({
                "run": run_file.name, "model": row["model"], "variant": row["variant"], "ffn_kind": cfg.ffn.kind,
                "micro_batch": cfg.train.micro_batch, "peak_gib": row["peak_mem_gib"],
                "swiglu_peak_gib": base["peak_mem_gib"], "parameters_bytes_vs_swiglu": static,
                "activation_bytes_per_token_layer_vs_swiglu": per_token_layer,
                "accounted_bytes_per_token_layer_vs_swiglu": predicted, "gap_bytes_per_token_layer": gap,
                "dense_fc2_input_bytes_per_token": fc2_input, "gap_over_fc2_input": gap / fc2_input,
                "peak_ratio": row["peak_mem_gib"] / base["peak_mem_gib"],
                "peak_ratio_without_gap": (row["peak_mem_gib"] * GIB - gap * tokens * layers) / (base["peak_mem_gib"] * GIB),
            })
    return out


def held_before_the_fix_bytes(cfg) -> float:
    """The dense fc2 inputs of one micro-batch that the compact kinds' layers kept alive in these runs (the hook of
    effdist.model.ffn.saved held them until backward; fixed 2026-12-07, docs/sparse_ffn.md)."""
    from effdist.pipeline.memory_model import COMPACT_FFN_KINDS, dense_fc2_input_bytes

    tokens = cfg.train.micro_batch * cfg.data.seq_length
    return sum(dense_fc2_input_bytes(cfg.ffn, cfg.model, layer) * tokens for layer in range(cfg.model.num_layers)
               if cfg.ffn.kind_of_layer(layer) in COMPACT_FFN_KINDS)


def held_as_indices_bytes(cfg) -> float:
    """What the plain top-K layers (MoC, top-k; TP = 1) of one micro-batch saved more in runs measured before their
    selection was kept as a bit mask (2026-12-07): K int16 indices per token instead of ⌈f/32⌉ int32 words."""
    from effdist.pipeline.memory_model import ffn_saved_bytes_per_token

    tokens = cfg.train.micro_batch * cfg.data.seq_length
    return tokens * sum(ffn_saved_bytes_per_token(cfg.ffn, cfg.model, layer, selection_as_mask=False)
                        - ffn_saved_bytes_per_token(cfg.ffn, cfg.model, layer)
                        for layer in range(cfg.model.num_layers))


def planner_rows(run_file: Path) -> list[dict]:
    """Every row of a run against the planner's peak memory for its config (effdist.train.estimate, on a GPU); for
    runs measured before the fix of the held fc2 input, also against the measured peak without it; for runs measured
    with the selection saved as indices, without what the indices took beyond the bit mask."""
    from effdist.train.estimate import estimate

    out = []
    for row in json.loads(run_file.read_text())["runs"]:
        if not row.get("peak_mem_gib"):
            continue
        cfg = _config(row)
        predicted = estimate(cfg, 1, on_gpu=True).peak.total / GIB
        held = held_before_the_fix_bytes(cfg) / GIB if run_file.name in RUNS else 0.0
        held += held_as_indices_bytes(cfg) / GIB if run_file.name in INDEX_RUNS else 0.0
        out.append({"run": run_file.name, "model": row["model"], "variant": row["variant"], "ffn_kind": cfg.ffn.kind,
                    "micro_batch": cfg.train.micro_batch, "predicted_peak_gib": predicted,
                    "measured_peak_gib": row["peak_mem_gib"], "ratio": predicted / row["peak_mem_gib"],
                    "held_before_fix_gib": held, "measured_without_held_gib": row["peak_mem_gib"] - held,
                    "ratio_without_held": predicted / (row["peak_mem_gib"] - held)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*",
                   help=f"bench_train JSONs (default: {', '.join(RUNS + RUNS_AFTER_FIX)} in docs/results)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    files = [Path(r) for r in args.runs] or [ROOT / "docs" / "results" / r for r in RUNS + RUNS_AFTER_FIX]
    rows = [r for f in files for r in account(f)]
    print(f"{'run':<42} {'variant':<8} {'peak':>6} {'vs SwiGLU':>9} {'act. B/tok/layer':>17} {'accounted':>10} "
          f"{'gap':>7} {'gap/fc2 in':>10} {'ratio w/o gap':>13}")
    for r in rows:
        print(f"{r['run']:<42} {r['variant']:<8} {r['peak_gib']:>6.2f} {r['peak_ratio']:>9.3f} "
              f"{r['activation_bytes_per_token_layer_vs_swiglu']:>17,.0f} {r['accounted_bytes_per_token_layer_vs_swiglu']:>10,.0f} "
              f"{r['gap_bytes_per_token_layer']:>7,.0f} {r['gap_over_fc2_input']:>10.3f} {r['peak_ratio_without_gap']:>13.3f}")
    planner = [r for f in files for r in planner_rows(f)]
    print(f"\nthe planner's peak (effdist.train.estimate) against the same runs:\n{'run':<50} {'variant':<12} "
          f"{'predicted':>9} {'measured':>9} {'ratio':>6} {'held':>6} {'ratio w/o held':>14}")
    for r in planner:
        print(f"{r['run']:<50} {r['variant']:<12} {r['predicted_peak_gib']:>9.2f} {r['measured_peak_gib']:>9.2f} "
              f"{r['ratio']:>6.3f} {r['held_before_fix_gib']:>6.2f} {r['ratio_without_held']:>14.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python tools/ffn_memory_accounting.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": "no GPU: derived from the bench_train runs named in each row (1x H100)",
            "rows": rows, "planner": planner}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
