#!/usr/bin/env python
"""effdist's dense-model Triton kernels against the torch code they replace, at LLaMA shapes.

    python tools/bench_kernels.py --json kernels.json     # llama-350m and llama-1b shapes, 16k tokens, bf16, GPU
    python tools/bench_kernels.py --tiny                  # CPU smoke test (Triton's interpreter, tiny shapes)

For each kernel and model shape: the median time of the forward and of forward + backward
(triton.testing.do_bench on GPU), the bytes the pass must move at least (every input read once,
every output written once), the achieved bandwidth for those bytes and its fraction of --peak-gbps
(about 3 TB/s on an H100 SXM). The torch rows are the code paths effdist runs without
``train.fused_kernels``: effdist's RMSNorm, megatron's unfused gated activation and RoPE
(``_apply_rotary_pos_emb_bshd``), megatron's vocab_parallel_cross_entropy on the LM head's logits.
Their GB/s use the same minimal byte counts (an "effective" bandwidth: what they would need if they
moved nothing twice).

    rmsnorm      x [T, h] -> y                    fwd: read x, write y;  bwd: read dy, x; write dx
    swiglu       fc1 output [T, 2f] -> [T, f]     fwd: read 2f, write f; bwd: read dy (f), x (2f); write dx (2f)
    rope_qk      Q and K [s, b, heads, d]         (strided views of the fused QKV output, as megatron's
                                                  attention hands them over) fwd: read, write; bwd: the same
    ce           logits [T, V] -> per-token loss  fwd: read logits; bwd: read logits, write their gradient
    lm_head_loss hidden [T, h], W [V, h] -> loss  the LM-head GEMMs + cross-entropy; reported as model
                                                  TFLOP/s (6 T h V) and peak memory above the inputs, for
                                                  megatron's path, the fused path keeping bf16 logits, and
                                                  the fused path recomputing them in chunks (--loss-chunk)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: hidden, query heads, key/value heads, ffn hidden size, vocab
    "llama-350m": dict(hidden=1024, heads=16, kv_heads=16, ffn=2816, vocab=32000),
    "llama-1b": dict(hidden=2048, heads=32, kv_heads=32, ffn=5632, vocab=32000),
    "tiny": dict(hidden=64, heads=4, kv_heads=2, ffn=96, vocab=300),
}


def init_megatron(cuda: bool) -> None:
    """One-process world + megatron parallel state (TP=1): megatron's cross-entropy reads its TP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not cuda:
        from effdist.runtime import cpu_compat

        cpu_compat.install()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)


class Timer:
    """Median time of fn() in ms: triton's do_bench on GPU, a wall clock on CPU (smoke test only)."""

    def __init__(self, cuda: bool, reps: int):
        self.cuda, self.reps = cuda, reps

    def __call__(self, fn, grad_to_none=None) -> float:
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=self.reps, grad_to_none=grad_to_none,
                                                 return_mode="median"))
        times = []
        for _ in range(max(1, self.reps)):
            for t in grad_to_none or []:
                t.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def peak_mib(fn, cuda: bool) -> float | None:
    """Peak memory allocated while fn() runs, above what was allocated before, in MiB (GPU only)."""
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------- cases

def case_rmsnorm(shape, tokens, dtype, device):
    from effdist.kernels.rmsnorm import rmsnorm, rmsnorm_reference

    h = shape["hidden"]
    x = torch.randn(tokens, h, dtype=dtype, device=device, requires_grad=True)
    w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(tokens, h, dtype=dtype, device=device)
    e = x.element_size()
    impls = {"torch": lambda: rmsnorm_reference(x, w, 1e-5), "triton": lambda: rmsnorm(x, w, 1e-5, use_triton=True)}
    return impls, (x, w), dy, {"fwd": 2 * tokens * h * e, "fwd+bwd": 5 * tokens * h * e}, f"[{tokens}, {h}]"


def megatron_glu(x: torch.Tensor) -> torch.Tensor:
    """megatron MLP's unfused gated activation, as it runs (glu_linear_offset 0.0, no clamp)."""
    x_glu, x_linear = torch.chunk(x, 2, dim=-1)
    return torch.nn.functional.silu(x_glu) * (x_linear + 0.0)


def case_swiglu(shape, tokens, dtype, device):
    from effdist.kernels.swiglu import swiglu

    f = shape["ffn"]
    x = torch.randn(tokens, 2 * f, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(tokens, f, dtype=dtype, device=device)
    e = x.element_size()
    impls = {"torch": lambda: megatron_glu(x), "triton": lambda: swiglu(x, use_triton=True)}
    return impls, (x,), dy, {"fwd": 3 * tokens * f * e, "fwd+bwd": 8 * tokens * f * e}, f"[{tokens}, 2x{f}]"


def _rope_freqs(seq, head_dim, device):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    f = torch.outer(torch.arange(seq, device=device).float(), inv)
    return torch.cat([f, f], dim=-1)[:, None, None, :]


def case_rope_qk(shape, tokens, dtype, device, seq):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from effdist.kernels.rope import apply_rope

    heads, groups = shape["heads"], shape["kv_heads"]
    d = shape["hidden"] // heads
    batch = max(1, tokens // seq)
    per_group = heads // groups
    # megatron's fused QKV output [s, b, groups, (heads per group + 2) * d], split as its attention does.
    mixed = torch.randn(seq, batch, groups, (per_group + 2) * d, dtype=dtype, device=device)
    q, k, _ = torch.split(mixed, [per_group * d, d, d], dim=3)
    q = q.reshape(seq, batch, heads, d).detach().requires_grad_()
    k = k.detach().requires_grad_()
    freqs = _rope_freqs(seq, d, device)
    dq = torch.randn(seq, batch, heads, d, dtype=dtype, device=device)
    dk = torch.randn(seq, batch, groups, d, dtype=dtype, device=device)
    e = q.element_size()
    moved = (q.numel() + k.numel()) * e * 2

    def run(fn):
        return lambda: (fn(q, freqs), fn(k, freqs))

    impls = {"torch": run(_apply_rotary_pos_emb_bshd), "triton": run(lambda t, f: apply_rope(t, f, use_triton=True))}
    return impls, (q, k), (dq, dk), {"fwd": moved, "fwd+bwd": 2 * moved}, f"q [{seq}, {batch}, {heads}, {d}] + k"


def case_ce(shape, tokens, dtype, device):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from effdist.kernels.cross_entropy import cross_entropy_grad_, cross_entropy_stats

    v = shape["vocab"]
    logits = torch.randn(tokens, v, dtype=dtype, device=device, requires_grad=True)
    labels = torch.randint(0, v, (tokens,), device=device)
    dloss = torch.rand(tokens, device=device)
    e = logits.element_size()

    class Fused(torch.autograd.Function):  # the two kernels, as the fused loss runs them
        @staticmethod
        def forward(ctx, lg):
            lse, target = cross_entropy_stats(lg, labels, use_triton=True)
            ctx.save_for_backward(lg, lse)
            return lse - target

        @staticmethod
        def backward(ctx, g):
            # In place, as the fused loss does: the input then holds gradients, which times the same.
            lg, lse = ctx.saved_tensors
            return cross_entropy_grad_(lg.detach(), lse, labels, g, use_triton=True)

    impls = {"megatron": lambda: vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1)).squeeze(1),
             "triton": lambda: Fused.apply(logits)}
    return impls, (logits,), dloss, {"fwd": tokens * v * e, "fwd+bwd": 3 * tokens * v * e}, f"[{tokens}, {v}]"


def bench_lm_head_loss(shape, tokens, dtype, device, timer, cuda, chunk):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from effdist.kernels.cross_entropy import linear_cross_entropy

    h, v = shape["hidden"], shape["vocab"]
    hidden = torch.randn(tokens, h, dtype=dtype, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(v, h, device=device)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (tokens,), device=device)
    dloss = torch.rand(tokens, device=device)
    impls = {
        "megatron": lambda: vocab_parallel_cross_entropy((hidden @ weight.t()).unsqueeze(1),
                                                         labels.unsqueeze(1)).squeeze(1),
        "fused": lambda: linear_cross_entropy(hidden, weight, labels, use_triton=True),
        f"fused-chunk{chunk}": lambda: linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk,
                                                            use_triton=True),
    }
    rows = []
    for impl, fwd in impls.items():
        row = {"kernel": "lm_head_loss", "impl": impl, "pass": "fwd+bwd", "shape": f"[{tokens}, {h}] x [{v}, {h}]"}
        try:
            step = lambda: fwd().backward(dloss)  # noqa: E731
            row["ms"] = timer(step, grad_to_none=[hidden, weight])
            row["model_tflops"] = 6 * tokens * h * v / (row["ms"] * 1e-3) / 1e12
            hidden.grad = weight.grad = None
            row["peak_mib"] = peak_mib(step, cuda)
            hidden.grad = weight.grad = None
        except Exception as exc:  # report and go on: one variant out of memory should not lose the table
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def bench_case(kernel, built, timer, cuda, peak_gbps):
    impls, inputs, dout, moved, shape_text = built
    douts = dout if isinstance(dout, tuple) else (dout,)
    rows = []
    for impl, fwd in impls.items():
        for pass_name in ("fwd", "fwd+bwd"):
            row = {"kernel": kernel, "impl": impl, "pass": pass_name, "shape": shape_text, "bytes": moved[pass_name]}
            try:
                if pass_name == "fwd":
                    with torch.no_grad():
                        row["ms"] = timer(fwd)
                else:
                    def step(fwd=fwd):
                        out = fwd()
                        outs = out if isinstance(out, tuple) else (out,)
                        torch.autograd.backward(outs, douts)
                    row["ms"] = timer(step, grad_to_none=list(inputs))
                row["gbps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
                row["of_peak"] = row["gbps"] / peak_gbps
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            rows.append(row)
    return rows


def add_speedups(rows):
    base = {}
    for r in rows:
        if r["impl"] in ("torch", "megatron") and "ms" in r:
            base[(r["model"], r["kernel"], r["pass"])] = r["ms"]
    for r in rows:
        b = base.get((r["model"], r["kernel"], r["pass"]))
        if b and "ms" in r:
            r["speedup"] = b / r["ms"]


def print_table(rows, device, peak_gbps):
    print(f"\ndevice: {device}   bandwidth fractions of {peak_gbps:.0f} GB/s")
    print(f"{'model':<11} {'kernel':<13} {'impl':<15} {'pass':<8} {'ms':>9} {'GB/s':>8} {'of peak':>8} "
          f"{'TFLOP/s':>8} {'peak MiB':>9} {'speedup':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<11} {r['kernel']:<13} {r['impl']:<15} {r['pass']:<8} ERROR {r['error'][:70]}")
            continue
        fmt = lambda key, spec: format(r[key], spec) if r.get(key) is not None else "-"  # noqa: E731
        of_peak = f"{100 * r['of_peak']:.0f}%" if "of_peak" in r else "-"
        print(f"{r['model']:<11} {r['kernel']:<13} {r['impl']:<15} {r['pass']:<8} {r['ms']:>9.3f} "
              f"{fmt('gbps', '.0f'):>8} {of_peak:>8} {fmt('model_tflops', '.0f'):>8} {fmt('peak_mib', '.0f'):>9} "
              f"{fmt('speedup', '.2f'):>8}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-350m,llama-1b")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per call (seq x micro-batch)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (RoPE positions)")
    p.add_argument("--kernels", default="rmsnorm,swiglu,rope_qk,ce,lm_head_loss")
    p.add_argument("--loss-chunk", type=int, default=4096, help="chunk_tokens of the chunked fused loss")
    p.add_argument("--peak-gbps", type=float, default=3000.0, help="HBM bandwidth the GB/s are compared with")
    p.add_argument("--reps", type=int, default=100, help="do_bench repetition time in ms (GPU; one run on CPU)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, Triton's interpreter")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda:
        # Triton reads this when the kernels are first decorated (on first use), so setting it here works.
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        models, tokens, seq = ["tiny"], 32, 16
    else:
        models, tokens, seq = args.models.split(","), args.tokens, args.seq
    kernels = args.kernels.split(",")
    unknown = set(kernels) - {"rmsnorm", "swiglu", "rope_qk", "ce", "lm_head_loss"}
    if unknown:
        p.error(f"--kernels: unknown {sorted(unknown)}")
    init_megatron(cuda)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    timer = Timer(cuda, args.reps if cuda else 1)
    device_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    rows = []
    for model in models:
        shape = SHAPES[model]
        builders = {"rmsnorm": lambda: case_rmsnorm(shape, tokens, dtype, device),
                    "swiglu": lambda: case_swiglu(shape, tokens, dtype, device),
                    "rope_qk": lambda: case_rope_qk(shape, tokens, dtype, device, seq),
                    "ce": lambda: case_ce(shape, tokens, dtype, device)}
        for kernel in kernels:
            if kernel == "lm_head_loss":
                new = bench_lm_head_loss(shape, tokens, dtype, device, timer, cuda, min(args.loss_chunk, tokens // 2))
            else:
                new = bench_case(kernel, builders[kernel](), timer, cuda, args.peak_gbps)
            for r in new:
                r["model"] = model
                print(json.dumps(r), flush=True)
            rows.extend(new)
            if cuda:
                torch.cuda.empty_cache()
    add_speedups(rows)
    print_table(rows, device_name, args.peak_gbps)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": device_name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "dtype": str(dtype), "tokens": tokens, "seq": seq, "peak_gbps": args.peak_gbps, "rows": rows}, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
