"""`effdist plan`: choose tp x pp x dp, the pipeline schedule, micro-batch, recomputation, ZeRO-1, EPAS region and
FFN kind for a model on N GPUs under a memory budget, by predicted tokens/s.

    effdist plan --config llama-1b --gpus 8 --gpu-memory 80 [--nodes 1] [--global-batch 64] [--seq 2048] [--json]

For every candidate the planner predicts
  memory per rank: effdist.train.estimate (what `effdist train --dry-run` prints): weights, gradients,
      optimizer state (sharded over dp with ZeRO-1), peak activations from the schedule simulator, logits;
      the largest rank must fit the budget less `--reserve` (CUDA context, allocator slack, NCCL buffers).
  step time: per-layer forward / backward-input / backward-weight seconds from a calibration
      (`effdist calibrate`; effdist.pipeline.calibration), divided over tp, plus tensor-parallel collectives;
      with pp > 1 the schedule runs on those costs, each chunk with its own layers (the LM head and loss only on
      the last chunk), as the executor runs it (effdist.pipeline.executor_time: bubbles, B/W split, p2p sends and
      the waits for whole P2P batches), and gives the makespan; then the
      data-parallel gradient reduction (not overlapped: effdist reduces after the last backward) and the
      optimizer step (calibrated seconds per parameter).
What is not modelled is said in docs/plan.md (e.g. tp > 1 GEMM efficiency loss unless calibrated on several GPUs).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from effdist.config import FFN_KINDS, SCHEDULES, Config, ConfigError, load_config
from effdist.pipeline.calibration import (Calibration, CalibrationError, final_region_layers, pipeline_chunk_costs,
                                          resolve, ring_seconds, tp_comm_seconds)
from effdist.runtime.cli_parser import ArgumentParser
from effdist.runtime.lifecycle import output_file_problem
from effdist.train.estimate import (GIB, build_plan_schedule, estimate, parameters_per_stage, stage_chunks,
                                    total_parameters, validated_schedule)
from effdist.train.preflight import validate_run

# Microbatches the step-time simulation runs at most (a few times pp covers every schedule's warm-up and
# cool-down). Beyond, the step is simulated once more at twice as many, and every further microbatch adds the
# time per microbatch between the two: all six schedules are periodic between warm-up and cool-down, but the
# period is not always the slowest rank's F + B + W (summed over its chunks): V-Min idles in its steady state
# when F, B and W differ, and every schedule waits for the executor's P2P batches; the measured difference holds
# both.
TIMED_MICROBATCHES_PER_STAGE = 4
MIN_TIMED_MICROBATCHES = 16
DEFAULT_MICRO_BATCHES = (1, 2, 4, 8, 16)
DEFAULT_RESERVE_GIB = 2.0


@functools.lru_cache(maxsize=256)
def executor_model(name: str, pp: int, microbatches: int, chunks_per_rank: int):
    """The executor's timing structure of one schedule; the planner times it under many candidates' costs."""
    from effdist.pipeline.executor_time import ExecutorModel

    return ExecutorModel(validated_schedule(name, pp, microbatches, chunks_per_rank))


@dataclass(frozen=True)
class Choice:
    """One point of the search space."""

    tp: int
    pp: int
    dp: int
    schedule: str  # "none" for pp = 1
    micro_batch: int
    recompute: bool
    zero1: bool
    epas_region: float  # epas.final_region (0: EPAS off)
    ffn_kind: str

    def overrides(self, cfg: Config, global_batch: int | None, seq: int | None) -> list[str]:
        out = [f"parallel.tp={self.tp}", f"parallel.pp={self.pp}"]
        if self.tp > 1:
            out.append("parallel.sequence_parallel=true")
        elif cfg.parallel.sequence_parallel:
            out.append("parallel.sequence_parallel=false")
        if self.pp > 1:
            out.append(f"pipeline.schedule={self.schedule}")
        out += [f"train.micro_batch={self.micro_batch}", f"train.recompute={str(self.recompute).lower()}",
                f"optim.distributed_optimizer={str(self.zero1).lower()}"]
        if self.epas_region > 0:
            out += ["epas.enabled=true", f"epas.final_region={self.epas_region:g}"]
        elif cfg.epas.enabled:
            out.append("epas.enabled=false")
        if self.ffn_kind != cfg.ffn.kind:
            out.append(f"ffn.kind={self.ffn_kind}")
        if global_batch is not None:
            out.append(f"train.global_batch={global_batch}")
        if seq is not None:
            out.append(f"data.seq_length={seq}")
            if seq > cfg.model.max_position_embeddings:  # as candidate_config planned it
                out.append(f"model.max_position_embeddings={seq}")
        return out


@dataclass
class Plan:
    choice: Choice
    peak_mem_gib: float
    tokens_per_s: float
    step_s: float
    bubble: float
    parts_s: dict[str, float]  # compute, bubble, tp_comm, p2p_and_wait, dp_comm, optimizer
    overrides: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self.choice)
        d.update(peak_mem_gib=self.peak_mem_gib, tokens_per_s=self.tokens_per_s, step_s=self.step_s,
                 bubble=self.bubble, parts_s=self.parts_s, overrides=self.overrides)
        return d


@dataclass(frozen=True)
class Space:
    """What the user allows the planner to vary."""

    gpus: int
    nodes: int = 1
    schedules: tuple[str, ...] = SCHEDULES
    micro_batches: tuple[int, ...] = DEFAULT_MICRO_BATCHES
    recompute: tuple[bool, ...] = (False, True)
    zero1: tuple[bool, ...] = (False, True)
    epas_regions: tuple[float, ...] = (0.0,)
    ffn_kinds: tuple[str, ...] = ()  # empty: the config's
    max_tp: int | None = None

    @property
    def gpus_per_node(self) -> int:
        return self.gpus // self.nodes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_config(base: Config, c: Choice, global_batch: int | None, seq: int | None) -> Config:
    cfg = copy.deepcopy(base)
    cfg.parallel.tp, cfg.parallel.pp = c.tp, c.pp
    cfg.parallel.sequence_parallel = c.tp > 1
    if c.pp > 1:
        cfg.pipeline.schedule = c.schedule
    cfg.pipeline.microbatches = None
    cfg.train.micro_batch = c.micro_batch
    cfg.train.recompute = c.recompute
    cfg.optim.distributed_optimizer = c.zero1
    cfg.epas.enabled = c.epas_region > 0
    if c.epas_region > 0:
        cfg.epas.final_region = c.epas_region
    cfg.ffn.kind = c.ffn_kind
    if global_batch is not None:
        cfg.train.global_batch = global_batch
    if seq is not None:
        cfg.data.seq_length = seq
        cfg.model.max_position_embeddings = max(cfg.model.max_position_embeddings, seq)
    return cfg


def choices(base: Config, space: Space, global_batch: int) -> Iterable[Choice]:
    kinds = space.ffn_kinds or (base.ffn.kind,)
    for tp in _divisors(space.gpus_per_node):
        if space.max_tp is not None and tp > space.max_tp:
            continue
        for pp in _divisors(space.gpus // tp):
            dp = space.gpus // (tp * pp)
            schedules = ("none",) if pp == 1 else space.schedules
            for schedule in schedules:
                for mb in space.micro_batches:
                    if global_batch % (mb * dp):
                        continue
                    for recompute in space.recompute:
                        for zero1 in (space.zero1 if dp > 1 else (False,)):
                            for region in space.epas_regions:
                                for kind in kinds:
                                    yield Choice(tp, pp, dp, schedule, mb, recompute, zero1, region, kind)


def predict_step(cfg: Config, cal: Calibration, space: Space, dp: int) -> tuple[float, float, dict[str, float]]:
    """(step seconds, bubble fraction, parts) of one optimizer step for a valid candidate config."""
    from effdist.pipeline.simulate import rank_seconds

    m = cfg.microbatches_per_step(dp * cfg.parallel.tp * cfg.parallel.pp)
    sharing = final_region_layers(cfg)
    pp, tp = cfg.parallel.pp, cfg.parallel.tp
    ranks_per_node = space.gpus_per_node
    inter_node_pp = tp * pp > ranks_per_node  # megatron puts stages farthest apart: pp crosses nodes first
    name = cfg.pipeline.schedule
    chunks = 1 if pp == 1 else (cfg.pipeline.chunks_per_rank if name == "interleaved" else
                                (2 if name.startswith("v-") else 1))
    # Each chunk its own cost: only the chunk with the last layer runs the LM head and loss.
    chunk_costs = pipeline_chunk_costs(cal, cfg, pp * chunks, cfg.train.micro_batch, sharing, inter_node_pp)
    if pp == 1:  # microbatches one after another, no bubble
        only = chunk_costs[0]
        per_mb = only.forward + only.backward_input + only.backward_weight
        makespan = compute = m * per_mb
    else:
        timed = min(m, max(MIN_TIMED_MICROBATCHES, TIMED_MICROBATCHES_PER_STAGE * pp))
        cpr = chunks if name == "interleaved" else 2
        comm = chunk_costs[0].comm  # seconds per P2P message

        def makespan_at(microbatches: int) -> float:
            # The executor runs the schedule generated with equal costs (effdist.train.estimate builds the same one),
            # and waits as its NCCL transfers make it wait (executor_time.py: an action waits for every message of
            # the batch its input came in); `simulate` alone left 10-50% of the measured p=4 steps out.
            return executor_model(name, pp, microbatches, cpr).run(chunk_costs, comm).makespan

        schedule = validated_schedule(name, pp, timed, cpr)
        per_mb = max(rank_seconds(schedule, chunk_costs))  # the slowest rank's F + B + W over its chunks
        compute = m * per_mb
        makespan = makespan_at(timed)
        if m > timed:  # the steady state's time per microbatch, measured: see TIMED_MICROBATCHES_PER_STAGE
            longer = min(m, 2 * timed)
            makespan, before = makespan_at(longer), makespan
            makespan += (m - longer) * (makespan - before) / (longer - timed)
    bubble = max(0.0, 1.0 - compute / makespan) if makespan else 0.0
    tp_comm = m * 2 * tp_comm_seconds(cfg, cal, cfg.train.micro_batch) * cfg.model.num_layers / pp
    # Data-parallel gradient reduction of this rank's parameters (fp32 main grads), after the last backward.
    chunks_by_stage = stage_chunks(cfg, build_plan_schedule(cfg, dp * tp * pp, max_microbatches=1))
    params_per_rank = max(s.count for s in parameters_per_stage(cfg, chunks_by_stage))
    dp_inter_node = space.gpus > ranks_per_node and dp > 1
    gbps = cal.links["inter_node_gbps"] if dp_inter_node else cal.links["dp_gbps"]
    grad_bytes = 4.0 * params_per_rank
    if cfg.optim.distributed_optimizer:  # reduce-scatter the gradients, all-gather the bf16 weights
        dp_comm = ring_seconds(grad_bytes, dp, gbps, cal.links["latency_s"], all_reduce=False) + \
            ring_seconds(2.0 * params_per_rank, dp, gbps, cal.links["latency_s"], all_reduce=False)
        optimizer = cal.optimizer_s_per_param * params_per_rank / dp
    else:
        dp_comm = ring_seconds(grad_bytes, dp, gbps, cal.links["latency_s"], all_reduce=True)
        optimizer = cal.optimizer_s_per_param * params_per_rank
    step = makespan + dp_comm + optimizer
    parts = {"compute": compute - tp_comm, "tp_comm": tp_comm, "bubble_and_p2p": makespan - compute,
             "dp_comm": dp_comm, "optimizer": optimizer}
    return step, bubble, parts


def plan(base: Config, cal: Calibration, space: Space, gpu_memory_gib: float, global_batch: int | None = None,
         seq: int | None = None, reserve_gib: float = DEFAULT_RESERVE_GIB) -> tuple[list[Plan], list[Plan]]:
    """(plans that fit, best first; plans that do not fit, smallest memory first)."""
    gb = global_batch or base.train.global_batch
    budget = (gpu_memory_gib - reserve_gib) * GIB
    fitting, over = [], []
    seen_memory: dict[Any, float] = {}
    for c in choices(base, space, gb):
        cfg = candidate_config(base, c, global_batch, seq)
        try:
            validate_run(cfg, world_size=space.gpus)
        except ConfigError:
            continue
        mem_key = (c.tp, c.pp, c.schedule, c.micro_batch, c.recompute, c.zero1, c.ffn_kind, c.dp)
        if mem_key not in seen_memory:
            seen_memory[mem_key] = estimate(cfg, space.gpus, on_gpu=True,
                                            max_microbatches=max(MIN_TIMED_MICROBATCHES, 4 * c.pp)).peak.total
        peak = seen_memory[mem_key]
        step, bubble, parts = predict_step(cfg, cal, space, c.dp)
        tokens = cfg.train.global_batch * cfg.data.seq_length
        p = Plan(c, peak / GIB, tokens / step, step, bubble, parts, c.overrides(base, global_batch, seq))
        (fitting if peak <= budget else over).append(p)
    fitting.sort(key=lambda p: (-p.tokens_per_s, p.peak_mem_gib))
    over.sort(key=lambda p: p.peak_mem_gib)
    return fitting, over


# ---------------------------------------------------------------------------- explaining

def _label(c: Choice) -> str:
    s = f"tp{c.tp} pp{c.pp} dp{c.dp}"
    if c.pp > 1:
        s += f" {c.schedule}"
    s += f" mb{c.micro_batch}"
    if c.recompute:
        s += " recompute"
    if c.zero1:
        s += " zero1"
    if c.epas_region > 0:
        s += f" epas{c.epas_region:g}"
    return s


PART_NAMES = {"compute": "compute (on the slowest pipeline stage)", "tp_comm": "tensor-parallel collectives", "bubble_and_p2p": "pipeline bubble",
              "dp_comm": "gradient all-reduce", "optimizer": "optimizer step"}


def why_first_wins(plans: list[Plan]) -> str:
    """One sentence: the best plan against the best plan of another layout (tp, pp) and what makes the difference."""
    best = plans[0]
    other = next((p for p in plans[1:] if (p.choice.tp, p.choice.pp) != (best.choice.tp, best.choice.pp)), None)
    one_layout = other is None
    if other is None:
        other = plans[1] if len(plans) > 1 else None
    if other is None:
        return f"{_label(best.choice)} is the only plan that fits."
    diffs = {k: other.parts_s[k] - best.parts_s[k] for k in best.parts_s}
    key = max(diffs, key=diffs.get)
    by = f"by {100 * (best.tokens_per_s / other.tokens_per_s - 1):.1f}%"
    if one_layout:  # no other layout fits: the runner-up differs in schedule, micro-batch, recompute or ZeRO-1
        versus = (f"the runner-up, {_label(other.choice)}, {by} ({best.choice.tp}x{best.choice.pp} is the only "
                  f"tp x pp layout that fits)")
    else:
        versus = f"the best {other.choice.tp}x{other.choice.pp} (tp x pp) layout, {_label(other.choice)}, {by}"
    return (f"{_label(best.choice)} beats {versus}: "
            f"{1e3 * diffs[key]:.1f} ms less {PART_NAMES[key]} per step "
            f"({1e3 * best.parts_s[key]:.1f} vs {1e3 * other.parts_s[key]:.1f} ms).")


def format_table(plans: list[Plan], limit: int = 10) -> str:
    header = ["#", "tp", "pp", "dp", "schedule", "mb", "recomp", "zero1", "epas", "ffn", "tokens/s", "step ms",
              "bubble", "peak GiB"]
    rows = []
    for i, p in enumerate(plans[:limit], 1):
        c = p.choice
        rows.append([str(i), str(c.tp), str(c.pp), str(c.dp), c.schedule, str(c.micro_batch), "yes" if c.recompute else "no",
                     "yes" if c.zero1 else "no", f"{c.epas_region:g}", c.ffn_kind, f"{p.tokens_per_s:,.0f}",
                     f"{1e3 * p.step_s:.1f}", f"{100 * p.bubble:.1f}%", f"{p.peak_mem_gib:.1f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in [header] + rows)


# ---------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist plan", description="Choose the parallel layout and pipeline schedule "
                       "for a model under a memory budget, by predicted tokens/s (docs/plan.md).")
    p.add_argument("--config", required=True, help="model config: a YAML path or a preset name (effdist presets)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override a config value (repeatable)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in total")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (tensor parallelism stays "
                   "within a node)")
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GIB", help="memory of one GPU in GiB, e.g. 80")
    p.add_argument("--reserve", type=float, default=DEFAULT_RESERVE_GIB, metavar="GIB",
                   help=f"memory kept free per GPU for the CUDA context, allocator and NCCL (default {DEFAULT_RESERVE_GIB})")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step (default: the config's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the config's)")
    p.add_argument("--calibration", default=None,
                   help="calibration JSON from `effdist calibrate`, or a shipped one's name (default: the shipped "
                        "h100 table for this preset)")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="pipeline schedules allowed (comma-separated)")
    p.add_argument("--micro-batches", default=",".join(map(str, DEFAULT_MICRO_BATCHES)), help="micro-batch sizes allowed")
    p.add_argument("--no-recompute", action="store_true", help="never propose activation recomputation")
    p.add_argument("--no-zero", action="store_true", help="never propose the distributed optimizer (ZeRO-1)")
    p.add_argument("--epas-regions", default="0", help="EPAS final regions allowed, fractions of the layers "
                   "(e.g. 0,0.5,0.75; 0 = EPAS off)")
    p.add_argument("--ffn-kinds", default="", help="FFN kinds allowed (default: the config's)")
    p.add_argument("--max-tp", type=int, default=None, help="largest tensor-parallel size to consider")
    p.add_argument("--top", type=int, default=10, help="plans to print")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help='write {"plans": [...]} (best first) to FILE, or to stdout without a FILE')
    return p


def _default_calibration(cfg: Config) -> str:
    from effdist.pipeline.calibration import shipped_names

    name = f"h100-{cfg.model.name}"
    if name in shipped_names():
        return name
    raise CalibrationError(f"--calibration: none given and no shipped table for model {cfg.model.name!r} "
                           f"(shipped: {', '.join(shipped_names()) or 'none'}); run `effdist calibrate --config ... "
                           "--out cal.json` on the GPU and pass --calibration cal.json")


def _fail(msg: str) -> int:
    print(f"effdist plan: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:

    args = _parser().parse_args(argv)
    if args.gpus < 1:
        return _fail(f"--gpus {args.gpus}: must be >= 1")
    if args.nodes < 1 or args.gpus % args.nodes:
        return _fail(f"--nodes {args.nodes}: must divide --gpus {args.gpus} (the same GPUs on every node)")
    if not (math.isfinite(args.reserve) and args.reserve >= 0):
        return _fail(f"--reserve {args.reserve}: GiB kept free on each GPU, a finite number >= 0")
    if not math.isfinite(args.gpu_memory):
        return _fail(f"--gpu-memory {args.gpu_memory}: the memory of one GPU in GiB, e.g. 80")
    if not args.gpu_memory > args.reserve:
        return _fail(f"--gpu-memory {args.gpu_memory}: must exceed --reserve {args.reserve} GiB")
    if args.top < 1:
        return _fail(f"--top {args.top}: plans to print, >= 1")
    problem = output_file_problem("--json", args.json, "plans.json")  # before the search, not after it
    if problem:
        return _fail(problem)
    if args.max_tp is not None and args.max_tp < 1:
        return _fail(f"--max-tp {args.max_tp}: must be >= 1")
    for flag, value in (("--global-batch", args.global_batch), ("--seq", args.seq)):
        if value is not None and value < 1:
            return _fail(f"{flag} {value}: must be >= 1")
    try:
        mbs = tuple(int(x) for x in args.micro_batches.split(",") if x.strip())
        regions = tuple(float(x) for x in args.epas_regions.split(",") if x.strip())
    except ValueError as e:
        return _fail(f"--micro-batches / --epas-regions: {e}; give comma-separated numbers")
    if not mbs or min(mbs) < 1:
        return _fail(f"--micro-batches {args.micro_batches}: give positive integers")
    if not regions or any(not 0 <= r < 1 for r in regions):
        return _fail(f"--epas-regions {args.epas_regions}: fractions in [0, 1), e.g. 0,0.5,0.75")
    schedules = tuple(s.strip() for s in args.schedules.split(",") if s.strip())
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad or not schedules:
        return _fail(f"--schedules {args.schedules}: valid: {', '.join(SCHEDULES)}")
    try:
        cfg = load_config(args.config, args.overrides)
        validate_run(cfg)  # the world-size checks are each candidate's
        cal = resolve(args.calibration or _default_calibration(cfg))
    except (ConfigError, CalibrationError) as e:
        return _fail(str(e))
    layers = cfg.model.num_layers
    empty = [r for r in regions if 0 < r and math.floor(r * layers) < 1]  # as epas.final_region rounds
    if empty:
        return _fail(f"--epas-regions {args.epas_regions}: {empty[0]:g} of {layers} layers rounds down to 0 sharing "
                     f"layers; give fractions of at least 1/{layers} (0 alone keeps EPAS off)")
    kinds = tuple(k.strip() for k in args.ffn_kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FFN_KINDS]
    if unknown:
        return _fail(f"--ffn-kinds {args.ffn_kinds}: {', '.join(unknown)} unknown; valid: {', '.join(FFN_KINDS)}")
    space = Space(gpus=args.gpus, nodes=args.nodes, schedules=schedules, micro_batches=mbs,
                  recompute=(False,) if args.no_recompute else (False, True),
                  zero1=(False,) if args.no_zero else (False, True), epas_regions=regions, ffn_kinds=kinds,
                  max_tp=args.max_tp)
    try:
        fitting, over = plan(cfg, cal, space, args.gpu_memory, args.global_batch, args.seq, args.reserve)
    except CalibrationError as e:
        return _fail(str(e))
    gb = args.global_batch or cfg.train.global_batch
    seq = args.seq or cfg.data.seq_length
    if args.json == "-":
        print(json.dumps({"plans": [p.to_dict() for p in fitting]}, indent=1))
        return 0 if fitting else 1
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"plans": [p.to_dict() for p in fitting]}, indent=1) + "\n")
    print(f"effdist plan: {cfg.model.name} ({total_parameters(cfg) / 1e9:.2f}B parameters), {args.gpus} GPU(s) on "
          f"{args.nodes} node(s), {args.gpu_memory:g} GiB each ({args.reserve:g} kept free), global batch {gb} x "
          f"sequence {seq}; calibration {cal.path} ({cal.device}, {cal.date or 'undated'})")
    shaped = copy.deepcopy(cfg)
    shaped.data.seq_length = seq
    if cal.check_shape(shaped):
        print(f"  note: the calibration was measured at another shape ({cal.shape_difference(shaped)}); layer times "
              "are scaled by FLOPs")
    if not fitting:
        if not over:
            print("no valid layout: no tp x pp x dp with these micro-batches divides the global batch and the model "
                  "(try other --micro-batches or --global-batch)")
            return 1
        least = over[0]
        print(f"nothing fits in {args.gpu_memory - args.reserve:g} GiB per GPU: the smallest need is "
              f"{least.peak_mem_gib:.1f} GiB per rank, with {_label(least.choice)}; closest: "
              + " ".join(f"--set {o}" for o in least.overrides)
              + ". More GPUs, a larger --gpu-memory, or allowing recompute / ZeRO-1 / pp lowers it.")
        return 1
    print(f"{len(fitting)} plan(s) fit ({len(over)} over budget); the best {min(args.top, len(fitting))}:")
    print(format_table(fitting, args.top))
    print(why_first_wins(fitting))
    parts = ", ".join(f"{PART_NAMES[k]} {1e3 * v:.1f} ms" for k, v in fitting[0].parts_s.items() if v > 0)
    print(f"predicted step {1e3 * fitting[0].step_s:.1f} ms: {parts}")
    print("run it with: " + " ".join(f"--set {o}" for o in fitting[0].overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
