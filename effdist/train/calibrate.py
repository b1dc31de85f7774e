"""`effdist calibrate`: measure on this GPU what the planner's time model needs (see effdist.pipeline.calibration
for what is measured and the file format).

    effdist calibrate --config llama-1b --micro-batches 1,2,4,8 --variants dense,epas --out cal.json
    torchrun --nproc_per_node 8 -m effdist.cli calibrate --config llama-1b --out cal.json   # + link bandwidths

With several processes every rank takes part in timing an all-reduce and a send (the `links` entry); then
rank 0 alone measures the layers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import statistics
import sys
import time

from effdist.pipeline.calibration import (TIMINGS, VARIANTS, Calibration, CalibrationError, HeadCost, LayerCost,
                                          model_shape, weight_grad_fraction)
from effdist.runtime.cli_parser import ArgumentParser


def _variant_config(cfg, variant: str):
    import copy

    c = copy.deepcopy(cfg)
    c.epas.enabled = variant == "epas"
    if variant not in ("dense", "epas"):
        c.ffn.kind = variant
        c.ffn.layers = None
    return c


def _time(fn, reps: int, cuda: bool) -> float:
    return statistics.median(_times(fn, reps, cuda))


def _times(fn, reps: int, cuda: bool, warmup: int = 2) -> list[float]:
    """Wall seconds of `reps` calls of fn, after `warmup` untimed ones (allocator, autotuning, lazy init)."""
    import torch

    times = []
    for i in range(reps + warmup):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


@functools.cache
def _sleep_cycles_per_second() -> float:
    """The rate of torch.cuda._sleep on this GPU (its argument is clock cycles), timed with CUDA events."""
    import torch

    cycles = 1 << 24
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


# Tries of one call with the host ahead (the GPU's lead doubled after each try it proved too short for).
HOST_AHEAD_TRIES = 6


def _gpu_time(fn, lead: list[float]) -> tuple[float, bool]:
    """(GPU seconds of one call of fn with the host ahead, whether the host stayed ahead). The GPU sleeps for
    lead[0] seconds (torch.cuda._sleep) while the host queues fn's kernels, CUDA events bracket them, and the
    start event not yet passed when fn returns shows that the GPU never waited for the host inside the span.
    Where it had passed, the lead (a one-element list the caller keeps between calls) is doubled, or set from
    the host's queueing time, and the call timed again; after HOST_AHEAD_TRIES the last span is kept (then it
    also counts host gaps, as wall timing does: a call that synchronizes inside cannot be timed otherwise)."""
    import torch

    rate = _sleep_cycles_per_second()
    for _ in range(HOST_AHEAD_TRIES):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(max(1, int(lead[0] * rate)))
        start.record()
        t0 = time.perf_counter()
        fn()
        host_s = time.perf_counter() - t0
        ahead = not start.query()
        end.record()
        end.synchronize()
        span = start.elapsed_time(end) / 1e3
        if ahead:
            return span, True
        lead[0] = max(2 * lead[0], 1.5 * host_s)
    return span, False


def _model_steps(cfg, variant: str, num_layers: int, micro_batch: int, device, dtype):
    """(forward, forward + backward) callables of one microbatch through a `num_layers` model of `variant`."""
    import torch

    from effdist.model.gpt import build_gpt

    c = _variant_config(cfg, variant)
    c.model.num_layers = num_layers
    model = build_gpt(c.model, c.parallel, c.train, c.ffn, c.epas, dtype, device)
    if variant == "epas":
        from effdist.model.shared_qk import apply_region

        apply_region([model], range(1, num_layers))
    seq = c.data.seq_length
    tokens = torch.randint(0, c.model.vocab_size, (micro_batch, seq), device=device)
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(micro_batch, -1)

    def forward():
        with torch.no_grad():
            model(tokens, position_ids, None, labels=tokens)

    def forward_backward():
        model(tokens, position_ids, None, labels=tokens).float().mean().backward()

    return forward, forward_backward


def measure_layer_pair(cfg, variant: str, layers: tuple[int, int], micro_batch: int, reps: int, device,
                       dtype, timing: str = "wall", host_behind=None) -> tuple[float, float, float, float]:
    """(layer forward, layer backward, head forward, head backward) seconds from a shallow and a deep model of
    `variant`, timed in alternation: each repetition times the shallow and the deep model back to back and the
    layer costs are the median of those paired differences, so a drift in between (GPU clocks ramping up at the
    first measurement, another process) cancels instead of landing in one model's time. Unpaired medians, the
    first method, gave a llama-1b micro-batch 1 layer forward of 0.0 ms on an H100 (docs/benchmarks.md).
    `timing` is "wall" or "gpu" (effdist.pipeline.calibration's docstring); with "gpu", `host_behind` (a list)
    gets one entry per call the host could not stay ahead of."""
    l1, l2 = layers
    cuda = device.type == "cuda"
    shallow = _model_steps(cfg, variant, l1, micro_batch, device, dtype)
    deep = _model_steps(cfg, variant, l2, micro_batch, device, dtype)
    for steps in (shallow, deep):  # untimed warm-ups of all four
        for fn in steps:
            _times(fn, 0, cuda)
    lead = [1e-3]  # seconds the GPU sleeps ahead of a call timed with "gpu" (grown by _gpu_time)

    def once(fn) -> float:
        if timing == "gpu":
            span, ahead = _gpu_time(fn, lead)
            if not ahead and host_behind is not None:
                host_behind.append(span)
            return span
        return _times(fn, 1, cuda, warmup=0)[0]

    rows = []
    for _ in range(reps):
        f1, f2 = once(shallow[0]), once(deep[0])
        fb1, fb2 = once(shallow[1]), once(deep[1])
        rows.append((f1, fb1, (f2 - f1) / (l2 - l1), ((fb2 - f2) - (fb1 - f1)) / (l2 - l1)))
    f1, fb1, fwd, bwd = (statistics.median(r[i] for r in rows) for i in range(4))
    return fwd, bwd, f1 - l1 * fwd, (fb1 - f1) - l1 * bwd


def measure_optimizer(device, params: int = 64 * 2**20, reps: int = 5) -> float:
    """Seconds per parameter of torch's fused/foreach AdamW step over fp32 master weights."""
    import torch

    chunk = 2**22
    weights = [torch.zeros(chunk, device=device, requires_grad=True) for _ in range(max(1, params // chunk))]
    for w in weights:
        w.grad = torch.randn_like(w)
    opt = torch.optim.AdamW(weights, lr=1e-4, fused=device.type == "cuda")
    t = _time(opt.step, reps, device.type == "cuda")
    return t / (chunk * len(weights))


# Tries of one (variant, micro-batch) measurement, each with twice the repetitions of the one before, until every
# derived time is positive.
MEASURE_TRIES = 3


def refuses_nonphysical_times(device) -> bool:
    """Whether a layer time still at or below zero after MEASURE_TRIES tries stops calibrate. On a GPU it does: that
    table would steer the planner. On a CPU the tiny model's layers cost less than the scheduler's noise on a busy
    machine (a top-k backward of -26 ms on a 2-core CI runner once), and a CPU table is for trying the planner, not
    for planning a GPU job: the time is kept at 1 ns with one warning."""
    return device.type == "cuda"


def _physical_layer_costs(cfg, variant: str, layers: tuple[int, int], micro_batch: int, reps: int, device,
                          dtype, warn=None, timing: str = "wall") -> tuple[float, float, float, float]:
    """measure_layer_pair until the layer's forward and backward come out positive: timing noise larger than the
    deep model's extra layers gives a difference at or below zero, which no layer costs. Still so after
    MEASURE_TRIES tries: CalibrationError on a GPU, naming the measurement and what to change, rather than a table
    the planner would trust (on a CPU, see refuses_nonphysical_times: `warn` gets one line and the time is kept
    at 1 ns). The head's times are the intercept of the same fit (the shallow model less its layers), which the
    fit's own error can put below zero on a tiny model: those are kept at 1 ns, as before."""
    for attempt in range(MEASURE_TRIES):
        behind: list[float] = []
        fwd, bwd, head_f, head_b = measure_layer_pair(cfg, variant, layers, micro_batch, reps << attempt, device,
                                                      dtype, timing, behind)
        if behind and warn is not None:
            warn(f"{variant} micro-batch {micro_batch}: the host fell behind the GPU in {len(behind)} timed calls "
                 f"even after {HOST_AHEAD_TRIES} tries of a longer lead; those count host gaps, as --timing wall does")
        if min(fwd, bwd) > 0:
            return fwd, bwd, max(head_f, 1e-9), max(head_b, 1e-9)
    bad = ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in (("layer forward", fwd), ("layer backward", bwd)) if t <= 0)
    measured = f"{variant} micro-batch {micro_batch}: {bad} after {MEASURE_TRIES} tries of up to " \
               f"{reps << (MEASURE_TRIES - 1)} repetitions"
    if not refuses_nonphysical_times(device):
        if warn is not None:
            warn(f"{measured} on the CPU, kept at 1 ns: the timing noise here is larger than "
                 f"{layers[1] - layers[0]} layers' work (a CPU table is for trying the planner, not for planning)")
        return max(fwd, 1e-9), max(bwd, 1e-9), max(head_f, 1e-9), max(head_b, 1e-9)
    raise CalibrationError(f"{measured}: the timing noise on this device is larger than "
                           f"{layers[1] - layers[0]} layers' work; rerun with a larger --reps, or leave micro-batch "
                           f"{micro_batch} out of --micro-batches")


def calibrate(cfg, micro_batches: list[int], variants: list[str], reps: int = 5, layers: tuple[int, int] = (2, 6),
              progress=None, command: str = "", warn=None, timing: str = "wall") -> Calibration:
    """Measure every (variant, micro-batch) on this process's device; see the module docstring. `timing`: "wall"
    (the default) or "gpu" (effdist.pipeline.calibration's docstring says which the planner follows)."""
    import torch

    from effdist.runtime.distributed import choose_device, choose_dtype, one_process_megatron

    device, _ = choose_device(cfg)
    dtype = choose_dtype(cfg, device)
    cuda = device.type == "cuda"
    if timing == "gpu" and not cuda:
        raise CalibrationError("--timing gpu needs a CUDA GPU (it times CUDA events); on the CPU use --timing wall")
    l1, l2 = layers
    rows, heads = [], []
    total = len(variants) * len(micro_batches)
    done = 0
    with one_process_megatron(cuda=cuda, seed=cfg.train.seed):
        for variant in variants:
            for mb in micro_batches:
                fwd, bwd, head_f, head_b = _physical_layer_costs(cfg, variant, (l1, l2), mb, reps, device, dtype,
                                                                 warn, timing)
                rows.append(LayerCost(variant, mb, fwd, bwd, weight_grad_fraction(_variant_config(cfg, variant), variant)))
                if variant == variants[0]:
                    heads.append(HeadCost(mb, head_f, head_b))
                done += 1
                if progress is not None:
                    progress(done, total, f"{variant} micro-batch {mb}: layer forward {fwd * 1e3:.2f} ms, "
                                          f"backward {bwd * 1e3:.2f} ms")
        opt = measure_optimizer(device, params=64 * 2**20 if cuda else 2**22)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    shape = model_shape(cfg)
    shape["dtype"] = str(dtype).replace("torch.", "")
    return Calibration(device=name, model=shape, layers=rows, head=heads, optimizer_s_per_param=opt,
                       date=_dt.date.today().isoformat(), command=command, timing=timing)


def measure_links(nbytes: int = 256 * 2**20, reps: int = 5) -> dict | None:
    """Under torchrun with several processes: the bus bandwidth of an all-reduce over all ranks (what tensor- and
    data-parallel groups within a node see) and of a send from rank 0 to rank 1 (pipeline p2p), and the latency
    of a 4-byte all-reduce. Returns the `links` entry on rank 0 (None elsewhere or with one process)."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    try:
        dtype = torch.bfloat16 if cuda else torch.float32  # gloo has no bf16 all-reduce
        big = torch.ones(nbytes // dtype.itemsize, dtype=dtype, device=device)  # nbytes on either
        tiny = torch.ones(1, device=device)
        nbytes_big = big.numel() * big.element_size()

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def timed(fn) -> float:
            fn()
            sync()
            dist.barrier()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        t_ar = timed(lambda: dist.all_reduce(big))
        t_lat = timed(lambda: dist.all_reduce(tiny))

        def p2p():
            if rank == 0:
                dist.send(big, 1)
            elif rank == 1:
                dist.recv(big, 0)

        t_p2p = timed(p2p)
        t_p2p = torch.tensor([t_p2p], dtype=torch.float64)
        dist.broadcast(t_p2p, 1)  # the receiver's time includes the transfer
        busbw = 2 * (world - 1) / world * nbytes_big / t_ar / 1e9
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        links = {"tp_gbps": busbw, "dp_gbps": busbw, "p2p_gbps": nbytes_big / float(t_p2p.item()) / 1e9,
                 "latency_s": t_lat / max(1, world - 1),
                 "source": f"measured: all-reduce of {nbytes_big >> 20} MiB over {world} ranks "
                           f"({'nccl' if cuda else 'gloo'}), send rank 0 -> 1"}
        if local < world:
            links["inter_node_gbps"] = busbw
            links["source"] += f"; {world // local} nodes: inter_node_gbps is this all-reduce's bus bandwidth"
        return links if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist calibrate",
                       description="Measure per-layer forward/backward times, the head and the optimizer "
                                   "step on this GPU for `effdist plan` and `effdist simulate --calibration`.")
    p.add_argument("--config", required=True, help="model config (YAML or a preset name such as llama-1b)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override a config value (repeatable)")
    p.add_argument("--micro-batches", default="1,2,4,8",
                   help="micro-batch sizes to measure, comma-separated (default: 1,2,4,8)")
    p.add_argument("--variants", default="dense,epas",
                   help=f"layer variants to measure, from: {', '.join(VARIANTS)} (dense = the config's FFN kind; "
                        "default: dense,epas)")
    p.add_argument("--reps", type=int, default=5,
                   help="timed repetitions per measurement, their median kept (default: 5)")
    p.add_argument("--timing", choices=TIMINGS, default="wall",
                   help="wall (default): wall clock around synchronized calls, host launch time included, what "
                        "the planner's pp=1 steps follow; gpu: CUDA events with the host ahead, the GPU's work "
                        "alone (a GPU only; docs/benchmarks.md, \"Timing the layers\", compares the two)")
    p.add_argument("--out", required=True, help="where to write the calibration JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    from effdist.config import ConfigError, load_config, validate

    args = _parser().parse_args(argv)
    try:
        mbs = [int(x) for x in args.micro_batches.split(",") if x.strip()]
        if not mbs or min(mbs) < 1:
            raise ValueError
    except ValueError:
        print(f"effdist calibrate: --micro-batches {args.micro_batches!r}: give positive integers, e.g. 1,2,4,8",
              file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        print(f"effdist calibrate: --variants {args.variants!r}: valid: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print(f"effdist calibrate: --reps {args.reps}: must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)
    except ConfigError as e:
        print(f"effdist calibrate: config error: {e}", file=sys.stderr)
        return 2

    def progress(done: int, total: int, what: str) -> None:
        print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

    argv = sys.argv[1:] if argv is None else argv
    if int(os.environ.get("RANK", "0")) == 0:  # what is measured, before the first (slow) measurement
        import torch

        where = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
                 "the CPU: no CUDA GPU here, so these times will not describe a GPU (calibrate where you will train)")
        print(f"effdist calibrate: {cfg.model.name}, micro-batches {','.join(map(str, mbs))}, variants "
              f"{','.join(variants)}, on {where}", file=sys.stderr, flush=True)
    links = measure_links()
    if links is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0  # ranks other than 0 only take part in the link measurement
    try:
        cal = calibrate(cfg, mbs, variants, reps=args.reps, progress=progress, timing=args.timing,
                        command="effdist calibrate " + " ".join(argv),
                        warn=lambda line: print(f"effdist calibrate: warning: {line}", file=sys.stderr, flush=True))
    except CalibrationError as e:
        print(f"effdist calibrate: {e}; nothing written", file=sys.stderr)
        return 1
    if links is not None:
        cal.links = {**cal.links, **links}
    path = cal.save(args.out)
    print(f"effdist calibrate: {len(cal.layers)} layer measurements on {cal.device} -> {path}")
    return 0
