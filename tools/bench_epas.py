#!/usr/bin/env python
"""EPAS training throughput: one full step (forward, backward, gradient reduction, clip, AdamW over
fp32 master weights, EPAS row restore) at several sharing-region lengths against the dense model,
all in ONE process so every variant runs on the same GPU state.

    python tools/bench_epas.py --json epas.json                 # llama-350m and llama-1b shapes, bf16, GPU
    python tools/bench_epas.py --tiny                           # CPU smoke test, seconds

Variants per model: the dense model (epas disabled), the EPAS model at region 0 (must match dense),
and the EPAS model with the deepest L/2 and 3L/4 layers sharing Q/K (``--regions``, fractions of L).
Both models stay resident and the variants take turns (``--rounds`` x ``--steps`` timed steps each,
after warm-up), so that clock or allocator drift hits all alike; the median is reported. The table gives tokens/s,
the speed-up over region 0, and the "ideal" speed-up if step time were proportional to executed FLOPs
(a sharing layer skips the Q and K projections: 6·h·(h + kv_dim) FLOPs per token, forward+backward;
effdist.train.flops). Every step reads a new batch through the trainer's data path (effdist's MicrobatchLoader
over the dataset data.kind names, megatron's MockGPTDataset unless ``--data`` says otherwise) and copies it to
the device, as the trainer does; the loss is the trainer's masked token mean.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # name: (layers, hidden, heads, kv heads, ffn, seq, micro batch); micro batches as in configs/llama-*.yaml
    "llama-350m": (24, 1024, 16, 16, 2816, 2048, 8),
    "llama-1b": (16, 2048, 32, 32, 5632, 2048, 8),
    "tiny": (4, 64, 4, 2, 176, 64, 2),
}
VOCAB = 32000


def init_megatron(cuda: bool, seed: int = 1234) -> None:
    """One process, world size 1, TP = PP = 1, for the rest of this process (nccl on GPU, gloo + the CPU
    compatibility layer on CPU)."""
    from effdist.runtime.distributed import one_process_megatron

    _WORLD.enter_context(one_process_megatron(cuda, seed))


_WORLD = contextlib.ExitStack()
# Tear the world down while the interpreter is still whole (not from a half-collected generator).
atexit.register(_WORLD.close)


def reseed(cuda: bool, seed: int = 1234) -> None:
    """Same generators before each build: the dense and the EPAS model start from the same weights."""
    from effdist.runtime.distributed import seed_model_parallel_rng

    seed_model_parallel_rng(seed, cuda)


def make_config(shape: str, epas: bool, region: int = 0, micro_batch: int | None = None,
                data_overrides: tuple[str, ...] = ()):
    from effdist.config import load_config

    layers, hidden, heads, groups, ffn, seq, mbs = SHAPES[shape]
    mbs = micro_batch or mbs
    overrides = [f"model.num_layers={layers}", f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
                 f"model.num_query_groups={groups}", f"model.ffn_hidden_size={ffn}",
                 f"model.vocab_size={512 if shape == 'tiny' else VOCAB}", f"model.max_position_embeddings={seq}",
                 f"data.seq_length={seq}", f"train.micro_batch={mbs}", f"train.global_batch={mbs}",
                 "optim.weight_decay=0.1", f"epas.enabled={str(epas).lower()}", "data.kind=mock", *data_overrides]
    if epas and region > 0:
        overrides += ["epas.mode=fixed", f"epas.final_region={region}", "epas.start_step=0"]
    return load_config(None, overrides)


def executed_flops_per_token(cfg, region: int) -> float:
    """Forward+backward matmul FLOPs per token the GPU executes at this region (effdist.train.flops)."""
    from effdist.train.flops import flops_per_token

    return flops_per_token(cfg, sharing_layers=region).executed


def data_loader(cfg, samples: int, data_dir: Path):
    """The trainer's data path: the dataset data.kind names (mock by default: megatron's MockGPTDataset) read
    through effdist's MicrobatchLoader, a new batch every step, copied to the device in the step."""
    from effdist.data.loader import MicrobatchLoader, build_train_valid_datasets, prepare_data

    train_ds, _ = build_train_valid_datasets(cfg, prepare_data(cfg, data_dir), samples, 0)
    return MicrobatchLoader(train_ds, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch)


class Trainee:
    """A model + megatron DDP + master-weight AdamW stepping on the trainer's data path, as the trainer does.

    Built once per model: wrapping a module in DDP again would add a second set of gradient hooks.
    An EPAS region is switched by giving `step` another controller.
    """

    def __init__(self, cfg, model, device: torch.device, loader):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        from effdist.train.optim import MasterWeightAdamW

        self.cfg, self.module = cfg, model
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False)
        self.model = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = MasterWeightAdamW(params, cfg.optim, fused=device.type == "cuda", tp_rank=0,
                                           model_parallel_group=parallel_state.get_model_parallel_group())
        self.loader, self.device = loader, device
        self.step_index = 0

    def step(self, controller=None) -> float:
        from effdist.train.loss import masked_loss_sum

        if controller is not None:
            controller.begin_step(self.step_index)
        self.model.zero_grad_buffer()
        (microbatch,) = self.loader.next_step()  # global batch = micro batch: one microbatch per step
        loss_sum, mask = masked_loss_sum(self.model, microbatch, self.device)
        loss = loss_sum / mask.sum()
        loss.backward()
        self.model.finish_grad_sync()
        self.optimizer.collect_grads()
        self.optimizer.clip(self.optimizer.grad_norm())
        self.optimizer.step(lr=1e-4)
        if controller is not None:
            controller.after_optimizer_step(self.optimizer)
        self.step_index += 1
        return float(loss.detach())


def time_steps(trainee: Trainee, controller, warmup: int, steps: int, cuda: bool) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(trainee.step(controller))
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, losses


def kernel_profile(step, steps: int) -> dict:
    """Where a step's time goes: GPU kernel time per step by kernel name (torch.profiler), against the wall time
    of the same steps. ``step()`` runs one training step; it runs once unprofiled first. Wall time well above
    kernel time means the step waits on the CPU. (tools/bench_train.py --profile uses this too.)"""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    step()  # e.g. the region switch's first step is not what is profiled
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / steps
    kernels: dict[str, list[float]] = {}
    for evt in prof.key_averages():
        # record_function ranges (e.g. "Optimizer.step#AdamW.step") appear on the GPU too, spanning the kernels
        # they launched: counting them would count those kernels twice.
        if evt.device_type != torch.autograd.DeviceType.CUDA or getattr(evt, "is_user_annotation", False):
            continue
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        entry = kernels.setdefault(evt.key[:120], [0.0, 0])
        entry[0] += us / 1e3 / steps
        entry[1] += evt.count // steps
    total = sum(ms for ms, _ in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {"wall_ms_per_step": wall * 1e3, "kernel_ms_per_step": total,
            "kernels": {name: {"ms": round(ms, 4), "calls": n} for name, (ms, n) in top}}


def print_profile_diff(rows: list[dict], top: int = 25) -> None:
    """Per-kernel time of each EPAS region against region 0: what sharing saves, and what it adds."""
    base = next((r for r in rows if r["variant"] == "epas r=0" and "profile" in r), None)
    if base is None:
        return
    for r in rows:
        if "profile" not in r or r is base:
            continue
        a, b = base["profile"], r["profile"]
        print(f"\n{r['model']} {r['variant']} vs epas r=0: wall {b['wall_ms_per_step']:.1f} vs {a['wall_ms_per_step']:.1f} "
              f"ms/step, GPU kernels {b['kernel_ms_per_step']:.1f} vs {a['kernel_ms_per_step']:.1f} ms/step")
        names = set(a["kernels"]) | set(b["kernels"])
        delta = {n: b["kernels"].get(n, {"ms": 0})["ms"] - a["kernels"].get(n, {"ms": 0})["ms"] for n in names}
        print(f"  {'delta ms':>9} {'r=0 ms':>8} {'calls r=0/r':>12}  kernel")
        for n in sorted(names, key=lambda n: -abs(delta[n]))[:top]:
            ka, kb = a["kernels"].get(n, {"ms": 0, "calls": 0}), b["kernels"].get(n, {"ms": 0, "calls": 0})
            print(f"  {delta[n]:>+9.3f} {ka['ms']:>8.3f} {ka['calls']:>5}/{kb['calls']:<6}  {n[:100]}")


def bench_shape(shape: str, fractions: list[float], warmup: int, steps: int, rounds: int, device: torch.device,
                dtype: torch.dtype, profile_steps: int = 0, micro_batch: int | None = None,
                data_overrides: tuple[str, ...] = (), data_dir: Path | None = None) -> list[dict]:
    """Both models stay resident and the variants take turns, `rounds` times `steps` timed steps each, so
    that drifts of the GPU's clocks or allocator affect every variant alike. Both read the same batches
    (each its own loader over the same dataset)."""
    import tempfile
    from effdist.epas import EpasController, apply_region, current_region
    from effdist.model.gpt import build_gpt

    cuda = device.type == "cuda"
    layers = SHAPES[shape][0]
    regions = sorted({min(layers - 1, int(round(f * layers))) for f in fractions} | {0})
    variants = [("dense", 0)] + [(f"epas r={r}", r) for r in regions]
    rows = {name: {"model": shape, "variant": name, "region": region} for name, region in variants}
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    losses: dict[str, list[float]] = {name: [] for name, _ in variants}
    # Steps each model takes: every variant of it, every round (+1 switch step), warm-up and profiling.
    samples_per_model = len(variants) * (warmup + rounds * (steps + 1) + profile_steps + 2) * (micro_batch or
                                                                                               SHAPES[shape][-1])
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="effdist-bench-epas-"))
    try:
        trainees = {}
        for kind in ("dense", "epas"):
            cfg = make_config(shape, epas=kind == "epas", micro_batch=micro_batch, data_overrides=data_overrides)
            reseed(cuda)  # both start from the same weights
            model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, dtype, device)
            trainees[kind] = Trainee(cfg, model, device, data_loader(cfg, samples_per_model, data_dir))
    except Exception as e:  # e.g. out of memory: report it for every variant
        for row in rows.values():
            row["error"] = f"{type(e).__name__}: {e}"
        trainees = {}
    active: list = []  # the EPAS controller in use: closed before another variant runs

    def take_turn(name: str, region: int):
        """The model of this variant, switched to its region, and the controller that keeps it there."""
        while active:
            # Hands its frozen rows back to the optimizer: a left-over registration would make the next
            # variant's AdamW skip them too.
            active.pop().close()
        trainee = trainees["dense" if name == "dense" else "epas"]
        if name == "dense":
            return trainee, None
        apply_region([trainee.module], set())
        if region == 0:
            return trainee, None
        controller = EpasController(make_config(shape, epas=True, region=region, micro_batch=micro_batch,
                                                data_overrides=data_overrides),
                                    [trainee.module], optimizer=trainee.optimizer)
        active.append(controller)
        return trainee, controller

    for round_index in range(rounds if trainees else 0):
        for name, region in variants:
            row = rows[name]
            if "error" in row:
                continue
            try:
                trainee, controller = take_turn(name, region)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t, l = time_steps(trainee, controller, warmup if round_index == 0 else 1, steps, cuda)
                if name != "dense":
                    assert len(current_region([trainee.module])) == region
                times[name] += t
                losses[name] += l
                if cuda:
                    row["peak_mem_gib"] = max(row.get("peak_mem_gib", 0.0), torch.cuda.max_memory_allocated() / 2**30)
            except Exception as e:  # one variant failing should not lose the table
                row["error"] = f"{type(e).__name__}: {e}"
    for name, region in variants if profile_steps and cuda and trainees else ():
        if "error" in rows[name]:
            continue
        trainee, controller = take_turn(name, region)
        try:
            rows[name]["profile"] = kernel_profile(lambda: trainee.step(controller), profile_steps)
        except Exception as e:  # the timings above stand without it
            print(f"profiling {shape} {name} failed: {type(e).__name__}: {e}", flush=True)
    for name, region in variants:
        row = rows[name]
        if "error" in row:
            continue
        cfg = trainees["dense" if name == "dense" else "epas"].cfg
        step_s = statistics.median(times[name])
        tokens = cfg.train.micro_batch * cfg.data.seq_length
        # dense and "epas r=0" start from the same weights: their first losses must be equal.
        row.update(step_s=step_s, step_s_min=min(times[name]), step_s_max=max(times[name]), timed_steps=len(times[name]),
                   tokens_per_s=tokens / step_s, first_loss=losses[name][0], final_loss=losses[name][-1],
                   flops_per_token=executed_flops_per_token(cfg, region))
        row.setdefault("peak_mem_gib", None)
    del trainees
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    out = list(rows.values())
    base = rows.get("epas r=0")
    for r in out:
        if base is not None and "error" not in base and "error" not in r:
            r["speedup_vs_region0"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["ideal_speedup_vs_region0"] = base["flops_per_token"] / r["flops_per_token"]
        print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
    print_profile_diff(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-350m,llama-1b", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--regions", default="0,0.5,0.75", help="sharing regions as fractions of the layers")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=4, help="the variants take turns this many times; the median "
                                                         "over all their timed steps is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant in the first round "
                                                         "(later rounds: 1, after the region switch)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny model (fp32)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="GPU: after timing, profile STEPS steps of each variant and print the per-kernel time of "
                        "each region against region 0 (what sharing saves and what it adds)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per step (default: the preset's, " + ", ".join(
                       f"{k} {v[-1]}" for k, v in SHAPES.items() if k != "tiny") + ")")
    p.add_argument("--data", dest="data_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="data config override, repeatable (default data.kind=mock: megatron's MockGPTDataset through "
                        "the trainer's loader; e.g. --data data.kind=indexed --data data.paths=[/data/fineweb_text])")
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args(argv)
    if any(not o.startswith("data.") for o in args.data_overrides):
        p.error(f"--data takes data.* keys only; got {[o for o in args.data_overrides if not o.startswith('data.')]}")

    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("bench_epas: no CUDA GPU; run with --tiny for the CPU smoke test", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    models = ["tiny"] if args.tiny else args.models.split(",")
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        print(f"bench_epas: unknown model(s) {unknown}; known: {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    fractions = [float(x) for x in args.regions.split(",")]
    if args.tiny:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), min(args.rounds, 2)
    init_megatron(cuda)

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
               "rounds": args.rounds, "warmup": args.warmup, "data": ["data.kind=mock", *args.data_overrides],
               "note": "peak_mem_gib is with the dense and the EPAS model both resident", "runs": []}
    for shape in models:
        results["runs"] += bench_shape(shape, fractions, args.warmup, args.steps, args.rounds, device, dtype,
                                       profile_steps=args.profile, micro_batch=args.micro_batch,
                                       data_overrides=tuple(args.data_overrides))

    print(f"\ndevice: {results['device']}  dtype: {results['dtype']}  median of {args.rounds} rounds x {args.steps} "
          f"steps per variant (variants interleaved; peak memory with both models resident)")
    print(f"{'model':<11} {'variant':<10} {'tok/s':>10} {'step ms':>8} {'vs r=0':>7} {'ideal':>6} {'peak GiB':>9}")
    for r in results["runs"]:
        if "error" in r:
            print(f"{r['model']:<11} {r['variant']:<10} ERROR {r['error'][:90]}")
            continue
        peak = r["peak_mem_gib"]
        print(f"{r['model']:<11} {r['variant']:<10} {r['tokens_per_s']:>10.0f} {r['step_s'] * 1e3:>8.1f} "
              f"{r.get('speedup_vs_region0', float('nan')):>7.3f} {r.get('ideal_speedup_vs_region0', float('nan')):>6.3f} "
              f"{peak if peak is not None else float('nan'):>9.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
