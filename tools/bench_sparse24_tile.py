#!/usr/bin/env python
"""GPU: torch's own fused 2:4 prune + compress (`torch._sparse_semi_structured_tile`, the transposable 4x4-tile
pattern of Haziza et al.) and the 2:4 GEMMs it feeds, against the dense GEMMs, at ELAS's fc2 shapes (#23 item 3).

For each shape (llama-350m: F 4224 -> h 1024; llama-1b: F 8448 -> h 2048) and token count (16k, 64k), bf16:
* dense: y @ W.T (fc2 forward) and dOut.T @ y (fc2 weight gradient); ELAS's own 2:4 sparsify kernel for scale;
* for each backend (cuSPARSELt, CUTLASS): the tile kernel (prune + compress + the transposed copy), the forward
  GEMM with the sparse operand and the weight gradient with its transposed copy, through torch's
  SparseSemiStructuredTensor classes; a backend this GPU lacks is recorded as an error, not a failure;
* what the tile pattern keeps: the fraction of entries kept, whether every row group of 4 keeps at most 2 (the
  per-token 2:4 ELAS needs) and the squared mass kept against ELAS's per-row top-2-of-4.

Median GPU time of 20 calls after 5 warm-ups (CUDA events), ms.

    python tools/bench_sparse24_tile.py --json docs/results/sparse24_tile_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.gpu_result import write_gpu_json  # noqa: E402

SHAPES = (("350m", 4224, 1024), ("1b", 8448, 2048))
TOKENS = (16384, 65536)


def median_ms(fn, reps: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(name: str, width: int, hidden: int, tokens: int) -> dict:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from effdist.kernels import sparse24

    torch.manual_seed(0)
    pre = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    y = torch.relu(pre) ** 2
    weight = torch.randn(hidden, width, device="cuda", dtype=torch.bfloat16) / width ** 0.5
    dout = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    row = {"shape": name, "tokens": tokens, "F": width, "h": hidden,
           "dense_fwd": median_ms(lambda: y @ weight.t()), "dense_wgrad": median_ms(lambda: dout.t() @ y),
           "elas_sparsify24_kernel": median_ms(lambda: sparse24.sparsify24_triton(pre, relu2=True,
                                                                                  write_compressed=False))}
    rowwise = sparse24.sparsify24_triton(pre, relu2=True, write_compressed=False)[0]
    for cls, tag in ((SparseSemiStructuredTensorCUSPARSELT, "cslt"), (SparseSemiStructuredTensorCUTLASS, "cutlass")):
        try:
            row[f"{tag}_tile"] = median_ms(lambda: cls.prune_dense_static_sort(y))
            sparse = cls.prune_dense_static_sort(y)
            row[f"{tag}_fwd"] = median_ms(lambda: sparse @ weight.t())
            row[f"{tag}_wgrad"] = median_ms(lambda: dout.t() @ sparse)
            dense_of_sparse = sparse.to_dense()
            reference = dense_of_sparse @ weight.t()
            row[f"{tag}_fwd_err"] = float(((sparse @ weight.t()) - reference).abs().max() / reference.abs().max())
            kept = (dense_of_sparse != 0).float()
            row[f"{tag}_kept_frac"] = float(kept.mean())
            row[f"{tag}_rows_2of4"] = float((kept.view(tokens, width // 4, 4).sum(-1) <= 2).float().mean())
            row[f"{tag}_energy_vs_rowwise"] = float((dense_of_sparse.float() ** 2).sum() / (rowwise.float() ** 2).sum())
        except Exception as e:  # noqa: BLE001 - a backend this GPU lacks (CUTLASS 2:4 is sm8x only) is a result
            row[f"{tag}_err"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark times GPU kernels: it needs a CUDA GPU")
    rows = []
    for name, width, hidden in SHAPES:
        for tokens in TOKENS:
            rows.append(measure(name, width, hidden, tokens))
            r = rows[-1]
            print(f"{name:<5} {tokens:>6}: dense fwd {r['dense_fwd']:.3f} wgrad {r['dense_wgrad']:.3f} ms; "
                  + "; ".join(f"{t} tile {r[t + '_tile']:.3f} fwd {r[t + '_fwd']:.3f} wgrad {r[t + '_wgrad']:.3f}"
                              if t + "_fwd" in r else f"{t}: {r.get(t + '_err', '?')[:60]}"
                              for t in ("cslt", "cutlass")), flush=True)
    if args.json:
        write_gpu_json(args.json, "bench_sparse24_tile.py", results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
