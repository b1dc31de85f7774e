"""`effdist eval`: the held-out loss of a checkpoint at several EPAS inference regions.

A model trained with EPAS runs at inference with any region (docs/epas.md). This measures what each costs: the
mean next-token loss over the same windows of a dataset at every region asked for, against the region the
checkpoint was trained with. Regions within `--tolerance` (0.5%) of the trained region's loss are "usable"; the
result goes to RUN_DIR/region_quality.json (effdist.infer.region_quality), where `effdist generate` finds it and
warns when asked for a measured region outside them.

    effdist eval --checkpoint runs/llama-1b-epas --data data/english-large/heldout --windows 64

Windows: `--windows` stretches of `--seq-length` + 1 tokens, each starting at a document spread evenly over the
dataset (documents concatenated as in training, EOD included), scored by the dense-math prefill forward.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from effdist.infer.generate import GenerationError, Generator, UnsupportedModelError, _quiet_megatron
from effdist.infer.region_quality import (
    DEFAULT_TOLERANCE,
    QUALITY_FILE,
    RegionQuality,
    quality_path,
    write_region_quality,
)
from effdist.runtime.cli_parser import ArgumentParser
from effdist.runtime.lifecycle import output_file_problem


def default_regions(num_layers: int, trained: int) -> list[int]:
    """0, L/4, L/2, 3L/4, the trained region and the one beyond it (where the model has that many layers)."""
    wanted = {0, num_layers // 4, num_layers // 2, 3 * num_layers // 4, trained, trained + 1}
    return sorted(r for r in wanted if 0 <= r <= num_layers - 1)


def parse_regions(text: str) -> list[int]:
    try:
        regions = sorted({int(t) for t in text.replace(" ", "").split(",") if t})
    except ValueError:
        raise GenerationError(f"--regions {text!r}: expected comma-separated whole numbers, e.g. 0,4,8,12") from None
    if not regions:
        raise GenerationError("--regions is empty: give at least one region, e.g. 0,8")
    return regions


def read_windows(prefix: str, seq_length: int, windows: int) -> torch.Tensor:
    """[windows, seq_length + 1] token ids from the megatron dataset `prefix` (see the module doc)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not Path(prefix + ".idx").is_file() or not Path(prefix + ".bin").is_file():
        raise GenerationError(f"--data {prefix}: no {prefix}.bin/.idx here; give the prefix of a dataset "
                              "`effdist preprocess` wrote (docs/data.md)")
    dataset = IndexedDataset(prefix)
    lengths = dataset.sequence_lengths
    need = seq_length + 1
    if int(lengths.sum()) < need:
        raise GenerationError(f"--data {prefix} holds {int(lengths.sum())} tokens, fewer than one window of "
                              f"--seq-length {seq_length} + 1")
    rows = []
    for w in range(windows):
        doc, parts, have = (w * len(lengths)) // windows, [], 0
        while have < need:
            parts.append(torch.from_numpy(dataset[doc % len(lengths)].astype("int64")))
            have += len(parts[-1])
            doc += 1
        rows.append(torch.cat(parts)[:need])
    return torch.stack(rows)


@torch.no_grad()
def region_losses(gen: Generator, tokens: torch.Tensor, regions: list[int], batch: int) -> dict[int, float]:
    """Mean next-token cross entropy over `tokens` [windows, s + 1] at each region."""
    model = gen.model
    losses = {}
    for region in regions:
        plan = gen.plan_for(region, warn=False)
        total, count = 0.0, 0
        for start in range(0, tokens.shape[0], batch):
            chunk = tokens[start:start + batch].to(model.device)
            logits = model(chunk[:, :-1], plan).float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += chunk[:, 1:].numel()
        losses[region] = total / count
    return losses


def _default_data(gen: Generator) -> str:
    """The dataset the run trained on (not held out: the table says so)."""
    from effdist.data.loader import DataError, resolve_data_paths

    info = gen.checkpoint
    cfg = info.config
    if cfg.data.kind == "mock" or info.run_dir is None:
        raise GenerationError("give --data PREFIX (a held-out dataset, docs/data.md): this checkpoint's own data "
                              f"cannot be used ({'synthetic mock data' if cfg.data.kind == 'mock' else 'no run directory'})")
    try:
        return resolve_data_paths(cfg, info.run_dir).prefixes[0]
    except DataError as e:
        raise GenerationError(f"{e}; or give --data PREFIX") from None


def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist eval", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/checkpoints/iter_NNNNNNN, or a converted model")
    p.add_argument("--data", default=None,
                   help="dataset prefix (PREFIX.bin/.idx), e.g. data/english-large/heldout; default: the run's own "
                        "training data (not held out)")
    p.add_argument("--regions", default=None,
                   help="comma-separated EPAS regions (default: 0, L/4, L/2, 3L/4, the trained region and one beyond)")
    p.add_argument("--windows", type=int, default=32, help="number of token windows (default 32)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per window (default: data.seq_length)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"usable: loss at most (1 + this) x the trained region's (default {DEFAULT_TOLERANCE})")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--no-save", action="store_true",
                   help=f"do not write RUN_DIR/{QUALITY_FILE} (read by `effdist generate`)")
    return p


def _check_args(args) -> None:
    for name in ("windows", "batch"):
        if getattr(args, name) < 1:
            raise GenerationError(f"--{name} {getattr(args, name)}: must be at least 1")
    if args.seq_length is not None and args.seq_length < 1:
        raise GenerationError(f"--seq-length {args.seq_length}: must be at least 1")
    if not 0 <= args.tolerance < 1 or math.isnan(args.tolerance):
        raise GenerationError(f"--tolerance {args.tolerance}: a fraction in [0, 1), e.g. 0.005 for 0.5%")
    problem = output_file_problem("--json", args.json, "eval.json")  # before the model loads and runs, not after
    if problem:
        raise GenerationError(problem)


def main(argv: list[str] | None = None) -> int:
    from effdist.config import ConfigError
    from effdist.train.checkpoint import CheckpointError

    args = build_arg_parser().parse_args(argv)
    try:
        _check_args(args)
        regions = parse_regions(args.regions) if args.regions is not None else None
        with warnings.catch_warnings(), _quiet_megatron():
            warnings.filterwarnings("ignore", module=r"(megatron|torch)(\.|$)")
            gen = Generator.from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype, cuda_graphs=False,
                                            sparse_decode=False)
        info, num_layers = gen.checkpoint, gen.model.shape.num_layers
        trained = info.trained_region or 0
        regions = sorted(set(regions or default_regions(num_layers, trained)) | {trained})
        for region in regions:
            gen.plan_for(region, warn=False)  # a region the model cannot run is a usage error, before any work
        data = args.data or _default_data(gen)
        seq_length = args.seq_length or info.config.data.seq_length
        if seq_length > gen.model.shape.max_positions:
            raise GenerationError(f"--seq-length {seq_length}: this model takes at most {gen.model.shape.max_positions} "
                                  "positions (model.max_position_embeddings)")
        tokens = read_windows(data, seq_length, args.windows)
        if int(tokens.max()) >= gen.model.shape.vocab_size:
            raise GenerationError(f"--data {data} holds token id {int(tokens.max())}, past this model's vocabulary "
                                  f"({gen.model.shape.vocab_size}): it was tokenized with another tokenizer")
        losses = region_losses(gen, tokens, regions, args.batch)
    except (GenerationError, UnsupportedModelError, ConfigError, CheckpointError) as e:
        print(f"effdist eval: error: {e}", file=sys.stderr)
        return 2
    record = RegionQuality(quality_path(info.run_dir) if info.run_dir else Path(), info.step, trained, losses,
                           args.tolerance, saved_at=info.saved_at)
    held_out = "" if args.data else " (the run's training data, not held out)"
    print(f"{info.path} (step {info.step}), trained region {trained} of {num_layers - 1}; {args.windows} windows x "
          f"{seq_length} tokens of {data}{held_out}")
    print(f"{'region':>6}  {'loss':>8}  {'vs trained':>10}  usable (within {args.tolerance:.1%})")
    for region in regions:
        mark = "yes" if region in record.usable else "no"
        print(f"{region:>6}  {losses[region]:>8.4f}  {record.excess(region):>+10.2%}  {mark}")
    result = {"checkpoint": str(info.path), "data": data, "windows": args.windows, "seq_length": seq_length,
              **record.to_json()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if info.run_dir is not None and not args.no_save:
        print(f"wrote {write_region_quality(record)}: usable regions {', '.join(map(str, record.usable))}; "
              "`effdist generate` warns at the other measured ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
