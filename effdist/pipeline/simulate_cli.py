"""`effdist simulate`: predict per-rank activation memory, bubbles and makespan of pipeline schedules.

    effdist simulate --schedule v-half --pp 4 --microbatches 16
    effdist simulate --compare 1f1b,interleaved,zb-h1,v-min,v-half,v-zb --pp 4 --microbatches 16 \
        --model configs/llama-1b.yaml --json out.json --svg out.svg --png out.png

Exit status 0 on success, 2 on invalid arguments (with a message saying which and why).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from effdist.pipeline.ir import ScheduleError
from effdist.pipeline.schedules import SCHEDULE_NAMES, build_schedule
from effdist.pipeline.simulate import Costs, SimulationResult, simulate
from effdist.runtime.cli_parser import ArgumentParser
from effdist.runtime.lifecycle import output_file_problem

GIB = 1024 ** 3
# pp x microbatches x chunks per rank above which one simulation takes minutes and gigabytes (1f1b at pp=8 with
# 100,000 microbatches, 800,000 of them: about 40 s and 0.8 GB on one core); the bubble and the peak settle after a
# few times pp microbatches, so nothing is learned beyond it.
MAX_CHUNK_PASSES = 1_000_000


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="effdist simulate",
        description="Simulate pipeline schedules: peak activation memory per rank (units of one microbatch on one "
                    "1F1B stage, and bytes with --model), bubble rate and makespan.")
    p.add_argument("--schedule", help=f"one of: {', '.join(SCHEDULE_NAMES)}")
    p.add_argument("--compare", help="comma-separated schedules to simulate side by side, e.g. 1f1b,v-half,v-min")
    p.add_argument("--pp", type=int, required=True, help="pipeline ranks (>= 2)")
    p.add_argument("--microbatches", type=int, required=True, help="microbatches per step (>= 1)")
    p.add_argument("--chunks-per-rank", type=int, default=None,
                   help="model chunks per rank for interleaved (default 2); V schedules always use 2")
    p.add_argument("--cost-f", type=float, default=1.0, help="forward time of one microbatch on one 1F1B stage")
    p.add_argument("--cost-b", type=float, default=1.0, help="input-gradient backward time (B)")
    p.add_argument("--cost-w", type=float, default=1.0, help="weight-gradient time (W); a fused BW takes B + W")
    p.add_argument("--cost-comm", type=float, default=0.0, help="P2P latency between ranks")
    p.add_argument("--b-frees", type=float, default=0.0,
                   help="fraction of a chunk's activation freed by B (the rest by W); default 0 frees all at W")
    p.add_argument("--model", help="effdist YAML config: adds peak activation bytes (hidden, seq, micro-batch, layers, TP, dtype)")
    p.add_argument("--calibration", help="calibration JSON (effdist calibrate) or a shipped table's name: with --model, "
                                         "F/B/W/comm costs in seconds for that model's layers (replaces --cost-*)")
    p.add_argument("--no-flash", action="store_true",
                   help="count the attention score matrices (5as/h term) as stored, as without flash/SDPA attention")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--svg", help="write a timeline picture (SVG) here")
    p.add_argument("--png", help="write a timeline picture (PNG, matplotlib) here")
    p.add_argument("--show-order", action="store_true", help="also print each rank's action list")
    return p


class _UsageError(ValueError):
    pass


def _schedule_names(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    if args.schedule:
        names.append(args.schedule.strip())
    if args.compare:
        names += [n.strip() for n in args.compare.split(",") if n.strip()]
    if not names:
        raise _UsageError("give --schedule NAME or --compare NAME,NAME,... "
                          f"(schedules: {', '.join(SCHEDULE_NAMES)})")
    unknown = [n for n in names if n not in SCHEDULE_NAMES]
    if unknown:
        raise _UsageError(f"unknown schedule {unknown[0]!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    return list(dict.fromkeys(names))


def _chunk_bytes(args: argparse.Namespace, name: str, num_chunks: int) -> list[float] | None:
    if not args.model:
        return None
    from effdist.config import ConfigError, load_config
    from effdist.pipeline.memory_model import chunk_activation_bytes, megatron_layer_bytes, shape_from_config

    try:
        cfg = load_config(args.model)
    except ConfigError as e:
        raise _UsageError(f"--model {args.model}: {e}") from None
    shape = shape_from_config(cfg, flash_attention=not args.no_flash)
    per_layer = megatron_layer_bytes(shape)
    try:
        return chunk_activation_bytes(shape.num_layers, num_chunks, lambda _: per_layer)
    except ValueError as e:
        raise _UsageError(f"--model {args.model} with {name}: {e}") from None


def _calibrated_costs(args: argparse.Namespace, names: list[str]) -> tuple[Costs, Callable[[int], list[Costs]]]:
    """From --calibration, for --model's layers: (seconds per 1F1B stage, every chunk charged as the slowest, with
    the chunking of the first schedule named: what the schedule generators and the title get, one Costs for every
    compared schedule; a function giving each chunk's own seconds for a schedule of n chunks: what the simulation
    runs, so the LM head and loss weigh on their own chunk only)."""
    from effdist.config import ConfigError, load_config
    from effdist.pipeline.calibration import (CalibrationError, final_region_layers, pipeline_chunk_costs,
                                              pipeline_costs, resolve)

    if not args.model:
        raise _UsageError("--calibration needs --model CONFIG (the layers whose measured times to use)")
    try:
        cfg = load_config(args.model)
        cal = resolve(args.calibration)
    except (ConfigError, CalibrationError) as e:
        raise _UsageError(str(e)) from None
    if cal.check_shape(cfg):  # as effdist plan says: the times are another model's, scaled by FLOPs
        print(f"note: the calibration {cal.path} was measured at another shape ({cal.shape_difference(cfg)}); layer "
              f"times are scaled by FLOPs to {args.model}")
    cfg.parallel.pp = args.pp
    chunks = args.chunks_per_rank or 2 if names[0] == "interleaved" or names[0].startswith("v-") else 1
    sharing = final_region_layers(cfg)

    def per_chunk(num_chunks: int) -> list[Costs]:
        try:
            return pipeline_chunk_costs(cal, cfg, num_chunks, cfg.train.micro_batch, sharing)
        except (CalibrationError, ValueError) as e:
            raise _UsageError(f"--calibration {args.calibration}: {e}") from None

    try:
        return pipeline_costs(cal, cfg, args.pp * chunks, cfg.train.micro_batch, sharing), per_chunk
    except (CalibrationError, ValueError) as e:
        raise _UsageError(f"--calibration {args.calibration}: {e}") from None


def _run(args: argparse.Namespace) -> list[SimulationResult]:
    names = _schedule_names(args)
    if args.pp < 2:
        raise _UsageError(f"--pp {args.pp}: a pipeline needs at least 2 ranks")
    if args.microbatches < 1:
        raise _UsageError(f"--microbatches {args.microbatches}: must be >= 1")
    if args.chunks_per_rank is not None:
        bad_v = [n for n in names if n.startswith("v-") and args.chunks_per_rank != 2]
        if bad_v:
            raise _UsageError(f"--chunks-per-rank {args.chunks_per_rank}: {bad_v[0]} uses the V shape, exactly 2 chunks "
                              "per rank; drop the flag or set it to 2")
        if args.chunks_per_rank < 1:
            raise _UsageError(f"--chunks-per-rank {args.chunks_per_rank}: must be >= 1")
    chunks = max(1 if n in ("1f1b", "zb-h1") else (args.chunks_per_rank or 2) if n == "interleaved" else 2
                 for n in names)
    # V-ZB builds at least 2p-1 microbatches whatever m is; count every schedule as if it did
    if args.pp * 2 * args.pp * chunks > MAX_CHUNK_PASSES:
        flag = f"--chunks-per-rank {chunks}" if args.pp * 2 * args.pp * 2 <= MAX_CHUNK_PASSES else f"--pp {args.pp}"
        raise _UsageError(f"{flag}: {args.pp} ranks x {chunks} chunk(s) per rank is more than the simulator handles "
                          f"({MAX_CHUNK_PASSES:,} chunk passes per step, at 2 x pp microbatches); lower it")
    if args.pp * args.microbatches * chunks > MAX_CHUNK_PASSES:
        fits = min(4 * args.pp, MAX_CHUNK_PASSES // (args.pp * chunks))
        raise _UsageError(f"--microbatches {args.microbatches}: {args.pp} ranks x {args.microbatches} microbatches x "
                          f"{chunks} chunk(s) per rank is more than {MAX_CHUNK_PASSES:,} chunk passes to simulate "
                          f"(minutes and gigabytes); the bubble and peak memory settle after a few times pp "
                          f"microbatches: use e.g. --microbatches {fits}")
    if not 0.0 <= args.b_frees <= 1.0:
        raise _UsageError(f"--b-frees {args.b_frees}: a fraction in [0, 1]")
    for flag, value, example in (("--json", args.json, "simulate.json"), ("--svg", args.svg, "timeline.svg"),
                                 ("--png", args.png, "timeline.png")):
        problem = output_file_problem(flag, value, example)  # before the simulation, not after it
        if problem:
            raise _UsageError(problem)
    per_chunk: Callable[[int], list[Costs]] | None = None
    try:
        if args.calibration:
            costs, per_chunk = _calibrated_costs(args, names)
        else:
            costs = Costs(args.cost_f, args.cost_b, args.cost_w, args.cost_comm)
    except ValueError as e:
        raise _UsageError(str(e).replace("Costs.forward", "--cost-f").replace("Costs.backward_input", "--cost-b")
                          .replace("Costs.backward_weight", "--cost-w").replace("Costs.comm", "--cost-comm")) from None
    results = []
    for name in names:
        v = args.chunks_per_rank if (name == "interleaved" and args.chunks_per_rank) else 2
        try:
            schedule = build_schedule(name, args.pp, args.microbatches, costs=costs, chunks_per_rank=v)
        except ScheduleError as e:
            raise _UsageError(str(e)) from None
        chunk_bytes = _chunk_bytes(args, name, schedule.num_chunks)
        chunk_costs = per_chunk(schedule.num_chunks) if per_chunk else None
        results.append(simulate(schedule, costs, b_frees=args.b_frees, chunk_bytes=chunk_bytes,
                                chunk_costs=chunk_costs))
    return results


def format_table(results: list[SimulationResult]) -> str:
    """One row per schedule: makespan, bubble, peak activation per rank (units), max peak in GiB if known."""
    pp = results[0].schedule.pp
    with_bytes = results[0].peak_activation_bytes is not None
    header = ["schedule", "makespan", "bubble"] + [f"r{r}" for r in range(pp)] + ["peak"] + (["peak GiB"] if with_bytes else [])
    rows = []
    for res in results:
        row = [res.schedule.name, f"{res.makespan:.6g}", f"{100 * res.bubble_rate:.1f}%"]
        row += [f"{r.peak_activation_units:g}" for r in res.ranks]
        row.append(f"{res.peak_activation_units:g}")
        if with_bytes:
            row.append(f"{res.peak_activation_bytes / GIB:.2f}")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    s = results[0].schedule
    c = results[0].costs
    which = "" if results[0].chunk_costs is None else \
        " of the slowest chunk per 1F1B stage (each chunk runs at its own)"
    title = (f"pp={pp} microbatches={s.num_microbatches} costs{which} F={c.forward:.4g} B={c.backward_input:.4g} "
             f"W={c.backward_weight:.4g} comm={c.comm:.4g}; peak activation per rank r0..r{pp - 1} in units of one "
             "microbatch on one 1F1B stage")
    return "\n".join([title, line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage or help
        return int(e.code or 0)
    try:
        results = _run(args)
    except _UsageError as e:
        print(f"effdist simulate: error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.show_order:
        for res in results:
            print(f"\n{res.schedule.name}:\n{res.schedule.describe()}")
    if args.json:
        payload: object
        if args.compare:
            payload = {"pp": args.pp, "microbatches": args.microbatches, "schedules": [r.to_dict() for r in results]}
        else:
            payload = results[0].to_dict()
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    written = [args.json] if args.json else []
    if args.svg:
        from effdist.pipeline.render import write_svg
        write_svg(results, args.svg, seconds=bool(args.calibration))
        written.append(args.svg)
    if args.png:
        from effdist.pipeline.render import write_png
        write_png(results, args.png, seconds=bool(args.calibration))
        written.append(args.png)
    if written:  # where to look, after the table
        print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
