#!/usr/bin/env python
"""GPU: the threshold-search top-k kernels (effdist.kernels.topk_select) against torch.topk, bf16.

* selection alone: topk_select vs torch.topk(sorted=False), at the decode shapes (1 and 32 rows of the
  llama-1b FFN width, with a sweep of the warps of the one program a row) and the training shapes (16k rows
  of llama-350m's and llama-1b's);
* training forward of MoC / top-k: the fused top-k + SiLU(g)·u (or relu) kernel vs torch.topk followed by
  effdist.kernels.channel_select.select_activate, with a sweep of (rows per program, warps) and each threshold
  search (bisection; the four-way bisection as "bisect4/(rows, W, warps)"; for one row per program the radix
  histograms as "radix/(1, W, warps)");
* training backward of the same: the fc1-output gradient and the rebuild of fc2's input from the selection kept
  as indices (scatter into a zeroed tensor) vs kept as a bit mask (dense-row kernels), with a sweep of the masked
  kernels' (rows per program, columns per chunk, warps); outputs compared with the index path's.

Each time is GPU time: 20 calls captured in one CUDA graph, replayed, median of 20 replays / 20
(Python launch overhead, tens of microseconds per Triton launch, would otherwise dominate at decode sizes).

    python tools/bench_topk_select.py --json topk_select.json
    python tools/bench_topk_select.py --parts backward --json topk_select_backward.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effdist.kernels.channel_select import (  # noqa: E402
    masked_tile_config,
    scatter_activated_masked_triton,
    scatter_activated_triton,
    select_activate,
    select_activate_backward_masked_triton,
    select_activate_backward_triton,
)
from effdist.kernels.topk_select import (  # noqa: E402
    SELECT_METHODS,
    topk_select_activate_triton,
    topk_select_config,
    topk_select_triton,
)
from tools.gpu_result import write_gpu_json  # noqa: E402

SELECT_CASES = [(1, 5632, 1056), (1, 5632, 563), (32, 5632, 1056), (16384, 2816, 528), (16384, 5632, 1056)]
# (rows, width, k, act): MoC K = 0.1875 f (SwiGLU: src is 2f wide), top-k k = 0.1 f
FUSED_CASES = [(16384, 2816, 528, "swiglu"), (16384, 5632, 1056, "swiglu"), (16384, 2816, 282, "relu"),
               (16384, 5632, 563, "relu")]
# (rows per program, warps); the block is the row width rounded up to a power of two. Configs that would hold
# more than MAX_PER_THREAD row elements per thread are skipped (they spill registers).
CONFIGS = [(rows, warps) for rows in (1, 2, 4, 8) for warps in (1, 2, 4, 8, 16)]
MAX_PER_THREAD = 128
# The decode-sized selections (at most this many rows) are also timed at each of these warp counts.
DECODE_MAX_ROWS = 32
DECODE_WARPS = (2, 4, 8, 16, 32)
# The masked kernels' (rows per program, columns per chunk, warps); a chunk as wide as the row (rounded up to a power
# of two) is the first version's whole-row walk, kept in the sweep as the comparison.
MASKED_CONFIGS = [(1, 256, 1), (1, 256, 2), (1, 512, 2), (1, 512, 4), (1, 1024, 4), (1, 1024, 8), (1, 2048, 8),
                  (2, 512, 4), (2, 1024, 8), (4, 256, 4)]


def gpu_ms(fn, calls: int = 20, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def backward_row(n: int, w: int, k: int, act: str) -> dict:
    """Backward of one FFN layer's selection: index path vs mask path (each: the fc1-output gradient, then fc2's
    input rebuilt), the mask path at each launch configuration."""
    src = torch.randn(n, 2 * w if act == "swiglu" else w, device="cuda", dtype=torch.bfloat16)
    _, a, b, idx = topk_select_activate_triton(src, k, w, act, torch.int16)
    _, _, _, mask = topk_select_activate_triton(src, k, w, act, as_mask=True)
    dz = torch.randn(n, w, device="cuda", dtype=torch.bfloat16)
    want = (select_activate_backward_triton(dz, a, b, idx, w, act), scatter_activated_triton(a, b, idx, w, act))
    row = {"rows": n, "width": w, "k": k, "act": act, "default_config": list(masked_tile_config(w, act)),
           "index_ms": gpu_ms(lambda: (select_activate_backward_triton(dz, a, b, idx, w, act),
                                       scatter_activated_triton(a, b, idx, w, act))),
           "mask_ms": {}, "same_output_as_index": {}}
    whole_row = (1, 1 << (w - 1).bit_length(), 16)
    for cfg in sorted(set(MASKED_CONFIGS + [tuple(row["default_config"]), whole_row])):
        def masked():
            return (select_activate_backward_masked_triton(dz, a, b, mask, w, act, cfg),
                    scatter_activated_masked_triton(a, b, mask, w, act, cfg))

        try:
            got = masked()
            row["mask_ms"][str(cfg)] = gpu_ms(masked)
        except Exception as e:  # noqa: BLE001  (a config out of registers must not end the sweep)
            print(f"  masked config {cfg}: {type(e).__name__}", flush=True)
            continue
        row["same_output_as_index"][str(cfg)] = all(torch.equal(x, y) for x, y in zip(got, want))
    row["best_mask_config"] = min(row["mask_ms"], key=row["mask_ms"].get)
    row["speedup_best"] = row["index_ms"] / row["mask_ms"][row["best_mask_config"]]
    row["speedup_default"] = row["index_ms"] / row["mask_ms"][str(tuple(row["default_config"]))]
    print(f"backward {act} {n} x {w} k {k}: indices {row['index_ms']:.3f} ms; mask "
          + ", ".join(f"{c} {m:.3f}" for c, m in row["mask_ms"].items()), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--parts", default="select,fused,backward",
                   help="comma-separated: select, fused, backward (default: all three)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"select", "fused", "backward"}:
        p.error(f"--parts {args.parts}: valid parts are select, fused, backward")
    if not torch.cuda.is_available():
        p.error("this benchmark times GPU kernels: it needs a CUDA GPU")
    select, fused, backward = [], [], []
    for n, w, k in SELECT_CASES if "select" in parts else []:
        x = torch.randn(n, w, device="cuda", dtype=torch.bfloat16)
        ours = gpu_ms(lambda: topk_select_triton(x, k))
        ref = gpu_ms(lambda: torch.topk(x, k, dim=1, sorted=False))
        row = {"rows": n, "width": w, "k": k, "config": list(topk_select_config(n, w)),
               "topk_select_ms": ours, "torch_topk_ms": ref, "speedup": ref / ours}
        if n <= DECODE_MAX_ROWS:  # decode shapes: one row per program, latency-bound; which warp count is fastest
            want = topk_select_triton(x, k)
            row["warps_ms"], row["same_output_as_default"] = {}, {}
            for warps in DECODE_WARPS:
                cfg = (1, 1 << (w - 1).bit_length(), warps)
                try:
                    got = topk_select_triton(x, k, cfg)
                    row["warps_ms"][str(warps)] = gpu_ms(lambda: topk_select_triton(x, k, cfg))
                except Exception as e:  # noqa: BLE001  (a configuration the GPU refuses must not end the sweep)
                    print(f"  select config {cfg}: {type(e).__name__}", flush=True)
                    continue
                row["same_output_as_default"][str(warps)] = all(torch.equal(a, b) for a, b in zip(got, want))
        select.append(row)
        swept = "".join(f", {wp} warps {t * 1e3:.1f} us" for wp, t in row.get("warps_ms", {}).items())
        print(f"select {n:>6} x {w} k {k:>5}: topk_select {ours * 1e3:8.1f} us, torch.topk {ref * 1e3:8.1f} us "
              f"({ref / ours:.2f}x){swept}", flush=True)
    for n, w, k, act in FUSED_CASES if "fused" in parts else []:
        src = torch.randn(n, 2 * w if act == "swiglu" else w, device="cuda", dtype=torch.bfloat16)

        def separate():
            idx = torch.topk(src[:, :w], k, dim=1, sorted=False).indices.to(torch.int16)
            return select_activate(src, idx, w, act)

        sep = gpu_ms(separate)
        row = {"rows": n, "width": w, "k": k, "act": act, "torch_topk_plus_select_activate_ms": sep,
               "default_config": list(topk_select_config(n, w)), "fused_ms": {}}
        expected = topk_select_activate_triton(src, k, w, act, torch.int16)
        row["same_output_as_default"] = {}
        for (rows_per, warps), method in [(c, m) for c in CONFIGS for m in SELECT_METHODS]:
            cfg = (rows_per, 1 << (w - 1).bit_length(), warps)
            if rows_per * cfg[1] > MAX_PER_THREAD * 32 * warps or (method == "radix" and rows_per != 1):
                continue
            name = str(cfg) if method == "bisect" else f"{method}/{cfg}"
            try:
                got = topk_select_activate_triton(src, k, w, act, torch.int16, cfg, method)
                ms = gpu_ms(lambda: topk_select_activate_triton(src, k, w, act, torch.int16, cfg, method))
            except Exception as e:  # noqa: BLE001  (a config out of registers must not end the sweep)
                print(f"  config {name}: {type(e).__name__}", flush=True)
                continue
            row["fused_ms"][name] = ms
            row["same_output_as_default"][name] = all(
                torch.equal(a, b) for a, b in zip(got, expected) if a is not None)
        best = min(row["fused_ms"].values())
        row["best_fused_ms"] = best
        row["best_config"] = min(row["fused_ms"], key=row["fused_ms"].get)
        row["default_fused_ms"] = row["fused_ms"].get(str(tuple(row["default_config"])))
        row["speedup_best"] = sep / best
        fused.append(row)
        print(f"fused {act} {n} x {w} k {k}: topk+select_activate {sep:.3f} ms; fused "
              + ", ".join(f"{c} {m:.3f}" for c, m in row["fused_ms"].items()), flush=True)
    if "backward" in parts:
        backward = [backward_row(*case) for case in FUSED_CASES]
    if args.json:
        write_gpu_json(args.json, "bench_topk_select.py", select=select, fused=fused, backward=backward)
    return 0


if __name__ == "__main__":
    sys.exit(main())
