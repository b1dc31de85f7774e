#!/usr/bin/env python
"""GPU: the threshold-search top-k kernel (effdist.kernels.topk_select) against torch.topk at the
sparse-FFN shapes (decode: 1 and 32 rows of the llama-1b FFN width; training: 16k rows of llama-350m's
and llama-1b's), bf16, median of CUDA-event timings.

    python tools/bench_topk_select.py --json topk_select.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effdist.kernels.topk_select import topk_select_triton  # noqa: E402

# (rows, width, k): MoC K = 0.1875 f, top-k k = 0.1 f
CASES = [(1, 5632, 1056), (1, 5632, 563), (32, 5632, 1056), (16384, 2816, 528), (16384, 5632, 1056)]


def time_ms(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for n, w, k in CASES:
        x = torch.randn(n, w, device="cuda", dtype=torch.bfloat16)
        ours = time_ms(lambda: topk_select_triton(x, k))
        torch_ms = time_ms(lambda: torch.topk(x, k, dim=1, sorted=False))
        same = torch.equal(topk_select_triton(x, k)[0].long(),
                           torch.topk(x, k, dim=1).indices.sort(dim=1).values) if n <= 32 else None
        rows.append({"rows": n, "width": w, "k": k, "topk_select_ms": ours, "torch_topk_ms": torch_ms,
                     "speedup": torch_ms / ours, "same_set_as_torch": same})
        print(f"{n:>6} x {w} k {k:>5}: topk_select {ours:.4f} ms, torch.topk {torch_ms:.4f} ms "
              f"({torch_ms / ours:.2f}x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": "python tools/bench_topk_select.py " + " ".join(sys.argv[1:]), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
