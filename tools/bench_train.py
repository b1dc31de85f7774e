#!/usr/bin/env python
"""Training throughput of effdist's dense LLaMA presets: the full step (forward, backward, gradient
reduction, clip, AdamW) on random tokens, against the bf16 matmul ceiling measured in the same run.

    python tools/bench_train.py --models llama-125m,llama-350m,llama-1b --steps 10 --json out.json
    python tools/bench_train.py --tiny            # CPU smoke test
    torchrun --nproc_per_node 2 tools/bench_train.py --models llama-1b --set parallel.tp=2   # several GPUs

Prints a table (tokens/s, model TFLOP/s, fraction of the in-run ceiling, peak memory) and writes JSON. With a
train.precision=fp8 variant it also measures the e4m3 matmul ceiling (fraction_of_fp8_ceiling per FP8 run):

    python tools/bench_train.py --models llama-1b --micro-batch llama-1b=8 --accum 2 \
        --variant bf16= --variant fp8=train.precision=fp8 --variant fp8_rowwise="train.precision=fp8;train.fp8_recipe=rowwise"
On a noisy machine, pair every variant with a baseline of the same round (one fresh process per run):

    python tools/bench_train.py --isolate --rounds 3 --models llama-350m --micro-batch llama-350m=8 \
        --variant swiglu= --variant moc=ffn.kind=moc      # `summary`: median tokens/s and median per-round ratio
Model FLOPs per token = 6 x non-embedding matmul parameters + 6 x L x h x S (causal attention
counted once) + the LM head, as in effdist.train.metrics.model_flops_per_token: ``tflops`` counts the dense
model, ``tflops_executed`` what the matmuls execute (EPAS sharing layers skip Q/K, low-rank FFNs multiply
by their factors: effdist.train.flops), the same fields the trainer writes to metrics.jsonl. Against
hardware: ``fraction_of_ceiling`` (executed TFLOP/s over the bf16 matmul ceiling measured in the run) and,
beside it, ``mfu_datasheet`` (over the datasheet dense bf16 peak, 989 on H100 SXM and H200); FP8 runs add
``fraction_of_fp8_ceiling`` and ``mfu_datasheet_fp8`` (over the dense FP8 peak, 1979 on H100 SXM and H200).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def matmul_ceiling_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """bf16 n^3 matmul rate on random data (the ceiling every model TFLOP/s is compared with)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def fp8_matmul_ceiling_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """e4m3 n^3 tensorwise-scaled matmul rate (torch._scaled_mm, bf16 output, fast accumulation: what the FP8
    linears' forward GEMM runs) on random data: the ceiling FP8 variants are compared with."""
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major second operand
    one = torch.ones((), device=device)
    mm = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)  # noqa: E731
    for _ in range(3):
        mm()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        mm()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


class RandomTokens:
    """Microbatches of random tokens in the loader's format (data loading is not what is measured)."""

    def __init__(self, cfg, dp_size: int):
        self.cfg = cfg
        self.per_rank = cfg.train.global_batch // dp_size
        self.gen = torch.Generator().manual_seed(0)

    def state_dict(self):
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["generator"])

    def next_step(self):
        cfg = self.cfg
        mb, s = cfg.train.micro_batch, cfg.data.seq_length
        out = []
        for _ in range(self.per_rank // mb):
            t = torch.randint(0, cfg.model.vocab_size, (mb, s + 1), generator=self.gen)
            out.append({"tokens": t[:, :-1].pin_memory() if torch.cuda.is_available() else t[:, :-1],
                        "labels": t[:, 1:], "loss_mask": torch.ones(mb, s),
                        "position_ids": torch.arange(s).expand(mb, s)})
        return out


# Kernel categories of a profile (first match wins): where an FP8 step's time goes against bf16's.
# Inductor names a fused kernel after the ops in it, so the FP8 casts (triton_poi_fused__scaled_mm__to_copy_...)
# carry "_scaled_mm" although they run no GEMM: compiled kernels are matched first. cuBLAS's Hopper GEMMs are
# nvjet_[sm90_]<a><b>tst...: "tst"/"tss" bf16, a "q" (e4m3) or "r" (e5m2) operand FP8 (qqtst forward, qrtst the
# gradient GEMMs).
KERNEL_CATEGORIES = (
    ("compiled (triton)", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("fp8 gemm", ("e4m3", "e5m2", "f8f8", "fp8", "_scaled_mm", re.compile(r"nvjet_(sm\d+_)?[qr][qr]t"))),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90_")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("communication", ("nccl",)),
    ("copy / fill", ("memcpy", "memset", "copy_kernel", "fill")),
    ("cross entropy", ("cross_entropy", "log_softmax", "nll_loss")),
)


def categorise(kernels: dict[str, dict]) -> dict[str, float]:
    """ms per step by KERNEL_CATEGORIES, "other elementwise" for the rest."""
    out: dict[str, float] = {}
    for name, k in kernels.items():
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES
                    if any(key.search(low) if isinstance(key, re.Pattern) else key in low for key in keys)),
                   "other elementwise")
        out[cat] = out.get(cat, 0.0) + k["ms"]
    return {c: round(ms, 3) for c, ms in sorted(out.items(), key=lambda kv: -kv[1])}


def bench_one(name: str, overrides: list[str], steps: int, warmup: int, profile: int = 0) -> dict:
    from effdist.config import load_config
    from effdist.runtime.distributed import setup, teardown
    from effdist.train.flops import flops_per_token
    from effdist.train.trainer import Trainer

    cfg_path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(cfg_path, overrides)
    trainer = Trainer(cfg, Path("/tmp/effdist-bench") / name, resume="none")
    trainer.runtime = setup(cfg)
    rt = trainer.runtime
    try:
        trainer._build_model()
        trainer._build_features()
        trainer.loader = RandomTokens(cfg, rt.dp)
        if rt.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + steps):
            if rt.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = trainer.train_step()
            trainer.step += 1
            if rt.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        tokens = cfg.train.global_batch * cfg.data.seq_length
        tps = tokens / dt
        # The trainer's own throughput fields (dense and executed TFLOP/s, MFU, dense-equivalent tokens/s).
        throughput = trainer._throughput(tps, out["epas_region"])
        count = flops_per_token(cfg, out["epas_region"], trainer._sparse_fc2_layers())
        peak = torch.cuda.max_memory_allocated() / 2**30 if rt.is_cuda else None
        prof = {}
        if profile:
            sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, also under `effdist bench`
            from bench_epas import kernel_profile

            def one_step():
                trainer.train_step()
                trainer.step += 1

            prof = kernel_profile(one_step, profile)
            prof["categories_ms"] = categorise(prof["kernels"])
            prof["kernels"] = dict(list(prof["kernels"].items())[:40])  # the top 40 by time
        return {"model": name, "overrides": overrides, "micro_batch": cfg.train.micro_batch,
                "global_batch": cfg.train.global_batch, "seq": cfg.data.seq_length, "step_s": dt,
                "tokens_per_s": tps, **throughput, "flops_per_token": count.dense,
                "flops_per_token_executed": count.executed, "peak_mem_gib": peak, "final_loss": out["loss"],
                **({"profile": prof} if prof else {})}
    finally:
        del trainer
        teardown(keep_process_group=int(os.environ.get("WORLD_SIZE", "1")) > 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def hardware_fractions(run: dict, results: dict, fp8: bool) -> dict:
    """Executed TFLOP/s of one run over the ceilings measured in this run and over the datasheet peaks."""
    from effdist.train.metrics import peak_bf16_tflops, peak_fp8_tflops

    executed = run.get("tflops_executed")
    if executed is None:
        return {}
    out = {}
    if "matmul_ceiling_tflops" in results:
        out["fraction_of_ceiling"] = executed / results["matmul_ceiling_tflops"]
    if (peak := peak_bf16_tflops(results["device"])) is not None:
        out["mfu_datasheet"] = executed / peak
    if fp8:
        # Loose: attention, norms, the LM head and the loss stay bf16 in an FP8 run.
        if "fp8_matmul_ceiling_tflops" in results:
            out["fraction_of_fp8_ceiling"] = executed / results["fp8_matmul_ceiling_tflops"]
        if (peak := peak_fp8_tflops(results["device"])) is not None:
            out["mfu_datasheet_fp8"] = executed / peak
    return out


def bench_in_subprocess(name: str, overrides: list[str], steps: int, warmup: int, profile: int = 0) -> dict:
    """bench_one in a fresh interpreter; its result comes back as the last line of its output."""
    code = ("import json, sys; sys.path.insert(0, {root!r}); sys.argv = ['bench_train']; "
            "import bench_train; print('RESULT ' + json.dumps(bench_train.bench_one({name!r}, {ov!r}, {steps}, {warmup}, "
            "{profile})))").format(root=str(Path(__file__).resolve().parent), name=name, ov=overrides, steps=steps,
                                  warmup=warmup, profile=profile)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"subprocess failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-125m,llama-350m,llama-1b")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--micro-batch", default="llama-125m=16,llama-350m=8,llama-1b=4",
                   help="per-model micro batch, name=mbs,...")
    p.add_argument("--accum", type=int, default=2, help="microbatches per optimizer step")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override (all models)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=k=v;k=v: run every model once per variant (e.g. unfused=train.fused_kernels=false); "
                        "ratios are reported against the first variant")
    p.add_argument("--variant-models", default=None,
                   help="models that run every variant (default: all); the others run only the first variant")
    p.add_argument("--isolate", action="store_true",
                   help="run each model/variant in a fresh process (peak memory then cannot include what an earlier "
                        "variant left allocated, e.g. DeepSpeed engines that outlive their run)")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --isolate: run every variant this many times, round by round (ABC ABC ...); each round's "
                        "ratios are against that round's first variant, and `summary` holds each variant's median "
                        "tokens/s and median ratio, so a slow spell of the machine lands on every variant alike")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS more steps (torch.profiler): GPU kernel ms per step by kernel "
                        "(top 40) and by category (GEMM, FP8 GEMM, attention, compiled, optimizer, ...) in the JSON")
    p.add_argument("--profile-variants", default=None,
                   help="comma-separated variant names to profile (default: all, when --profile is given)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny config")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    # Under torchrun every rank runs this; each must own its GPU before the first CUDA allocation (the
    # ceiling's matmul), and only rank 0 reports.
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1 and args.isolate:
        p.error("--isolate starts one process per variant itself; run it without torchrun")
    if args.rounds < 1 or (args.rounds > 1 and not args.isolate):
        p.error(f"--rounds {args.rounds}: give a positive number of rounds, and more than 1 only with --isolate "
                "(each run in a fresh process)")
    if world > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "runs": []}
    if args.tiny:
        models = ["tiny-cpu"]
        mbs = {"tiny-cpu": 4}
    else:
        models = args.models.split(",")
        mbs = dict(kv.split("=") for kv in args.micro_batch.split(","))
    if torch.cuda.is_available():
        results["matmul_ceiling_tflops"] = matmul_ceiling_tflops(torch.device("cuda"))
    variants = [(v.partition("=")[0], [o for o in v.partition("=")[2].split(";") if o]) for v in args.variant]
    variants = variants or [("default", [])]
    if torch.cuda.is_available() and any("train.precision=fp8" in o for _, vo in variants for o in args.overrides + vo):
        try:
            results["fp8_matmul_ceiling_tflops"] = fp8_matmul_ceiling_tflops(torch.device("cuda"))
        except (RuntimeError, TypeError) as e:  # no FP8 on this GPU: the variants will say so themselves
            results["fp8_matmul_ceiling_error"] = f"{type(e).__name__}: {e}"
    every = set(args.variant_models.split(",")) if args.variant_models else set(models)
    for name, round_ in ((name, k) for name in models for k in range(args.rounds)):
        mb = int(mbs.get(name, 4))
        for vi, (vname, vover) in enumerate(variants):
            if vi > 0 and name not in every:
                continue
            overrides = ["data.kind=mock", f"train.micro_batch={mb}", f"train.global_batch={mb * args.accum}",
                         "logging.tensorboard=false", *args.overrides, *vover]
            if args.tiny:
                overrides += ["data.seq_length=64"]
            profile = args.profile if args.profile_variants is None or vname in args.profile_variants.split(",") else 0
            try:
                if args.isolate:
                    r = bench_in_subprocess(name, overrides, args.steps, args.warmup, profile)
                else:
                    r = bench_one(name, overrides, args.steps, args.warmup, profile)
            except Exception as e:  # report and go on: one model out of memory should not lose the table
                if world > 1:
                    raise  # a rank that went on alone would wait forever in the next variant's collectives
                r = {"model": name, "overrides": overrides, "error": f"{type(e).__name__}: {e}"}
            r["variant"] = vname
            if args.rounds > 1:
                r["round"] = round_
            r.update(hardware_fractions(r, results, fp8="train.precision=fp8" in overrides))
            first = next((x for x in results["runs"] if x["model"] == name and x["variant"] == variants[0][0]
                          and x.get("round") == r.get("round")), None)
            if first and "tokens_per_s" in first and "tokens_per_s" in r:
                r["speedup_vs_first_variant"] = r["tokens_per_s"] / first["tokens_per_s"]
            results["runs"].append(r)
            if rank == 0:
                print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
                if "profile" in r:
                    pr = r["profile"]
                    print(f"  profile {name} {vname}: wall {pr['wall_ms_per_step']:.1f} ms/step, GPU kernels "
                          f"{pr['kernel_ms_per_step']:.1f} ms/step; {pr['categories_ms']}", flush=True)
                    for kname, k in list(pr["kernels"].items())[:15]:
                        print(f"    {k['ms']:8.2f} ms {k['calls']:5d}x  {kname[:110]}", flush=True)

    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    print(f"\ndevice: {results['device']}  matmul ceiling: {results.get('matmul_ceiling_tflops', float('nan')):.0f} TFLOP/s"
          + (f"  fp8 ceiling: {results['fp8_matmul_ceiling_tflops']:.0f} TFLOP/s" if "fp8_matmul_ceiling_tflops" in results
             else ""))
    print(f"{'model':<12} {'variant':<10} {'mbs x seq':>10} {'tok/s':>10} {'dense-eq':>10} {'TFLOP/s':>8} "
          f"{'of ceil':>8} {'MFU':>7} {'vs first':>8} {'peak GiB':>9}   (TFLOP/s and MFU: executed FLOPs; "
          "MFU over the datasheet bf16 peak)")

    def percent(x):
        return f"{100 * x:.1f}%" if x is not None else "nan"

    for r in results["runs"]:
        if "error" in r:
            print(f"{r['model']:<12} {r['variant']:<10} ERROR {r['error'][:80]}")
            continue
        print(f"{r['model']:<12} {r['variant']:<10} {r['micro_batch']:>4} x {r['seq']:<4} {r['tokens_per_s']:>10.0f} "
              f"{r['tokens_per_s_dense_equiv']:>10.0f} {r['tflops_executed']:>8.1f} "
              f"{percent(r.get('fraction_of_ceiling')):>8} {percent(r.get('mfu_datasheet')):>7} "
              f"{r.get('speedup_vs_first_variant', float('nan')):>8.3f} {r['peak_mem_gib'] or float('nan'):>9.1f}")
    if args.rounds > 1:
        results["summary"] = round_summary(results["runs"])
        print(f"\nmedian of {args.rounds} rounds (ratio: the median of each round's ratio to its first variant)")
        print(f"{'model':<12} {'variant':<12} {'tok/s':>10} {'vs first':>8} {'range vs first':>16} {'peak GiB':>9}")
        for s in results["summary"]:
            lo, hi = s["ratio_range"]
            print(f"{s['model']:<12} {s['variant']:<12} {s['tokens_per_s_median']:>10.0f} {s['ratio_median']:>8.3f} "
                  f"{lo:>7.3f} - {hi:<6.3f} {s['peak_mem_gib'] or float('nan'):>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results["runs"]) else 1


def round_summary(runs: list[dict]) -> list[dict]:
    """Per model and variant over the rounds: median tokens/s, the median and range of the within-round ratio
    to the round's first variant (1.0 for that variant itself), and the largest peak memory."""
    out = []
    for key in dict.fromkeys((r["model"], r["variant"]) for r in runs):
        mine = [r for r in runs if (r["model"], r["variant"]) == key and "tokens_per_s" in r]
        if not mine:
            continue
        ratios = [r.get("speedup_vs_first_variant", 1.0) for r in mine]
        peaks = [r["peak_mem_gib"] for r in mine if r.get("peak_mem_gib") is not None]
        out.append({"model": key[0], "variant": key[1], "rounds": len(mine),
                    "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in mine),
                    "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                    "peak_mem_gib": max(peaks) if peaks else None})
    return out


if __name__ == "__main__":
    sys.exit(main())
