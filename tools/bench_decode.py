#!/usr/bin/env python
"""EPAS inference throughput: prefill and decode tokens/s and KV-cache bytes of a LLaMA-1B-shaped model
(16 layers, hidden 2048, 32 heads, SwiGLU 5632, vocab 32000; random weights, bf16 on GPU) at EPAS
regions 0 (dense), 8 and 12, for several batch sizes and prompt lengths, all in ONE process.

    python tools/bench_decode.py --json decode.json       # GPU: batches 1,8,32 x contexts 512,2048
    python tools/bench_decode.py --tiny                   # CPU smoke test, seconds

What is measured, per (batch, context) and variant:

* prefill: the whole prompt (`context` tokens per sequence) through the model, writing the KV cache;
  tokens/s = batch x context / time.
* decode: `--new-tokens` greedy steps after that prefill (the context grows from `context` to
  `context + new_tokens`); tokens/s = batch x steps / time. "graphs": each step replays a CUDA
  graph (effdist.infer.graphs, attends over the filled slots rounded up to a 128-slot bucket);
  "eager": each step is launched op by op from Python over exactly the filled slots.
* KV cache: bytes for `context + new_tokens` slots. A sharing layer stores V only.

Variants: regions 0, 8, 12 (``--regions``; the deepest layers share), each with two kinds of decode
attention for the layers whose probabilities nobody reuses: "matmul" (``softmax(q K^T) V`` as two
batched GEMMs, what an anchor always does when sharing layers reuse its probabilities) and "sdpa"
(torch's scaled_dot_product_attention; variant names end in -sdpa). Sharing layers always reuse
their anchor's probabilities (one GEMM with their V cache). "x r0" compares with region 0 of the
same attention kind, "x best dense" with the faster dense variant. "ideal" is the decode speed-up if
a step took time proportional to the bytes it reads (weights + K/V at the mean context): a sharing
layer skips its Wq/Wk rows and its K cache.

Variants take turns (``--rounds``), each round in a rotated order; medians are reported. Caches and
graphs are made once per (batch, context) and reused by every round.

Sparse FFNs (``--ffn-kinds swiglu,moc,topk,elas``, also relu2): one model per kind at the shape's
width (non-gated kinds elas/relu2 are --elas-expand x wider, as training makes them), decoded
through its sparse FFN path (effdist.infer.ffn: Triton gather-GEMV on GPU, the torch reference on
CPU), against the dense model of the same shape and weights (MoC -> SwiGLU, top-k -> its activation
on every channel, ELAS and relu2 -> ReLU²), taking turns, at each batch (default 1,8,32), context
(default 512) and EPAS region (default 0). "x dense" = sparse decode tokens/s / dense decode tokens/s.

    python tools/bench_decode.py --ffn-kinds swiglu,moc,topk,elas --json decode_ffn.json
    python tools/bench_decode.py --tiny --ffn-kinds moc,topk,elas     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from effdist.infer.cache import KVCache, SharingPlan  # noqa: E402
from effdist.infer.ffn import FFN_KINDS, dense_counterpart  # noqa: E402
from effdist.infer.graphs import DecodeRunner  # noqa: E402
from effdist.infer.model import InferenceLayer, InferenceModel, ModelShape  # noqa: E402
from effdist.kernels._common import HAVE_TRITON  # noqa: E402

# name: (layers, hidden, heads, kv heads, ffn, vocab)
SHAPES = {
    "llama-1b": (16, 2048, 32, 32, 5632, 32000),
    "tiny": (4, 64, 4, 2, 176, 512),
}


def bytes_per_decode_step(shape: ModelShape, ffn: int, plan: SharingPlan, batch: int, context: float,
                          element: int) -> float:
    """Bytes a decode step reads: weights (a sharing layer only its Wv rows of the QKV weight), the
    LM head, and K (anchors) / V (all layers) of `context` slots."""
    h, d, nh, ng = shape.hidden_size, shape.head_dim, shape.num_heads, shape.num_kv_heads
    common = h * nh * d + 3 * h * ffn + 2 * h  # proj, fc1 (gate + up), fc2, norms
    weights = 0
    kv = 0
    for i in range(shape.num_layers):
        sharing = plan.shares(i)
        weights += common + (ng * d * h if sharing else (nh + 2 * ng) * d * h)
        kv += batch * ng * d * context * (1 if sharing else 2)
    weights += shape.padded_vocab_size * h + h
    return (weights + kv) * element


class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def decode(runner: DecodeRunner, first: torch.Tensor, steps: int, vocab: int) -> None:
    """`steps` greedy decode steps, each feeding its argmax to the next (no host sync inside)."""
    cache = runner.cache
    cache.tokens.copy_(first)
    for _ in range(steps):
        logits = runner.step()
        cache.tokens.copy_(logits[:, :vocab].argmax(dim=-1))
        cache.advance()


def bench_point(model: InferenceModel, ffn: int, batch: int, context: int, variants: list[tuple[str, int, str]],
                new_tokens: int, rounds: int, graphs: bool, eager: bool, bucket: int, seed: int = 0) -> list[dict]:
    shape, device, dtype = model.shape, model.device, model.dtype
    cuda = device.type == "cuda"
    vocab = shape.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed + batch * 7919 + context)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    max_len = context + new_tokens + 1
    plans = {region: SharingPlan.for_region(shape.num_layers, region) for _, region, _ in variants}
    caches = {region: KVCache(plan, batch, max_len, shape.num_kv_heads, shape.head_dim, dtype, device)
              for region, plan in plans.items()}
    runners: dict[tuple[str, str], DecodeRunner] = {}
    modes = (["graphs"] if graphs and cuda else []) + (["eager"] if eager or not cuda else [])
    for name, region, attention in variants:
        for mode in modes:
            runners[name, mode] = DecodeRunner(model, caches[region], cuda_graphs=mode == "graphs", bucket=bucket)
    samples: dict[str, dict[str, list[float]]] = {name: {"prefill": [], **{m: [] for m in modes}}
                                                 for name, _, _ in variants}
    element = torch.empty((), dtype=dtype).element_size()

    def run(name: str, region: int, attention: str, record: bool) -> None:
        model.decode_attention = attention
        plan, cache = plans[region], caches[region]
        for mode in modes:
            with Timer(cuda) as t:
                logits = model.prefill(prompt, plan, cache)
            first = logits[:, :vocab].argmax(dim=-1)
            if record:
                samples[name]["prefill"].append(t.seconds)
            with Timer(cuda) as t:
                decode(runners[name, mode], first, new_tokens, vocab)
            if record:
                samples[name][mode].append(t.seconds)

    with torch.inference_mode():
        for name, region, attention in variants:  # warm-up: kernels, cuBLAS heuristics, graph capture
            run(name, region, attention, record=False)
        for r in range(rounds):
            shift = r % len(variants)
            for name, region, attention in variants[shift:] + variants[:shift]:
                run(name, region, attention, record=True)
    model.decode_attention = "matmul"

    rows = []
    for name, region, attention in variants:
        plan = plans[region]
        row = {"batch": batch, "context": context, "new_tokens": new_tokens, "variant": name, "region": region,
               "decode_attention": attention,
               "prefill_tokens_per_s": batch * context / statistics.median(samples[name]["prefill"]),
               "kv_cache_bytes": caches[region].bytes_for(context + new_tokens),
               "decode_bytes_per_step": bytes_per_decode_step(shape, ffn, plan, batch, context + new_tokens / 2,
                                                              element)}
        for mode in modes:
            row[f"decode_{mode}_tokens_per_s"] = batch * new_tokens / statistics.median(samples[name][mode])
        if cuda and "graphs" in modes:
            row["graph_buckets"] = runners[name, "graphs"].captured_lengths
        rows.append(row)
    dense = [r for r in rows if r["region"] == 0]
    for row in rows:
        base = next(r for r in dense if r["decode_attention"] == row["decode_attention"])
        row["prefill_vs_region0"] = row["prefill_tokens_per_s"] / base["prefill_tokens_per_s"]
        row["kv_cache_vs_region0"] = row["kv_cache_bytes"] / base["kv_cache_bytes"]
        row["ideal_decode_vs_region0"] = base["decode_bytes_per_step"] / row["decode_bytes_per_step"]
        for mode in modes:
            key = f"decode_{mode}_tokens_per_s"
            row[f"decode_{mode}_vs_region0"] = row[key] / base[key]
            row[f"decode_{mode}_vs_best_dense"] = row[key] / max(r[key] for r in dense)
    del runners, caches
    if cuda:
        torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], modes: list[str]) -> None:
    head = ["batch", "ctx", "variant", "prefill tok/s", "x r0"]
    for mode in modes:
        head += [f"decode {mode} tok/s", "x r0", "x best dense"]
    head += ["KV MiB", "x r0", "ideal"]
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([str(r["batch"]), str(r["context"]), "-", r["error"]])
            continue
        line = [str(r["batch"]), str(r["context"]), r["variant"], f"{r['prefill_tokens_per_s']:,.0f}",
                f"{r['prefill_vs_region0']:.3f}"]
        for mode in modes:
            line += [f"{r[f'decode_{mode}_tokens_per_s']:,.1f}", f"{r[f'decode_{mode}_vs_region0']:.3f}",
                     f"{r[f'decode_{mode}_vs_best_dense']:.3f}"]
        line += [f"{r['kv_cache_bytes'] / 2**20:,.1f}", f"{r['kv_cache_vs_region0']:.3f}",
                 f"{r['ideal_decode_vs_region0']:.3f}"]
        lines.append(line)
    widths = [max(len(l[i]) for l in lines if i < len(l)) for i in range(len(head))]
    for l in lines:
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))


def print_goal(rows: list[dict], modes: list[str], region: int) -> None:
    """The issue's goal: decode at the full region >= 1.35 x region 0 at batch 32, context 2048."""
    mode = modes[0]
    key = f"decode_{mode}_tokens_per_s"
    for batch, context in dict.fromkeys((r["batch"], r["context"]) for r in rows if "error" not in r):
        point = [r for r in rows if (r["batch"], r["context"]) == (batch, context) and "error" not in r]
        best_dense = max(r[key] for r in point if r["region"] == 0)
        shared = [r[key] for r in point if r["region"] == region]
        if shared and region > 0:
            print(f"batch {batch:>3}, context {context:>5}: region {region} decode ({mode}) "
                  f"{max(shared) / best_dense:.3f} x the best dense variant")


# ---------------------------------------------------------------------------------------- sparse FFN kinds

def with_dense_ffns(model: InferenceModel) -> InferenceModel:
    """The same model (shared tensors) with every FFN replaced by its dense counterpart."""
    layers = [InferenceLayer(l.input_norm, l.qkv, l.proj, l.mlp_norm, dense_counterpart(l.ffn)) for l in model.layers]
    return InferenceModel(model.shape, model.embedding, layers, model.final_norm, model.output).eval()


def ffn_options(kind: str, width: int, args) -> dict:
    """random_ffn options of a kind, with the config's defaults (ffn.topk_k, ffn.moc_k as fractions)."""
    from effdist.config import resolve_count

    if kind == "topk":
        return {"k": resolve_count(args.topk_k, width), "topk_activation": args.topk_activation}
    if kind == "moc":
        return {"k": resolve_count(args.moc_k, width), "moc_structured": args.moc_structured}
    if kind == "elas":
        return {"rank": args.elas_rank}
    return {}


def bench_ffn_point(models: dict[str, InferenceModel], batch: int, context: int, region: int, new_tokens: int,
                    rounds: int, modes: list[str], bucket: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Median prefill / decode tokens/s of each model at one (batch, context, region), taking turns."""
    first = next(iter(models.values()))
    shape, device, dtype = first.shape, first.device, first.dtype
    cuda = device.type == "cuda"
    vocab = shape.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed + batch * 7919 + context)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    plan = SharingPlan.for_region(shape.num_layers, region)
    caches = {name: KVCache(plan, batch, context + new_tokens + 1, shape.num_kv_heads, shape.head_dim, dtype, device)
              for name in models}
    runners = {(name, mode): DecodeRunner(m, caches[name], cuda_graphs=mode == "graphs", bucket=bucket)
               for name, m in models.items() for mode in modes}
    samples = {name: {"prefill": [], **{mode: [] for mode in modes}} for name in models}

    def run(name: str, record: bool) -> None:
        for mode in modes:
            with Timer(cuda) as t:
                logits = models[name].prefill(prompt, plan, caches[name])
            if record:
                samples[name]["prefill"].append(t.seconds)
            nxt = logits[:, :vocab].argmax(dim=-1)
            with Timer(cuda) as t:
                decode(runners[name, mode], nxt, new_tokens, vocab)
            if record:
                samples[name][mode].append(t.seconds)

    names = list(models)
    with torch.inference_mode():
        for name in names:  # warm-up: kernels (Triton compilation), cuBLAS heuristics, graph capture
            run(name, record=False)
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                run(name, record=True)
    out = {}
    for name in names:
        out[name] = {"prefill_tokens_per_s": batch * context / statistics.median(samples[name]["prefill"])}
        for mode in modes:
            out[name][f"decode_{mode}_tokens_per_s"] = batch * new_tokens / statistics.median(samples[name][mode])
    del runners, caches
    if cuda:
        torch.cuda.empty_cache()
    return out


def greedy_agreement(model: InferenceModel, batch: int, context: int, region: int, steps: int,
                     seed: int = 0) -> dict:
    """Greedy decoding of `model` with its sparse FFN decode against its dense-math reference
    (``sparse_decode=False``: prefill's FFN math at every step), from the same prompt: the fraction of
    equal tokens, the first step where they differ (None: never), and the first decode step's logits
    difference relative to the logits' spread. Eager steps over exactly the filled slots."""
    shape, device, dtype = model.shape, model.device, model.dtype
    vocab = shape.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(seed + batch * 7919 + context)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    plan = SharingPlan.for_region(shape.num_layers, region)
    tokens, first_logits = {}, {}
    saved = model.sparse_decode
    try:
        with torch.inference_mode():
            for sparse in (True, False):
                model.sparse_decode = sparse
                cache = KVCache(plan, batch, context + steps + 1, shape.num_kv_heads, shape.head_dim, dtype, device)
                runner = DecodeRunner(model, cache, cuda_graphs=False)
                cache.tokens.copy_(model.prefill(prompt, plan, cache)[:, :vocab].argmax(dim=-1))
                out = []
                for i in range(steps):
                    logits = runner.step()[:, :vocab].float()
                    if i == 0:
                        first_logits[sparse] = logits.clone()
                    cache.tokens.copy_(logits.argmax(dim=-1))
                    out.append(cache.tokens.clone())
                    cache.advance()
                tokens[sparse] = torch.stack(out, dim=1).cpu()
    finally:
        model.sparse_decode = saved
    equal = tokens[True] == tokens[False]
    differing = (~equal).any(dim=0).nonzero()
    return {"greedy_steps": steps,
            "greedy_equal_fraction": equal.float().mean().item(),
            "greedy_identical": bool(equal.all()),
            "greedy_first_divergence": int(differing[0]) if len(differing) else None,
            "first_step_logits_max_abs_diff": (first_logits[True] - first_logits[False]).abs().max().item(),
            "first_step_logits_std": first_logits[False].std().item()}


def decode_kernel_profile(models: dict[str, InferenceModel], batch: int, context: int, region: int,
                          steps: int, top: int = 12) -> dict[str, dict]:
    """GPU time per decode step by kernel (torch.profiler over `steps` eager steps) of each model:
    {name: {"step_ms": GPU ms per step, "kernels": [{"name", "ms_per_step", "calls_per_step"}, ...]}}."""
    from torch.profiler import ProfilerActivity, profile

    first = next(iter(models.values()))
    shape, device, dtype = first.shape, first.device, first.dtype
    vocab = shape.vocab_size
    prompt = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(1)).to(device)
    plan = SharingPlan.for_region(shape.num_layers, region)
    out = {}
    with torch.inference_mode():
        for name, model in models.items():
            cache = KVCache(plan, batch, context + 2 * steps + 1, shape.num_kv_heads, shape.head_dim, dtype, device)
            runner = DecodeRunner(model, cache, cuda_graphs=False)
            first_token = model.prefill(prompt, plan, cache)[:, :vocab].argmax(dim=-1)
            decode(runner, first_token, steps, vocab)  # warm-up (Triton compilation)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decode(runner, cache.tokens.clone(), steps, vocab)
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages()
                       if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
            total = sum(e.device_time_total for e in kernels) / 1e3 / steps
            kernels.sort(key=lambda e: -e.device_time_total)
            out[name] = {"step_ms": total, "kernels": [
                {"name": e.key[:120], "ms_per_step": e.device_time_total / 1e3 / steps,
                 "calls_per_step": e.count / steps} for e in kernels[:top]]}
    return out


def run_ffn_kinds(args, kinds: list[str], shape: ModelShape, ffn: int, device, dtype, batches, contexts, regions,
                  new_tokens: int, rounds: int, modes: list[str], write_json) -> list[dict]:
    cuda = device.type == "cuda"
    kernel = "triton" if cuda and HAVE_TRITON else "torch-reference"
    profile_batches = [int(b) for b in args.profile_batches.split(",") if b] if args.profile_batches else []
    rows: list[dict] = []
    for kind in kinds:
        width = int(round(args.elas_expand * ffn)) if kind in ("elas", "relu2") else ffn
        options = ffn_options(kind, width, args)
        sparse = InferenceModel.random(shape, width, seed=0, device=device, dtype=dtype, ffn_kind=kind,
                                       ffn_options=options).eval()
        for layer in sparse.layers:
            layer.ffn.select_method = args.select_method
        dense = with_dense_ffns(sparse)
        ffn0 = sparse.layers[0].ffn
        for batch in batches:
            for context in contexts:
                for region in regions:
                    row = {"ffn_kind": kind, "dense_kind": dense.layers[0].ffn.kind, "batch": batch,
                           "context": context, "region": region, "new_tokens": new_tokens, "ffn_width": width,
                           "k": getattr(ffn0, "k", None), "sparse_decode": bool(ffn0.sparse), "kernel": kernel,
                           "select_method": args.select_method,
                           **{key: value for key, value in options.items() if key != "k"}}
                    # Channels a token keeps at most (top-k: k; MoC: K; ELAS: half; relu2: data-dependent).
                    row["active_channels"] = {"topk": row["k"], "moc": row["k"], "elas": width // 2}.get(kind)
                    try:
                        point = bench_ffn_point({"sparse": sparse, "dense": dense}, batch, context, region,
                                                new_tokens, rounds, modes, args.bucket)
                    except torch.cuda.OutOfMemoryError as e:
                        row["error"] = f"out of memory: {str(e)[:120]}"
                        torch.cuda.empty_cache()
                        rows.append(row)
                        continue
                    row.update(point["sparse"])
                    row.update({f"dense_{key}": value for key, value in point["dense"].items()})
                    for mode in modes:
                        key = f"decode_{mode}_tokens_per_s"
                        row[f"decode_{mode}_vs_dense"] = row[key] / row[f"dense_{key}"]
                    if args.check_greedy:
                        row.update(greedy_agreement(sparse, batch, context, region, args.check_greedy))
                    if cuda and batch in profile_batches and region == regions[0]:
                        try:  # a profiler failure must not cost the measured table
                            row["profile"] = decode_kernel_profile({"sparse": sparse, "dense": dense}, batch,
                                                                   context, region, steps=8)
                        except Exception as e:  # noqa: BLE001
                            row["profile_error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
                    write_json(rows)
                    print(f"  done {kind}, batch {batch}, context {context}, region {region}", flush=True)
        del sparse, dense
        if cuda:
            torch.cuda.empty_cache()
    for row in rows:  # against the SwiGLU model of the same shape too, where it was measured
        base = next((r for r in rows if r["ffn_kind"] == "swiglu" and "error" not in r and "error" not in row
                     and (r["batch"], r["context"], r["region"]) == (row["batch"], row["context"], row["region"])),
                    None)
        if base is not None:
            for mode in modes:
                key = f"decode_{mode}_tokens_per_s"
                row[f"decode_{mode}_vs_swiglu"] = row[key] / base[key]
    write_json(rows)
    return rows


def print_ffn_table(rows: list[dict], modes: list[str]) -> None:
    head = ["kind", "batch", "ctx", "region", "dense"]
    for mode in modes:
        head += [f"decode {mode} tok/s", "dense tok/s", "x dense"]
    if any("greedy_equal_fraction" in r for r in rows):
        head.append("greedy = dense math")
    lines = [head]
    for r in rows:
        line = [r["ffn_kind"], str(r["batch"]), str(r["context"]), str(r["region"]), r["dense_kind"]]
        if "error" in r:
            lines.append(line + [r["error"]])
            continue
        for mode in modes:
            line += [f"{r[f'decode_{mode}_tokens_per_s']:,.1f}", f"{r[f'dense_decode_{mode}_tokens_per_s']:,.1f}",
                     f"{r[f'decode_{mode}_vs_dense']:.3f}"]
        if "greedy_equal_fraction" in r:
            line.append(f"{r['greedy_equal_fraction']:.3f}")
        lines.append(line)
    widths = [max(len(l[i]) for l in lines if i < len(l)) for i in range(len(head))]
    for l in lines:
        print("  ".join(c.rjust(w) for c, w in zip(l, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, small sizes (seconds)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 512,2048)")
    p.add_argument("--regions", default=None, help="comma-separated EPAS regions (default 0,8,12; 0 always runs)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps per measurement (default 128)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 3)")
    p.add_argument("--bucket", type=int, default=128, help="CUDA-graph attention length bucket (cache slots)")
    p.add_argument("--no-graphs", action="store_true", help="GPU: skip the CUDA-graph decode measurement")
    p.add_argument("--no-eager", action="store_true", help="GPU: skip the eager decode measurement")
    p.add_argument("--attention", default="matmul,sdpa",
                   help="decode attention kinds of non-reused layers to measure (default matmul,sdpa)")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--ffn-kinds", default=None,
                   help=f"comma-separated FFN kinds ({','.join(FFN_KINDS)}): sparse decode of each against the "
                        "dense model of the same shape (see above); default: the EPAS region benchmark")
    p.add_argument("--topk-k", type=float, default=0.1, help="top-k's k: a count or a fraction of the width")
    p.add_argument("--topk-activation", choices=("relu", "relu2"), default="relu")
    p.add_argument("--moc-k", type=float, default=0.1875, help="MoC's K: a count or a fraction of the width")
    p.add_argument("--moc-structured", action="store_true", help="MoC 2:8 (top 2 of every 8 channels)")
    p.add_argument("--select-method", choices=("bisect", "radix"), default="bisect",
                   help="top-K search of MoC / top-k decode steps (ffn.select_method)")
    p.add_argument("--elas-rank", type=int, default=None, help="low-rank ELAS fc1/fc2 of this rank")
    p.add_argument("--check-greedy", type=int, default=0, metavar="STEPS",
                   help="--ffn-kinds: also decode STEPS greedy tokens with the sparse FFN path and with its "
                        "dense-math reference and report whether they are equal")
    p.add_argument("--profile-batches", default="",
                   help="--ffn-kinds on GPU: comma-separated batch sizes to profile (GPU ms per decode step by "
                        "kernel, sparse and dense model, first region)")
    p.add_argument("--elas-expand", type=float, default=1.5, help="width of elas/relu2 FFNs over the shape's ffn")
    args = p.parse_args(argv)
    ffn_kinds = [k for k in (args.ffn_kinds or "").split(",") if k]
    if set(ffn_kinds) - set(FFN_KINDS):
        p.error(f"--ffn-kinds {args.ffn_kinds!r}: valid kinds are {', '.join(FFN_KINDS)}")

    tiny = args.tiny
    device = torch.device(args.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shape_name = args.shape or ("tiny" if tiny else "llama-1b")
    layers, hidden, heads, kv_heads, ffn, vocab = SHAPES[shape_name]

    def ints(text, default):
        return [int(x) for x in text.split(",")] if text else default

    batches = ints(args.batches, [1, 2] if tiny else [1, 8, 32])
    if ffn_kinds:
        contexts = ints(args.contexts, [16] if tiny else [512])
        regions = ints(args.regions, [0])
    else:
        contexts = ints(args.contexts, [16, 32] if tiny else [512, 2048])
        regions = sorted(set(ints(args.regions, [0, 2, 3] if tiny else [0, 8, 12])) | {0})
    new_tokens = args.new_tokens or (8 if tiny else 128)
    rounds = args.rounds or (1 if tiny else 3)
    bad = [r for r in regions if not 0 <= r < layers]
    if bad:
        p.error(f"--regions {bad}: a {layers}-layer model shares at most {layers - 1} layers")
    kinds = [k for k in args.attention.split(",") if k]
    if not kinds or set(kinds) - {"matmul", "sdpa"}:
        p.error(f"--attention {args.attention!r}: a comma-separated subset of matmul,sdpa")
    variants = [(str(r) if kind == "matmul" else f"{r}-sdpa", r, kind) for kind in kinds for r in regions]

    shape = ModelShape(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                       vocab_size=vocab, padded_vocab_size=-(-vocab // 128) * 128,
                       max_positions=max(contexts) + max(new_tokens, args.check_greedy) + 1)
    cuda = device.type == "cuda"
    modes = (["graphs"] if cuda and not args.no_graphs else []) + (["eager"] if not cuda or not args.no_eager else [])
    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    if ffn_kinds:
        print(f"{shape_name}: {layers} layers, hidden {hidden}, {heads} heads ({kv_heads} kv), ffn {ffn}, vocab "
              f"{vocab}; {where}, {str(dtype).replace('torch.', '')}; FFN kinds {', '.join(ffn_kinds)} against the "
              f"dense model of the same shape; {new_tokens} decode steps after each prompt, {rounds} rounds, medians",
              flush=True)

        def write_ffn_json(rows: list[dict]) -> None:
            if not args.json:
                return
            out = {"mode": "ffn_kinds", "ffn_kinds": ffn_kinds, "shape": shape_name, "layers": layers,
                   "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "ffn": ffn, "vocab": vocab,
                   "device": where, "dtype": str(dtype).replace("torch.", ""), "new_tokens": new_tokens,
                   "rounds": rounds, "bucket": args.bucket, "torch": torch.__version__,
                   "command": " ".join(["python", "tools/bench_decode.py", *(argv if argv is not None else sys.argv[1:])]),
                   "date": time.strftime("%Y-%m-%d", time.gmtime()), "results": rows}
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))

        rows = run_ffn_kinds(args, ffn_kinds, shape, ffn, device, dtype, batches, contexts, regions, new_tokens,
                             rounds, modes, write_ffn_json)
        print_ffn_table(rows, modes)
        if args.json:
            print(f"wrote {args.json}")
        return 0
    model = InferenceModel.random(shape, ffn, seed=0, device=device, dtype=dtype).eval()
    print(f"{shape_name}: {layers} layers, hidden {hidden}, {heads} heads ({kv_heads} kv), ffn {ffn}, vocab {vocab}; "
          f"{where}, {str(dtype).replace('torch.', '')}; {new_tokens} decode steps after each prompt, "
          f"{rounds} rounds, medians", flush=True)

    def write_json() -> None:
        """After every point, so that a run stopped by a time limit keeps what it measured."""
        if not args.json:
            return
        out = {"shape": shape_name, "layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
               "ffn": ffn, "vocab": vocab, "device": where, "dtype": str(dtype).replace("torch.", ""),
               "new_tokens": new_tokens, "rounds": rounds, "bucket": args.bucket, "torch": torch.__version__,
               "results": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))

    rows = []
    for batch in batches:
        for context in contexts:
            try:
                point = bench_point(model, ffn, batch, context, variants, new_tokens, rounds,
                                    graphs="graphs" in modes, eager="eager" in modes, bucket=args.bucket)
            except torch.cuda.OutOfMemoryError as e:  # keep the rest of the table
                point = [{"batch": batch, "context": context, "error": f"out of memory: {str(e)[:120]}"}]
                torch.cuda.empty_cache()
            rows += point
            write_json()
            print(f"  done batch {batch}, context {context}", flush=True)
            print_table(point, modes)
    print_table(rows, modes)
    print_goal(rows, modes, max(regions))
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
