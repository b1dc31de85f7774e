"""Benchmark effdist's pipeline schedules against each other and against megatron-core's own 1F1B.

One launch measures every schedule on the same model and data: tokens/s of forward+backward+gradient sync of one
optimizer step (the optimizer itself is the same for every schedule and left out), the peak GPU memory of each
rank (torch.cuda.max_memory_allocated, parameters and gradients included), and each rank's peak activation in
the simulator's unit next to the simulator's prediction. On GPU it also runs megatron-core's
``get_forward_backward_func()`` (1F1B) on the same layers as the outside reference.

Like for like (``--kernels``, default both): every engine runs once with effdist's fused kernels
(``train.fused_kernels=true``: RMSNorm, RoPE, SwiGLU, LM head + cross-entropy, weight-gradient accumulation) and
once without (``false``: megatron-core's own modules). megatron-core's 1F1B gets the very same layers and kernels
(its model is built by effdist.model.gpt.build_gpt), so ``effdist_vs_megatron_1f1b`` in the JSON compares the
schedules' executors only, once per kernel set.

    torchrun --nproc_per_node 2 tools/bench_pipeline.py --config configs/llama-1b.yaml --seq 2048 \\
        --micro-batch 1 --microbatches 16 --json pipeline_bench.json
    torchrun --nproc_per_node 2 tools/bench_pipeline.py --tiny          # CPU smoke test (gloo, tiny model)
    torchrun --nproc_per_node 2 tools/bench_pipeline.py --check         # correctness vs pp=1 (fp32, small model)

pp is the number of processes (tp = 1, no data parallelism). Prints a table and, on rank 0, the JSON record.
With ``--timeline-dir DIR`` each schedule runs one more step with every action timed (effdist.pipeline.timeline):
rank 0 writes DIR/timeline_<schedule>.png (measured above simulated; timeline_<schedule>_unfused.png for the
unfused kernel set) and .json, and the schedule's record gets the
measured bubble fractions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_SCHEDULES = ("1f1b", "zb-h1", "v-zb", "v-half", "v-min")
# Kernel set -> train.fused_kernels: effdist and megatron-core's 1F1B run each with the same one.
KERNEL_MODES = {"fused": "true", "unfused": "false"}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "llama-1b.yaml"), help="model preset (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (e.g. model.num_layers=14)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per microbatch")
    p.add_argument("--microbatches", type=int, default=16, help="microbatches per step")
    p.add_argument("--schedules", default=",".join(DEFAULT_SCHEDULES), help="comma-separated schedule names")
    p.add_argument("--steps", type=int, default=5, help="timed steps per schedule")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per schedule")
    p.add_argument("--no-megatron", action="store_true",
                   help="skip megatron-core's own 1F1B (always skipped on CPU: its schedule allocates on 'cuda')")
    p.add_argument("--kernels", default=",".join(KERNEL_MODES),
                   help="comma-separated kernel sets, each run by every engine: fused (train.fused_kernels=true) "
                        "and/or unfused (false)")
    p.add_argument("--json", default=None, help="also write the JSON record to this file")
    p.add_argument("--timeline-dir", default=None, metavar="DIR",
                   help="after timing each schedule, record one step's per-action timeline; rank 0 writes "
                        "DIR/timeline_<schedule>.png and .json (measured vs simulated)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny model, few steps (gloo works too)")
    p.add_argument("--hang-dump", type=float, default=0.0, metavar="S",
                   help="print every thread's stack if the run is still going after S seconds (diagnosing hangs)")
    p.add_argument("--check", action="store_true",
                   help="instead of timing: one fp32 step per schedule on a small model, loss and gradients "
                        "compared with the pp=1 model on every rank")
    return p


# ---------------------------------------------------------------------------------------------- setup

def make_config(args, schedule: str, pp: int, kernels: str = "fused"):
    from effdist.config import load_config

    if args.tiny or args.check:
        base = ROOT / "configs" / "tiny-cpu.yaml"
        overrides = ["model.num_layers=8", "data.seq_length=64", "train.micro_batch=2"]
        if args.check:
            overrides += ["model.hidden_size=128", "model.ffn_hidden_size=352", "train.dtype=fp32",
                          "model.max_position_embeddings=128"]
    else:
        base = Path(args.config)
        overrides = [f"data.seq_length={args.seq}", f"train.micro_batch={args.micro_batch}",
                     f"model.max_position_embeddings={max(args.seq, 2)}"]
    microbatches = 8 if (args.tiny or args.check) else args.microbatches
    overrides += [f"parallel.pp={pp}", "parallel.tp=1", "data.kind=mock", f"pipeline.schedule={schedule}",
                  f"pipeline.microbatches={microbatches}", "model.tie_embeddings=false",
                  f"train.fused_kernels={KERNEL_MODES[kernels]}"]
    cfg = load_config(base, overrides + list(args.overrides))
    cfg.train.global_batch = microbatches * cfg.train.micro_batch
    return cfg


def random_microbatches(cfg, count: int, device_seed: int = 1234) -> list[dict]:
    g = torch.Generator().manual_seed(device_seed)
    s, b = cfg.data.seq_length, cfg.train.micro_batch
    out = []
    for _ in range(count):
        tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()})
    return out


def _ddp_wrap(chunks):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def _sync(rt) -> None:
    if rt.is_cuda:
        torch.cuda.synchronize()


def _free_memory(rt) -> None:
    gc.collect()
    if rt.is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gather(value: float, rt) -> list[float]:
    t = torch.tensor([float(value)], dtype=torch.float64, device=rt.device)
    out = torch.empty(rt.world_size, dtype=torch.float64, device=rt.device)
    dist.all_gather_into_tensor(out, t)
    return out.cpu().tolist()


# ---------------------------------------------------------------------------------------------- timing

def time_effdist(args, schedule: str, rt, kernels: str = "fused") -> dict:
    from effdist.pipeline.executor import build_pipeline
    from effdist.pipeline.simulate import simulate

    cfg = make_config(args, schedule, rt.world_size, kernels)
    mbs = random_microbatches(cfg, cfg.pipeline.microbatches)
    tokens = float(sum(mb["loss_mask"].sum() for mb in mbs))
    _free_memory(rt)
    pipe = build_pipeline(cfg, rt, measure_memory=True)
    wrapped = _ddp_wrap(pipe.model_chunks)
    pipe.set_wrapped_chunks(wrapped)

    def step() -> float:
        for w in wrapped:
            w.zero_grad_buffer()
        _sync(rt)
        dist.barrier()
        t0 = time.perf_counter()
        pipe.forward_backward(mbs, tokens)
        for w in wrapped:
            w.finish_grad_sync()
        _sync(rt)
        return time.perf_counter() - t0

    step()  # an untimed measured step: activation units from the probe
    metrics = pipe.memory_metrics()
    # The timed steps run as the trainer does: the probe only with pipeline.measure_memory (off by default).
    pipe.measure_memory = cfg.pipeline.measure_memory
    for _ in range(args.warmup):
        step()
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [max(_gather(step(), rt)) for _ in range(args.steps)]
    peak = _gather(torch.cuda.max_memory_allocated() / 2**30 if rt.is_cuda else 0.0, rt)
    sim = simulate(pipe.last_schedule, b_frees=metrics.get("pipeline_b_frees", 0.0))
    seconds = statistics.median(times)
    record = {
        "schedule": schedule, "engine": "effdist", "kernels": kernels, "step_s": seconds,
        "tokens_per_s": cfg.pipeline.microbatches * cfg.train.micro_batch * cfg.data.seq_length / seconds,
        "peak_mem_gib": peak,
        "activation_units": metrics.get("pipeline_peak_activation_units"),
        "simulated_units": [r.peak_activation_units for r in sim.ranks],
        "simulated_bubble_rate": sim.bubble_rate,
        "b_frees": metrics.get("pipeline_b_frees"),
        "activation_unit_bytes": metrics.get("pipeline_activation_unit_bytes"),
    }
    if args.timeline_dir:
        record.update(record_timeline(Path(args.timeline_dir), pipe, step, sim.b_frees, rt, kernels))
    pipe.close()
    del pipe, wrapped
    _free_memory(rt)
    return record


def timeline_stem(schedule: str, kernels: str = "fused") -> str:
    """File name (without suffix) of a schedule's timeline picture: timeline_<schedule>[_unfused]."""
    return f"timeline_{schedule}" + ("" if kernels == "fused" else f"_{kernels}")


def record_timeline(out_dir: Path, pipe, step, b_frees: float, rt, kernels: str = "fused") -> dict:
    """One more step with every action timed. Rank 0 writes out_dir/<timeline_stem>.png and .json (the
    measured records next to the simulation with costs fitted to them) and returns the measured bubble fractions
    for the schedule's record; the other ranks return {}."""
    from effdist.pipeline import timeline
    from effdist.pipeline.render import write_measured_png
    from effdist.pipeline.simulate import simulate

    pipe.record_timeline = True
    step()
    pipe.record_timeline = False
    measured = timeline.gather_timings(pipe.timeline(), pipe.group)
    if measured is None:
        return {}
    schedule = pipe.last_schedule
    seen = timeline.bubbles(timeline.by_rank(measured, schedule.pp))
    fitted = simulate(schedule, timeline.fit_costs(measured, schedule), b_frees=b_frees)
    # Each chunk at its own measured cost: what is left between this and the measured bubble is not stage imbalance
    # (the LM head and loss on the last chunk) but what the simulator does not model (waits, launch gaps).
    per_chunk = simulate(schedule, b_frees=b_frees, chunk_costs=timeline.fit_chunk_costs(measured, schedule))
    name = schedule.name
    stem = timeline_stem(name, kernels)
    png = write_measured_png(measured, per_chunk, out_dir / f"{stem}.png", simulated_in_seconds=True)
    (out_dir / f"{stem}.json").write_text(json.dumps({
        "schedule": name, "pp": schedule.pp, "microbatches": schedule.num_microbatches,
        "clock": "seconds since each rank's step start; the starts are aligned by a barrier of the pipeline group",
        "device": torch.cuda.get_device_name() if rt.is_cuda else "cpu",
        "measured": {"makespan_s": seen.makespan, "bubble_rate": seen.overall, "bubble_rates": seen.ranks,
                     "actions": timeline.to_dicts(measured)},
        "simulated": {"costs_s": fitted.costs.to_dict(), "makespan_s": fitted.makespan,
                      "bubble_rate": fitted.bubble_rate, "bubble_rates": [r.bubble_rate for r in fitted.ranks],
                      "actions": timeline.to_dicts([t for row in fitted.timings for t in row])},
        "simulated_per_chunk": {"chunk_costs_s": [c.to_dict() for c in per_chunk.chunk_costs],
                                "makespan_s": per_chunk.makespan, "bubble_rate": per_chunk.bubble_rate,
                                "bubble_rates": [r.bubble_rate for r in per_chunk.ranks],
                                "actions": timeline.to_dicts([t for row in per_chunk.timings for t in row])},
    }, indent=1))
    def percent(rates) -> str:
        return " ".join(f"{100 * b:.1f}%" for b in rates)

    print(f"timeline {name}: bubble per rank measured {percent(seen.ranks)}, simulated with the measured op times "
          f"{percent(r.bubble_rate for r in fitted.ranks)}, with each chunk's own "
          f"{percent(r.bubble_rate for r in per_chunk.ranks)} -> {png}", flush=True)
    return {"measured_bubble_rate": seen.overall, "measured_bubble_rates": seen.ranks,
            "fitted_costs_s": fitted.costs.to_dict(), "fitted_bubble_rate": fitted.bubble_rate,
            "fitted_chunk_costs_s": [c.to_dict() for c in per_chunk.chunk_costs],
            "fitted_chunk_makespan_s": per_chunk.makespan, "fitted_chunk_bubble_rate": per_chunk.bubble_rate,
            "fitted_chunk_bubble_rates": [r.bubble_rate for r in per_chunk.ranks]}


def time_megatron_1f1b(args, rt, kernels: str = "fused") -> dict:
    """megatron-core's own non-interleaved 1F1B on the same layers (megatron's layer layout: L/pp per rank), built
    by effdist's build_gpt with the same kernel set as the effdist runs it is compared with."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from effdist.model.gpt import build_gpt

    cfg = make_config(args, "1f1b", rt.world_size, kernels)
    pp, rank, L = rt.world_size, rt.pp_rank, cfg.model.num_layers
    if L % pp:
        raise SystemExit(f"megatron's 1F1B needs model.num_layers ({L}) divisible by pp ({pp})")
    per = L // pp
    _free_memory(rt)
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, rt.dtype, rt.device,
                      list(range(rank * per, (rank + 1) * per)), pre_process=rank == 0, post_process=rank == pp - 1)
    # What megatron's schedule reads from the model config (build_gpt builds standalone chunks: pp = 1 there).
    model.config.pipeline_model_parallel_size = pp
    model.config.deallocate_pipeline_outputs = True
    (ddp,) = _ddp_wrap([model])
    mbs = random_microbatches(cfg, cfg.pipeline.microbatches)
    forward_backward = get_forward_backward_func()

    def loss_func(mask, output):
        loss = (output.float() * mask).sum()
        return loss, mask.sum().to(torch.int), {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        dev = rt.device
        out = model(mb["tokens"].to(dev), mb["position_ids"].to(dev), None, labels=mb["labels"].to(dev))
        return out, partial(loss_func, mb["loss_mask"].to(dev))

    def step() -> float:
        ddp.zero_grad_buffer()
        _sync(rt)
        dist.barrier()
        t0 = time.perf_counter()
        forward_backward(forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp],
                         num_microbatches=len(mbs), seq_length=cfg.data.seq_length,
                         micro_batch_size=cfg.train.micro_batch, forward_only=False)
        ddp.finish_grad_sync()
        _sync(rt)
        return time.perf_counter() - t0

    for _ in range(args.warmup + 1):
        step()
    if rt.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [max(_gather(step(), rt)) for _ in range(args.steps)]
    peak = _gather(torch.cuda.max_memory_allocated() / 2**30 if rt.is_cuda else 0.0, rt)
    seconds = statistics.median(times)
    del ddp, model
    _free_memory(rt)
    return {"schedule": "1f1b", "engine": "megatron-core", "kernels": kernels, "step_s": seconds,
            "tokens_per_s": cfg.pipeline.microbatches * cfg.train.micro_batch * cfg.data.seq_length / seconds,
            "peak_mem_gib": peak}


# ---------------------------------------------------------------------------------------------- check

def check_schedule(args, schedule: str, rt) -> dict:
    """One fp32 step: loss and every gradient against the pp=1 model built from the same seed on this rank."""
    from megatron.core import parallel_state, tensor_parallel

    from effdist.model.gpt import build_gpt
    from effdist.pipeline.chunks import full_model_name
    from effdist.pipeline.executor import build_pipeline

    cfg = make_config(args, schedule, rt.world_size)
    mbs = random_microbatches(cfg, cfg.pipeline.microbatches)
    tokens = float(sum(mb["loss_mask"].sum() for mb in mbs))

    def seed():
        torch.manual_seed(cfg.train.seed)
        if rt.is_cuda:
            tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)

    seed()
    reference = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, rt.dtype, rt.device)
    ref_loss = 0.0
    for mb in mbs:
        per_token = reference(*(mb[k].to(rt.device) for k in ("tokens", "position_ids")), None,
                              labels=mb["labels"].to(rt.device))
        loss_sum = (per_token.float() * mb["loss_mask"].to(rt.device)).sum()
        (loss_sum / tokens).backward()
        ref_loss += float(loss_sum)
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    seed()
    pipe = build_pipeline(cfg, rt, init="full-model")
    wrapped = _ddp_wrap(pipe.model_chunks)
    pipe.set_wrapped_chunks(wrapped)
    for w in wrapped:
        w.zero_grad_buffer()
    loss = pipe.forward_backward(mbs, tokens)
    for w in wrapped:
        w.finish_grad_sync()
    worst = 0.0
    for chunk, w in zip(pipe.chunk_ids, wrapped):
        for name, p in w.module.named_parameters():
            ref = ref_grads[full_model_name(pipe.layout, chunk, name)]
            worst = max(worst, float((p.main_grad - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    total = torch.tensor([float(loss)], dtype=torch.float64, device=rt.device)
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    pipe.close()
    return {"schedule": schedule, "loss": float(total), "ref_loss": ref_loss, "grad_rel": max(_gather(worst, rt))}


# ---------------------------------------------------------------------------------------------- main

def _table(records: list[dict]) -> str:
    lines = [f"{'schedule':<10} {'engine':<14} {'kernels':<8} {'tokens/s':>10} {'step s':>8}  peak GiB per rank   "
             "activation units per rank (simulated)"]
    for r in records:
        mem = " ".join(f"{x:6.2f}" for x in r["peak_mem_gib"])
        units = ""
        if r.get("activation_units"):
            units = " ".join(f"{m:.2f}({s:.2f})" for m, s in zip(r["activation_units"], r["simulated_units"]))
        lines.append(f"{r['schedule']:<10} {r['engine']:<14} {r.get('kernels', 'fused'):<8} {r['tokens_per_s']:>10.0f} "
                     f"{r['step_s']:>8.3f}  {mem:<18} {units}")
    return "\n".join(lines)


def like_for_like(records: list[dict]) -> dict:
    """Per kernel set: tokens/s of each effdist schedule over megatron-core's 1F1B run with the same kernels."""
    out = {}
    for kernels in dict.fromkeys(r.get("kernels") for r in records):
        reference = next((r for r in records if r["engine"] == "megatron-core" and r.get("kernels") == kernels), None)
        if reference is None:
            continue
        out[kernels] = {r["schedule"]: r["tokens_per_s"] / reference["tokens_per_s"] for r in records
                        if r["engine"] == "effdist" and r.get("kernels") == kernels}
    return out


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    args = build_arg_parser().parse_args(argv)
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    from effdist.train.preflight import validate_run
    from effdist.runtime.distributed import setup, teardown, world_size_from_env

    world = world_size_from_env()
    if world < 2:
        print("bench_pipeline: run under torchrun with 2 or more processes (pp = number of processes)", file=sys.stderr)
        return 2
    schedules = [s for s in args.schedules.split(",") if s]
    kernel_modes = [k for k in args.kernels.split(",") if k]
    if not kernel_modes or any(k not in KERNEL_MODES for k in kernel_modes):
        print(f"bench_pipeline: --kernels {args.kernels!r}: valid: {', '.join(KERNEL_MODES)} (comma-separated)",
              file=sys.stderr)
        return 2
    if any(o.startswith("train.fused_kernels=") for o in args.overrides):
        print("bench_pipeline: --set train.fused_kernels: choose the kernel sets with --kernels fused,unfused instead",
              file=sys.stderr)
        return 2
    cfg0 = make_config(args, schedules[0], world)
    validate_run(cfg0, world_size=world)
    if args.hang_dump > 0:
        import faulthandler

        faulthandler.dump_traceback_later(args.hang_dump, exit=False)
    rt = setup(cfg0)
    try:
        if args.check:
            results = [check_schedule(args, s, rt) for s in schedules]
            ok = all(abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]) and r["grad_rel"] <= 1e-4
                     for r in results)
            if rt.is_logging_rank:
                for r in results:
                    print(f"{r['schedule']:<10} loss {r['loss']:.6f} (pp=1 {r['ref_loss']:.6f})  "
                          f"max relative gradient difference {r['grad_rel']:.2e}", flush=True)
                print("CHECK " + ("PASSED" if ok else "FAILED"), flush=True)
            return 0 if ok else 1
        records = []
        for kernels in kernel_modes:
            records += [time_effdist(args, s, rt, kernels) for s in schedules]
            if rt.is_cuda and not args.no_megatron:
                records.append(time_megatron_1f1b(args, rt, kernels))
        cfg = make_config(args, schedules[0], world)
        summary = {"model": cfg.model.name, "num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size,
                   "pp": world, "seq_length": cfg.data.seq_length, "micro_batch": cfg.train.micro_batch,
                   "microbatches": cfg.pipeline.microbatches, "dtype": str(rt.dtype).replace("torch.", ""),
                   "device": torch.cuda.get_device_name() if rt.is_cuda else "cpu",
                   "command": " ".join(["tools/bench_pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
                   "date": time.strftime("%Y-%m-%d"), "kernels": kernel_modes,
                   "effdist_vs_megatron_1f1b": like_for_like(records), "results": records}
        if rt.is_logging_rank:
            print(_table(records), flush=True)
            for kernels, ratios in summary["effdist_vs_megatron_1f1b"].items():
                print(f"effdist / megatron-core 1F1B tokens/s, both {kernels}: "
                      + "  ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items()), flush=True)
            print("JSON " + json.dumps(summary), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=1))
        return 0
    except BaseException:
        # Report now: tearing down NCCL with operations in flight can hang and would swallow the traceback.
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
