"""`effdist train --dry-run` and `--print-config`: what a config will do, before paying for it.

The dry run validates the config for a world size (`--world-size N`, default: the launcher's WORLD_SIZE, else
tp x pp), then prints what differs from the preset, the rank layout, the pipeline schedule and a per-rank
memory estimate (effdist.train.estimate), checks the sizes against the device (or host) memory as a real start
would, and exits: 0 when everything fits, 2 with one named line when not. It starts no process group, builds
no model and touches no data. `--print-config` writes the resolved YAML to stdout (it loads back to the same
config).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from effdist.config import Config, ConfigError, ffn_width, load_config, padded_vocab_size
from effdist.train.estimate import (GIB, Estimate, MemoryLimit, check_fits, estimate, fits, memory_limit,
                                    rank_layout, total_parameters, uses_gpu, weight_bytes)
from effdist.train.preflight import validate_run

# Rank rows printed at most (a 1024-GPU layout is regular; the first rows show the pattern).
MAX_RANK_ROWS = 16
# Pipeline orders printed only for steps this short (one line per rank).
MAX_ORDER_MICROBATCHES = 8


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(preset: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, preset value, resolved value) for every key the overrides changed."""
    before, after = _flatten(preset.to_dict()), _flatten(cfg.to_dict())
    return [(k, before.get(k), v) for k, v in after.items() if before.get(k) != v]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return ["  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]


def _ranks_text(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{','.join(map(str, ranks[:8]))},..."


def _span(layers: range) -> str:
    return f"{layers.start}-{layers.stop - 1}" if len(layers) > 1 else f"{layers.start}"


def report(cfg: Config, world_size: int, est: Estimate, limit: MemoryLimit | None, source: str,
           changes: list[tuple[str, Any, Any]]) -> str:
    """The dry run's text (everything but the final verdict)."""
    m, par = cfg.model, cfg.parallel
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else ("bf16" if est.on_gpu else "fp32")
    lines = [f"effdist dry run: {source} (name {cfg.name}), {world_size} process(es) on "
             f"{'GPU' if est.on_gpu else 'CPU'}, {dtype}, engine {cfg.train.engine}"]
    if changes:
        lines.append(f"config: {len(changes)} key(s) differ from {source}:")
        lines += [f"  {k}: {a!r} -> {b!r}" for k, a, b in changes]
    else:
        lines.append(f"config: as in {source}")
    groups = m.num_query_groups or m.num_attention_heads
    lines.append(f"model: {total_parameters(cfg) / 1e6:,.2f}M parameters: {m.num_layers} layers, hidden {m.hidden_size}, "
                 f"{m.num_attention_heads} heads ({groups} key/value), ffn {cfg.ffn.kind} width {ffn_width(cfg)}, "
                 f"vocab {m.vocab_size} padded to {padded_vocab_size(cfg)}, sequence {cfg.data.seq_length}")
    lines.append(f"batch: global {cfg.train.global_batch} = micro {cfg.train.micro_batch} x {est.microbatches} "
                 f"microbatch(es) x dp {est.dp}; {cfg.train.steps} steps, "
                 f"{cfg.train.steps * cfg.train.global_batch * cfg.data.seq_length:,} tokens")

    layout = rank_layout(cfg, world_size)
    lines.append(f"layout: tp={par.tp} pp={par.pp} dp={est.dp} (megatron order tp-dp-pp: tensor-parallel ranks "
                 "adjacent, pipeline stages farthest apart)")
    rows = [[str(c.rank), str(c.tp), str(c.pp), str(c.dp)] for c in layout[:MAX_RANK_ROWS]]
    lines += _table(["rank", "tp", "pp", "dp"], rows)
    if len(layout) > MAX_RANK_ROWS:
        lines.append(f"  ... {len(layout) - MAX_RANK_ROWS} more ranks in the same pattern")

    s = est.schedule
    if s is None:
        lines.append(f"pipeline: none (parallel.pp=1): every rank runs all {m.num_layers} layers, "
                     f"{est.microbatches} microbatch(es) one after another")
    else:
        sim = est.simulation
        simulated = "" if est.microbatches == s.num_microbatches else \
            f" (simulated with the first {s.num_microbatches}: the peak is reached in the warm-up)"
        lines.append(f"pipeline: {s.name}, {par.pp} stages, {s.num_chunks} chunks, {est.microbatches} microbatches per "
                     f"step{simulated}; bubble {100 * sim.bubble_rate:.1f}% with equal F/B/W costs")
    for stage, chunks in enumerate(est.chunks_by_stage):
        ranks = [c.rank for c in layout if c.pp == stage]
        parts = [f"layers {_span(r)} ({len(r)})" for r in chunks]
        lines.append(f"  stage {stage} (ranks {_ranks_text(ranks)}): {len(chunks)} chunk(s): " + ", ".join(parts)
                     + (" + embedding" if est.stages[stage].embedding else "")
                     + (" + output layer, loss" if est.stages[stage].head else ""))
    if s is not None and s.num_microbatches <= MAX_ORDER_MICROBATCHES:
        lines.append("  order per stage (<chunk><F|B|W|BW><microbatch>):")
        lines += ["    " + line.replace("rank", "stage", 1) for line in s.describe().splitlines()]

    shard = []
    if cfg.train.engine == "deepspeed":
        shard.append(f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}")
    elif cfg.optim.distributed_optimizer:
        shard.append(f"optimizer sharded over dp={est.dp} (ZeRO-1)")
    lines.append(f"memory per rank, estimated in GiB ({weight_bytes(cfg, est.on_gpu)}-byte weights, fp32 gradients "
                 f"and Adam state{'; ' + ', '.join(shard) if shard else ''}):")
    rows = []
    for r in est.stages:
        rows.append([str(r.stage), f"{r.parameters / 1e6:.2f}M", *(gib(v) for v in (
            r.weights, r.gradients, r.optimizer, r.activations, r.logits, r.total))])
    lines += _table(["stage", "params", "weights", "grads", "optimizer", "activations", "logits", "total"], rows)
    if limit is None:
        lines.append("limit: no GPU is visible here, so the estimate is not compared with a GPU's memory")
        return "\n".join(lines)
    peak = est.peak.total * limit.ranks_sharing
    sharing = f" x {limit.ranks_sharing} ranks on this host" if limit.ranks_sharing > 1 else ""
    lines.append(f"limit: {limit.bytes / GIB:.1f} GiB of {limit.what}; the peak stage needs "
                 f"{gib(est.peak.total)} GiB{sharing} = {gib(peak)} GiB ({100 * peak / limit.bytes:.1f}%)")
    if peak > limit.bytes and fits(est, limit):
        lines.append("warning: the estimate exceeds the memory, though by less than its margin for error "
                     "(docs/configs.md): the run will probably run out of memory; lower train.micro_batch, or "
                     "set train.recompute=true")
    return "\n".join(lines)


def gib(value: float) -> str:
    """Bytes as GiB with enough digits to tell a tiny model's numbers apart."""
    v = value / GIB
    if v == 0:
        return "0"
    return f"{v:.2f}" if v >= 0.01 else f"{v:.1e}"


def default_world_size(cfg: Config) -> int:
    """The launcher's WORLD_SIZE when set (under torchrun/srun), else tp x pp (data parallel size 1)."""
    from effdist.runtime.launch_env import resolve_dist_env

    if any(k in os.environ for k in ("WORLD_SIZE", "SLURM_NTASKS")):
        return resolve_dist_env(os.environ).world_size
    return cfg.model_parallel_size


def plan(cfg: Config, world_size: int, source: str, preset: Config | None, on_gpu: bool | None = None,
         limit: MemoryLimit | None = None) -> tuple[str, str | None]:
    """(report text, the error line or None). Validates `cfg` for `world_size` (ConfigError when invalid)."""
    validate_run(cfg, world_size=world_size)
    on_gpu = uses_gpu(cfg) if on_gpu is None else on_gpu
    limit = memory_limit(cfg, world_size, on_gpu) if limit is None else limit
    est = estimate(cfg, world_size, on_gpu)
    text = report(cfg, world_size, est, limit, source, config_changes(preset, cfg) if preset else [])
    try:
        check_fits(cfg, world_size, on_gpu=on_gpu, limit=limit)
    except ConfigError as e:
        return text, str(e)
    return text, None


def run(args) -> int:
    """`effdist train --dry-run` / `--print-config` (args from effdist.train.trainer's parser)."""
    overrides = [o for group in args.overrides for o in ([group] if isinstance(group, str) else group)]
    try:
        cfg = load_config(args.config, overrides)
        validate_run(cfg)
        world_size = args.world_size if args.world_size is not None else default_world_size(cfg)
        if world_size < 1:
            raise ConfigError(f"--world-size {world_size}: must be a positive number of processes")
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            sys.stdout.flush()
        if not args.dry_run:
            return 0
        preset = load_config(args.config, check=False) if overrides else cfg
        text, error = plan(cfg, world_size, str(args.config), preset)
    except ConfigError as e:
        print(f"effdist: config error: {e}", file=sys.stderr)
        return 2
    out = sys.stderr if args.print_config else sys.stdout
    print(text, file=out, flush=True)
    if error:
        print(f"effdist: config error: {error}", file=sys.stderr)
        return 2
    print("dry run: the config is valid and fits; nothing was started", file=out)
    return 0
