#!/usr/bin/env python
"""GPU: the threshold-search top-k kernels (effdist.kernels.topk_select) against torch.topk, bf16.

* selection alone: topk_select vs torch.topk(sorted=False), at the decode shapes (1 and 32 rows of the
  llama-1b FFN width) and the training shapes (16k rows of llama-350m's and llama-1b's);
* training forward of MoC / top-k: the fused top-k + SiLU(g)·u (or relu) kernel vs torch.topk followed by
  effdist.kernels.channel_select.select_activate, with a sweep of (rows per program, warps) and, for one
  row per program, both threshold searches (bisection, and the radix histograms as "radix/(1, W, warps)").

Each time is GPU time: 20 calls captured in one CUDA graph, replayed, median of 20 replays / 20
(Python launch overhead, tens of microseconds per Triton launch, would otherwise dominate at decode sizes).

    python tools/bench_topk_select.py --json topk_select.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effdist.kernels.channel_select import select_activate  # noqa: E402
from effdist.kernels.topk_select import topk_select_activate_triton, topk_select_config, topk_select_triton  # noqa: E402
from tools.gpu_result import write_gpu_json  # noqa: E402

SELECT_CASES = [(1, 5632, 1056), (1, 5632, 563), (32, 5632, 1056), (16384, 2816, 528), (16384, 5632, 1056)]
# (rows, width, k, act): MoC K = 0.1875 f (SwiGLU: src is 2f wide), top-k k = 0.1 f
FUSED_CASES = [(16384, 2816, 528, "swiglu"), (16384, 5632, 1056, "swiglu"), (16384, 2816, 282, "relu"),
               (16384, 5632, 563, "relu")]
# (rows per program, warps); the block is the row width rounded up to a power of two. Configs that would hold
# more than MAX_PER_THREAD row elements per thread are skipped (they spill registers).
CONFIGS = [(rows, warps) for rows in (1, 2, 4, 8) for warps in (1, 2, 4, 8, 16)]
MAX_PER_THREAD = 128


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    select, fused = [], []
    for n, w, k in SELECT_CASES:
        x = torch.randn(n, w, device="cuda", dtype=torch.bfloat16)
        ours = gpu_ms(lambda: topk_select_triton(x, k))
        ref = gpu_ms(lambda: torch.topk(x, k, dim=1, sorted=False))
        select.append({"rows": n, "width": w, "k": k, "config": list(topk_select_config(n, w)),
                       "topk_select_ms": ours, "torch_topk_ms": ref, "speedup": ref / ours})
        print(f"select {n:>6} x {w} k {k:>5}: topk_select {ours * 1e3:8.1f} us, torch.topk {ref * 1e3:8.1f} us "
              f"({ref / ours:.2f}x)", flush=True)
    for n, w, k, act in FUSED_CASES:
        src = torch.randn(n, 2 * w if act == "swiglu" else w, device="cuda", dtype=torch.bfloat16)

        def separate():
            idx = torch.topk(src[:, :w], k, dim=1, sorted=False).indices.to(torch.int16)
            return select_activate(src, idx, w, act)

        sep = gpu_ms(separate)
        row = {"rows": n, "width": w, "k": k, "act": act, "torch_topk_plus_select_activate_ms": sep,
               "default_config": list(topk_select_config(n, w)), "fused_ms": {}}
        expected = topk_select_activate_triton(src, k, w, act, torch.int16)
        row["same_output_as_default"] = {}
        for (rows_per, warps), method in [(c, m) for c in CONFIGS for m in ("bisect", "radix")]:
            cfg = (rows_per, 1 << (w - 1).bit_length(), warps)
            if rows_per * cfg[1] > MAX_PER_THREAD * 32 * warps or (method == "radix" and rows_per != 1):
                continue
            name = str(cfg) if method == "bisect" else f"radix/{cfg}"
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
    if args.json:
        write_gpu_json(args.json, "bench_topk_select.py", select=select, fused=fused)
    return 0


if __name__ == "__main__":
    sys.exit(main())
