#!/usr/bin/env python
"""Sparse FFN blocks against their dense baselines: forward+backward time and saved activations.

    python tools/bench_ffn.py --json ffn.json        # llama-350m and llama-1b FFN shapes, 16k and 64k tokens, bf16, GPU
    python tools/bench_ffn.py --tiny                  # CPU smoke test (tiny shapes, fp32), seconds
    python tools/bench_ffn.py --sparse24-table configs/kernel_tables/sparse24-h100.json   # GPU: ELAS's fc2 table
    python tools/bench_ffn.py --sparse24-from-blocks docs/results/bench_ffn_h100.json \
        --sparse24-table configs/kernel_tables/sparse24-h100.json                        # the same from a block run

The table says, per GPU and fc2 shape, whether ELAS's fc2 forward runs as a 2:4 sparse GEMM through cuSPARSELt
(effdist.model.ffn.sparse_gemm_table, read by ffn.elas_sparse_kernels at run time): `--sparse24-table` times the
dense GEMM against compress + cuSPARSELt at the ELAS fc2 shape of each --shapes preset and --tokens count;
`--sparse24-from-blocks` converts the elas / elas-cslt pairs of a block benchmark's JSON instead.

One FFN block (the module that sits in a decoder layer's mlp slot, TP = 1) per variant, on input
[tokens, 1, hidden]. For each: the median time of forward + backward (weights' and input's
gradients) over --reps runs after --warmup, the bytes the block keeps for backward (unique storages
reached by saved-tensor hooks, parameters excluded: its input x is counted, as every variant saves
it), and on GPU the peak memory allocated during forward + backward above what was allocated before.
Ratios are against the variant's dense baseline: SwiGLU for MoC and top-k, ReLU² at the ELAS width
(1.5 x ffn) for ELAS, low-rank ReLU² for low-rank ELAS. A variant that fails (out of memory, a
kernel that does not compile, ...) is reported with its error and the table goes on.
A second table times the Triton kernels against their torch references on the same shapes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (hidden, heads, ffn_hidden_size, low rank used by ELAS at that size)
    "llama-350m": (1024, 16, 2816, 256),
    "llama-1b": (2048, 32, 5632, 512),
    "tiny": (64, 4, 176, 16),
}
MOC_K = 0.1875  # K = d_model/2-ish, the MoC presets
TOPK_K = 0.1
ELAS_EXPAND = 1.5


@dataclass
class Variant:
    name: str
    baseline: str | None
    what: str
    build: Callable  # (shape) -> ModuleSpec
    cuda_only: bool = False


def init_megatron(cuda: bool, seed: int = 1234) -> None:
    """One process, world size 1, TP = PP = 1, for the rest of this process (nccl on GPU, gloo + the CPU
    compatibility layer on CPU)."""
    from effdist.runtime.distributed import one_process_megatron

    _WORLD.enter_context(one_process_megatron(cuda, seed))


_WORLD = contextlib.ExitStack()
# Tear the world down while the interpreter is still whole (not from a half-collected generator).
atexit.register(_WORLD.close)


def variants() -> list[Variant]:
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from effdist.config import resolve_count
    from effdist.model.ffn.channel import MixtureOfChannelsMLP, TopKMLP
    from effdist.model.ffn.dense import ReLU2MLP
    from effdist.model.ffn.elas import ElasMLP
    from effdist.model.ffn.registry import elas_linears

    plain = elas_linears(None)

    def elas_width(shape):
        return int(round(ELAS_EXPAND * SHAPES[shape][2]))

    def swiglu(shape):
        return ModuleSpec(MLP, params={"ffn_hidden_size": SHAPES[shape][2]}, submodules=MLPSubmodules(
            linear_fc1=plain.linear_fc1, linear_fc2=plain.linear_fc2))

    def moc(structured):
        def build(shape):
            f = SHAPES[shape][2]
            return ModuleSpec(MixtureOfChannelsMLP, submodules=plain, params={
                "ffn_hidden_size": f, "k": resolve_count(MOC_K, f), "structured": structured})
        return build

    def topk(shape):
        f = SHAPES[shape][2]
        return ModuleSpec(TopKMLP, submodules=plain, params={"ffn_hidden_size": f, "k": resolve_count(TOPK_K, f),
                                                             "activation": "relu"})

    def relu2(low_rank):
        def build(shape):
            subs = elas_linears(SHAPES[shape][3] if low_rank else None)
            return ModuleSpec(ReLU2MLP, submodules=subs, params={"ffn_hidden_size": elas_width(shape)})
        return build

    def elas(ste, sparse_gemm, low_rank=False):
        def build(shape):
            subs = elas_linears(SHAPES[shape][3] if low_rank else None)
            return ModuleSpec(ElasMLP, submodules=subs, params={
                "ffn_hidden_size": elas_width(shape), "ste": ste, "sparse_gemm": sparse_gemm})
        return build

    return [
        Variant("swiglu", None, "megatron SwiGLU, width f", swiglu),
        Variant("moc", "swiglu", f"MoC, top-K gate channels, K = {MOC_K} f", moc(False)),
        Variant("moc-2:8", "swiglu", "MoC, top 2 of every 8 gate channels", moc(True)),
        Variant("topk-relu", "swiglu", f"non-gated ReLU keeping the top {TOPK_K:.0%} (width f)", topk),
        Variant("relu2", None, f"non-gated ReLU², width {ELAS_EXPAND} f (ELAS dense reference)", relu2(False)),
        Variant("elas", "relu2", "2:4 ReLU², identity STE (saves h), dense GEMMs", elas("identity", "never")),
        Variant("elas-masked", "relu2", "2:4 ReLU², masked STE (saves 2:4-compressed relu(h)), dense GEMMs",
                elas("masked", "never")),
        Variant("elas-cslt", "relu2", "as elas, fc2 forward on cuSPARSELt", elas("identity", "always"), cuda_only=True),
        Variant("elas-masked-cslt", "relu2", "as elas-masked, fc2 forward on cuSPARSELt", elas("masked", "always"),
                cuda_only=True),
        Variant("relu2-lowrank", None, "ReLU² width 1.5 f, fc1/fc2 low-rank (r = h/4)", relu2(True)),
        Variant("elas-lowrank", "relu2-lowrank", "2:4 ReLU², identity STE, low-rank fc1/fc2", elas("identity", "never", True)),
    ]


def transformer_config(shape: str, dtype: torch.dtype, device: torch.device):
    from effdist.config import load_config
    from effdist.model.gpt import transformer_config as make

    hidden, heads, ffn, _ = SHAPES[shape]
    cfg = load_config(None, [f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
                             f"model.num_query_groups={heads}", f"model.ffn_hidden_size={ffn}", "model.num_layers=1"])
    return make(cfg.model, cfg.parallel, cfg.ffn, dtype, device, num_layers=1)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = module(x)
    del out
    return sum(storages.values())


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def fwd_bwd_ms(module, x, dout, reps: int, warmup: int, cuda: bool) -> float:
    times = []
    for i in range(warmup + reps):
        _sync(cuda)
        t0 = time.perf_counter()
        out, _ = module(x)
        out.backward(dout)
        _sync(cuda)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        module.zero_grad(set_to_none=True)
        x.grad = None
    return statistics.median(times)


def peak_mib(module, x, dout, cuda: bool) -> float | None:
    if not cuda:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out, _ = module(x)
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    module.zero_grad(set_to_none=True)
    x.grad = None
    return peak / 2**20


def bench_variant(v: Variant, shape: str, tokens: int, tcfg, dtype, device, reps, warmup) -> dict:
    from megatron.core.transformer.spec_utils import build_module

    cuda = device.type == "cuda"
    row = {"shape": shape, "tokens": tokens, "variant": v.name, "baseline": v.baseline, "what": v.what}
    if v.cuda_only and not cuda:
        row["skipped"] = "needs CUDA (cuSPARSELt)"
        return row
    module = None
    try:
        torch.manual_seed(0)
        module = build_module(v.build(shape), config=tcfg).to(device)
        hidden = SHAPES[shape][0]
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(tokens, 1, hidden, device=device, dtype=dtype, generator=g).requires_grad_(True)
        dout = torch.randn(tokens, 1, hidden, device=device, dtype=dtype, generator=g)
        row["saved_bytes"] = saved_bytes(module, x)
        row["saved_bytes_per_token"] = row["saved_bytes"] / tokens
        row["ms"] = fwd_bwd_ms(module, x, dout, reps, warmup, cuda)
        row["tokens_per_s"] = tokens / row["ms"] * 1e3
        row["peak_mib"] = peak_mib(module, x, dout, cuda)
        if hasattr(module, "used_sparse_gemm"):
            row["sparse_gemm_used"] = bool(module.used_sparse_gemm)
    except Exception as e:  # noqa: BLE001 - one failing variant must not abort the table
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        row["traceback"] = traceback.format_exc(limit=4)
    finally:
        del module
        if cuda:
            torch.cuda.empty_cache()
    return row


def median_gpu_ms(fn, reps: int, warmup: int) -> float:
    """Median wall ms of `fn` on the GPU (synchronized before and after each call), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_kernels(shape: str, tokens: int, dtype, device, reps: int, warmup: int) -> list[dict]:
    """Triton kernels against their torch references (on CPU both run the reference: GPU only)."""
    from effdist.config import resolve_count
    from effdist.kernels import channel_select as cs
    from effdist.kernels import nm_select, sparse24
    from effdist.model.ffn.selection import topk_channels

    cuda = device.type == "cuda"
    if not cuda:
        return []
    hidden, _, f, _ = SHAPES[shape]
    w = int(round(ELAS_EXPAND * f))
    rows = []

    h = torch.randn(tokens, w, device=device, dtype=dtype)
    dy = torch.randn(tokens, w, device=device, dtype=dtype)
    gu = torch.randn(tokens, 2 * f, device=device, dtype=dtype)
    k = resolve_count(MOC_K, f)
    gate = gu[:, :f]
    idx = topk_channels(gate, k)
    dz = torch.randn(tokens, f, device=device, dtype=dtype)
    _, a, b = cs.select_activate_reference(gu, idx, f, "swiglu")
    cases = [
        ("relu2+2:4 sparsify, dense+compressed", lambda: sparse24.sparsify24_triton(h, relu2=True),
         lambda: sparse24.sparsify24_reference(h, relu2=True)),
        ("MoC gather+SwiGLU+scatter", lambda: cs.select_activate_triton(gu, idx, f, "swiglu"),
         lambda: cs.select_activate_reference(gu, idx, f, "swiglu")),
        ("MoC backward gather+scatter", lambda: cs.select_activate_backward_triton(dz, a, b, idx, f, "swiglu"),
         lambda: cs.select_activate_backward_reference(dz, a, b, idx, f, "swiglu")),
        ("relu2 backward 2·relu(h)·dy", lambda: sparse24.relu2_grad_triton(dy, h),
         lambda: sparse24.relu2_grad_reference(dy, h)),
        ("MoC top-K selection (torch.topk)", lambda: topk_channels(gate, k), None),
        ("MoC 2:8 selection (argmax x2 | torch.topk)", lambda: nm_select.top_n_of_m_triton(gate, 2, 8, torch.int16),
         lambda: torch.topk(gate.reshape(tokens, -1, 8), 2, dim=-1, sorted=False)),
    ]
    try:
        packed = torch._cslt_compress(sparse24.sparsify24_triton(h, relu2=True, write_compressed=False)[0])
        cases.append(("cuSPARSELt compress (torch._cslt_compress)", lambda: torch._cslt_compress(h), None))
        del packed
    except Exception:  # noqa: BLE001 - cuSPARSELt missing: just no row
        pass
    for name, triton_fn, ref_fn in cases:
        row = {"shape": shape, "tokens": tokens, "kernel": name}
        try:
            row["triton_ms"] = median_gpu_ms(triton_fn, reps, warmup)
            row["torch_ms"] = median_gpu_ms(ref_fn, reps, warmup) if ref_fn is not None else None
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        rows.append(row)
    return rows


def fc2_shape(shape: str) -> tuple[int, int]:
    """ELAS fc2's weight as (in_features, out_features) at a SHAPES preset (full rank, TP = 1)."""
    hidden, _, f, _ = SHAPES[shape]
    return int(round(ELAS_EXPAND * f)), hidden


def sparse24_entries(shapes, token_counts, dtype, dtype_name: str, device, reps: int, warmup: int) -> list:
    """The fc2 forward GEMM of ELAS at each shape and token count: y @ W.T (y 2:4-sparse, as ELAS's fc2 input)
    against compress + cuSPARSELt, median ms (`median_gpu_ms`, as the kernel table)."""
    from effdist.kernels.sparse24 import sparsify24
    from effdist.model.ffn.elas import _cslt_matmul
    from effdist.model.ffn.sparse_gemm_table import Entry

    entries = []
    for shape in shapes:
        in_features, out_features = fc2_shape(shape)
        weight = torch.randn(out_features, in_features, device=device, dtype=dtype) * 0.02
        for tokens in token_counts:
            h = torch.randn(tokens, in_features, device=device, dtype=dtype)
            y = sparsify24(h, relu2=True, write_dense=True, write_compressed=False)[0]
            with torch.no_grad():
                dense_ms = median_gpu_ms(lambda: y @ weight.t(), reps, warmup)
                sparse_ms = median_gpu_ms(lambda: _cslt_matmul(y, weight), reps, warmup)
            entries.append(Entry(tokens, in_features, out_features, dtype_name, dense_ms, sparse_ms, "gemm"))
            print(f"{shape:<11} {tokens:>6} fc2 [{out_features}, {in_features}]: dense {dense_ms:.3f} ms, "
                  f"compress + cuSPARSELt {sparse_ms:.3f} ms -> {'sparse' if sparse_ms < dense_ms else 'dense'}")
    return entries


def write_sparse24_table(table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    verdicts = ", ".join(f"{e.tokens}x[{e.out_features},{e.in_features}] {'sparse' if e.sparse_pays else 'dense'}"
                         for e in table.entries)
    print(f"sparse24 table for {table.device} -> {path}: {verdicts}")


def add_ratios(rows: list[dict]) -> None:
    index = {(r["shape"], r["tokens"], r["variant"]): r for r in rows}
    for r in rows:
        base = index.get((r["shape"], r["tokens"], r["baseline"])) if r["baseline"] else None
        if base and "ms" in base and "ms" in r:
            r["time_vs_baseline"] = r["ms"] / base["ms"]
            r["bytes_vs_baseline"] = r["saved_bytes"] / base["saved_bytes"]


def print_tables(rows: list[dict], kernel_rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'shape':<11} {'tokens':>6} {'variant':<17} {'ms':>9} {'x base':>7} {'saved MiB':>10} {'x base':>7} "
          f"{'B/token':>8} {'peak MiB':>9}  note")
    for r in rows:
        if "ms" not in r:
            note = r.get("error") or r.get("skipped", "")
            print(f"{r['shape']:<11} {r['tokens']:>6} {r['variant']:<17} {'-':>9} {'':>7} {'':>10} {'':>7} {'':>8} {'':>9}  {note}")
            continue
        tb = f"{r['time_vs_baseline']:.2f}" if "time_vs_baseline" in r else ""
        bb = f"{r['bytes_vs_baseline']:.3f}" if "bytes_vs_baseline" in r else ""
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-"
        note = "cuSPARSELt used" if r.get("sparse_gemm_used") else ""
        print(f"{r['shape']:<11} {r['tokens']:>6} {r['variant']:<17} {r['ms']:>9.3f} {tb:>7} "
              f"{r['saved_bytes'] / 2**20:>10.1f} {bb:>7} {r['saved_bytes_per_token']:>8.0f} {peak:>9}  {note}")
    if kernel_rows:
        print("\nkernels (Triton vs torch reference)")
        print(f"{'shape':<11} {'tokens':>6} {'kernel':<44} {'triton ms':>9} {'torch ms':>9}")
        for r in kernel_rows:
            if "error" in r:
                print(f"{r['shape']:<11} {r['tokens']:>6} {r['kernel']:<44} {r['error']}")
                continue
            ref = f"{r['torch_ms']:.3f}" if r.get("torch_ms") is not None else "-"
            print(f"{r['shape']:<11} {r['tokens']:>6} {r['kernel']:<44} {r['triton_ms']:>9.3f} {ref:>9}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU-sized smoke test: tiny shape, 256 tokens, fp32")
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES), help="default: llama-350m llama-1b")
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="tokens per block call (default: 16384 65536)")
    p.add_argument("--variants", nargs="+", default=None, help="subset of variant names (baselines are added)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    p.add_argument("--json", type=Path, default=None, help="write all rows to this JSON file")
    p.add_argument("--sparse24-table", type=Path, default=None, metavar="OUT",
                   help="write ELAS's fc2 sparse-vs-dense table (GPU: time the GEMMs; or --sparse24-from-blocks)")
    p.add_argument("--sparse24-from-blocks", type=Path, default=None, metavar="JSON",
                   help="with --sparse24-table: build it from a block run's --json (elas vs elas-cslt rows)")
    args = p.parse_args(argv)
    command = "python tools/bench_ffn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.sparse24_from_blocks or args.sparse24_table:
        return sparse24_table_main(p, args, command)

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    shapes = args.shapes or (["tiny"] if args.tiny else ["llama-350m", "llama-1b"])
    token_counts = args.tokens or ([256] if args.tiny else [16384, 65536])
    reps = args.reps or (2 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]

    init_megatron(cuda)
    all_variants = variants()
    if args.variants:
        unknown = set(args.variants) - {v.name for v in all_variants}
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; valid: {', '.join(v.name for v in all_variants)}")
        wanted = set(args.variants)
        wanted |= {v.baseline for v in all_variants if v.name in wanted and v.baseline}
        all_variants = [v for v in all_variants if v.name in wanted]

    rows, kernel_rows = [], []
    started = time.perf_counter()
    for shape in shapes:
        tcfg = transformer_config(shape, dtype, device)
        for tokens in token_counts:
            for v in all_variants:
                rows.append(bench_variant(v, shape, tokens, tcfg, dtype, device, reps, warmup))
            if not args.no_kernels:
                kernel_rows += bench_kernels(shape, tokens, dtype, device, reps, warmup)
    add_ratios(rows)
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    header = (f"FFN block forward+backward, TP=1, {dtype_name}, {device_name}, torch {torch.__version__}, "
              f"median of {reps} after {warmup} warm-up ({time.perf_counter() - started:.0f} s)")
    print_tables(rows, kernel_rows, header)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": device_name, "dtype": dtype_name, "torch": torch.__version__,
                                         "reps": reps, "warmup": warmup, "results": rows, "kernels": kernel_rows},
                                        indent=1))
    failed = [r for r in rows if "error" in r]
    return 1 if failed and len(failed) == len(rows) else 0


def sparse24_table_main(p: argparse.ArgumentParser, args, command: str) -> int:
    from datetime import date

    from effdist.model.ffn.sparse_gemm_table import Table, TableError, table_from_block_rows

    if args.sparse24_table is None:
        p.error("--sparse24-from-blocks needs --sparse24-table OUT (where the table goes)")
    if args.sparse24_from_blocks:
        try:
            blocks = json.loads(args.sparse24_from_blocks.read_text())
            table = table_from_block_rows(
                blocks["results"], blocks["device"], blocks["dtype"], {s: fc2_shape(s) for s in SHAPES},
                {"torch": blocks.get("torch", "?"), "date": blocks.get("date", "?"), "command": command,
                 "source": f"{args.sparse24_from_blocks} ({blocks.get('command', 'block benchmark')}): forward + "
                           "backward of the ELAS block with fc2 dense (elas, elas-masked) and with cuSPARSELt "
                           "forced (-cslt); the pair with the smaller sparse gain per shape"})
        except (OSError, ValueError, KeyError, TableError) as e:
            p.error(f"--sparse24-from-blocks {args.sparse24_from_blocks}: {e}")
        write_sparse24_table(table, args.sparse24_table)
        return 0
    if not torch.cuda.is_available() or not hasattr(torch, "_cslt_sparse_mm"):
        p.error("--sparse24-table times cuSPARSELt GEMMs: it needs a CUDA GPU and a torch with torch._cslt_sparse_mm "
                "(or give --sparse24-from-blocks JSON)")
    dtype_name = args.dtype or "bf16"
    if dtype_name == "fp32":
        p.error("--dtype fp32: cuSPARSELt's 2:4 GEMM takes bf16 or fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = torch.device("cuda", 0)
    shapes = args.shapes or ["llama-350m", "llama-1b"]
    entries = sparse24_entries(shapes, args.tokens or [16384, 32768, 65536], dtype, dtype_name, device,
                               args.reps or 10, args.warmup if args.warmup is not None else 3)
    meta = {"torch": torch.__version__, "date": date.today().isoformat(), "command": command,
            "source": "fc2 forward GEMM alone: y @ W.T against torch._cslt_compress + torch._cslt_sparse_mm"}
    write_sparse24_table(Table(torch.cuda.get_device_name(0), tuple(entries), None, tuple(meta.items())),
                         args.sparse24_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
