#!/usr/bin/env python
"""GPU: the gather-GEMV kernels of sparse decode (effdist.kernels.gather_gemv) at the llama-1b FFN shape
(hidden 2048, width 5632, MoC K = 1056, top-k k = 563), bf16: each kernel's time against the dense
GEMV over all rows (F.linear) and the bandwidth its bytes imply, for a sweep of block sizes.

    python tools/bench_gather_gemv.py --json gather_gemv.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effdist.kernels import gather_gemv as gg  # noqa: E402
from tools.bench_topk_select import gpu_ms as time_ms  # noqa: E402  (GPU time through a CUDA graph)
from tools.gpu_result import write_gpu_json  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    hidden, width = 2048, 5632
    dev, dt = "cuda", torch.bfloat16
    w = torch.randn(width, hidden, device=dev, dtype=dt)
    rows = []
    for batch in (1, 8):
        for slots in (1056, 563):
            idx = torch.stack([torch.randperm(width, device=dev)[:slots].sort().values for _ in range(batch)]).int()
            x = torch.randn(batch, hidden, device=dev, dtype=dt)
            coef = torch.randn(batch, slots, device=dev, dtype=dt)
            gathered = batch * slots * hidden * 2
            dense_ms = time_ms(lambda: F.linear(x, w))
            base = {"batch": batch, "slots": slots, "hidden": hidden, "width": width,
                    "dense_gemv_ms": dense_ms, "gathered_bytes": gathered}
            for bk, bh, warps in ((8, 256, 4), (2, 512, 4), (1, 1024, 4), (4, 512, 4), (1, 2048, 8)):
                out = torch.empty(batch, slots, device=dev, dtype=dt)
                grid = (batch, triton_cdiv(slots, bk))
                fn = lambda: gg._gather_rows_matvec_kernel[grid](  # noqa: E731
                    x, idx, w, coef, out, batch, slots, hidden, x.stride(0), idx.stride(0), w.stride(0),
                    coef.stride(0), out.stride(0), GATED=True, BLOCK_K=bk, BLOCK_H=bh, num_warps=warps)
                ms = time_ms(fn)
                rows.append({**base, "kernel": "matvec", "BLOCK_K": bk, "BLOCK_H": bh, "num_warps": warps, "ms": ms,
                             "GB_per_s": gathered / ms / 1e6})
            for bs, bh, split, warps in ((16, 128, None, 4), (32, 256, 16, 4), (32, 512, 8, 4), (64, 256, 8, 8),
                                         (16, 256, 32, 4)):
                split = split or gg.combine_splits(batch, slots, hidden)
                parts = torch.zeros(split, batch, hidden, device=dev, dtype=torch.float32)
                grid = (batch, triton_cdiv(hidden, bh), split)

                def fn():
                    gg._gather_rows_combine_kernel[grid](
                        coef, idx, idx, w, parts, batch, slots, hidden, coef.stride(0), idx.stride(0), w.stride(0),
                        parts.stride(0), parts.stride(1), HAS_COUNT=False, SPLIT=split, BLOCK_S=bs, BLOCK_H=bh,
                        num_warps=warps)
                    return parts.sum(dim=0)
                ms = time_ms(fn)
                rows.append({**base, "kernel": "combine+sum", "BLOCK_S": bs, "BLOCK_H": bh, "split": split,
                             "num_warps": warps, "ms": ms, "GB_per_s": gathered / ms / 1e6})
            for r in rows[-10:]:
                print(r["batch"], r["slots"], r["kernel"], {k: r[k] for k in r if k.isupper() or k in ("split", "num_warps")},
                      f"{r['ms'] * 1e3:.1f} us ({r['GB_per_s']:.0f} GB/s), dense GEMV {dense_ms * 1e3:.1f} us", flush=True)
    if args.json:
        write_gpu_json(args.json, "bench_gather_gemv.py", results=rows)
    return 0


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    sys.exit(main())
