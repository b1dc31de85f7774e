#!/usr/bin/env python
"""torchtitan's own trainer at effdist's llama-1b shape, on random tokens: the comparison row of docs/fp8.md.

torchtitan (0.2.2) is run unchanged -- its Trainer, model, float8 converter (torchao), torch.compile of the
blocks and the loss, fused AdamW, gradient clipping -- with three substitutions that do not touch the step:

* a model flavor ``effdist_1b`` with effdist's llama-1b shape (16 layers, hidden 2048, 32 heads without GQA,
  SwiGLU 5632, vocab 32000; torchtitan rounds 2/3 x 4 x 2048 up to a multiple of 256 = 5632);
* no tokenizer and a dataloader of random tokens (effdist's benchmark uses random tokens too; the GPU image has
  no ``datasets`` package, which torchtitan's llama3 module imports at load: a stub stands in for it);
* ``train_step`` timed with a CUDA synchronise around it (median over the steps after ``--warmup``).

One GPU, one process (run it under torchrun or let it set the single-rank environment itself):

    python tools/bench_torchtitan.py --json tt.json

runs the default pair, float8 + compile with the output layer left in bf16 (as effdist's FP8 keeps its LM head)
and bf16 + compile; `--variant NAME=ARGS` (repeatable) runs others instead, e.g.
`--variant "float8_all=--model.converters quantize.linear.float8"` (the LM head in float8 too).

Each variant runs in its own process. Every variant gets: --activation_checkpoint.mode none (effdist's
benchmark does not recompute), --compile.enable, local batch 8, global batch 16, seq 2048 unless overridden.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import types

BASE = ["--model.name", "llama3", "--model.flavor", "effdist_1b", "--training.local_batch_size", "8",
        "--training.global_batch_size", "16", "--training.seq_len", "2048", "--activation_checkpoint.mode", "none",
        "--metrics.log_freq", "1000", "--checkpoint.no-enable", "--lr_scheduler.warmup_steps", "2"]
VOCAB = 32000
# Like for like with effdist's bf16 and FP8 runs: effdist keeps the LM head in bf16, so torchtitan's float8
# converter leaves its `output` linear alone too.
DEFAULT_VARIANTS = ["float8_compile=--model.converters quantize.linear.float8 --quantize.linear.float8.filter_fqns output",
                    "bf16_compile="]


def _stub_datasets() -> None:
    """torchtitan.hf_datasets imports `datasets` at module load; the benchmark never loads a dataset."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        root = types.ModuleType("datasets")
        dist = types.ModuleType("datasets.distributed")
        root.Dataset, root.load_dataset, dist.split_dataset_by_node = object, None, None
        root.distributed = dist
        sys.modules.update({"datasets": root, "datasets.distributed": dist})


def worker(tt_args: list[str], out: str, warmup: int) -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    _stub_datasets()
    # torchtitan's ConfigManager.parse_args takes sys.argv[1:] as bound when its module is imported.
    sys.argv = [sys.argv[0], *tt_args]
    import dataclasses

    import torch
    import torchtitan.protocols.train_spec as train_spec_module
    import torchtitan.train as tt
    from torchtitan.models import llama3

    llama3.llama3_args["effdist_1b"] = llama3.TransformerModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=None, vocab_size=VOCAB, multiple_of=256, rope_theta=10000)

    def random_tokens(dp_world_size, dp_rank, tokenizer, job_config, **_):
        batch, seq = job_config.training.local_batch_size, job_config.training.seq_len
        gen = torch.Generator().manual_seed(0)

        class Loader:
            def __iter__(self):
                while True:
                    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=gen)
                    yield {"input": tokens[:, :-1]}, tokens[:, 1:]

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                pass

        return Loader()

    real_get = train_spec_module.get_train_spec

    def get_train_spec(name):
        return dataclasses.replace(real_get(name), build_tokenizer_fn=None, build_dataloader_fn=random_tokens)

    train_spec_module.get_train_spec = get_train_spec
    times: list[float] = []

    class TimedTrainer(tt.Trainer):
        def train_step(self, data_iterator):
            torch.cuda.synchronize()
            start = time.perf_counter()
            super().train_step(data_iterator)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)

    tt.main(TimedTrainer)
    from torchtitan.config import ConfigManager

    cfg = ConfigManager().parse_args(tt_args)
    measured = times[warmup:]
    step_s = statistics.median(measured)
    tokens = cfg.training.global_batch_size * cfg.training.seq_len
    with open(out, "w") as f:
        json.dump({"args": tt_args, "step_times_s": times, "step_s": step_s, "tokens_per_s": tokens / step_s,
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}, f)


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The tool's own options and the rest (torchtitan's), for the launcher and for a variant's worker process."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # never read a torchtitan option as an abbreviation of ours
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="a named run; ARGS: extra torchtitan CLI arguments (shell-quoted). Default: float8 + "
                        "compile with the output layer in bf16, and bf16 + compile (effdist's FP8 and bf16 runs)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median (compilation)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    p.add_argument("--json", help="where the results go (required)")
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    # The worker is started without --json: the launcher writes the JSON from the worker's --worker-out file.
    if args.worker_out is None:
        if args.json is None:
            p.error("the following arguments are required: --json")
        if rest:
            p.error(f"unrecognized arguments: {' '.join(rest)} (torchtitan options go inside --variant NAME=ARGS)")
    return args, rest


def worker_command(json_path: str, name: str, extra: str, steps: int, warmup: int) -> tuple[list[str], list[str], str]:
    """(command, torchtitan arguments, part file) of one variant's worker process."""
    tt_args = BASE + ["--training.steps", str(steps), "--compile.enable"] + shlex.split(extra)
    out = f"{json_path}.{name}.part"
    return [sys.executable, __file__, "--worker-out", out, "--warmup", str(warmup), *tt_args], tt_args, out


def main() -> None:
    args, rest = parse()
    if args.worker_out:
        worker(rest, args.worker_out, args.warmup)
        return
    import torch

    runs = []
    for spec in args.variant or DEFAULT_VARIANTS:
        name, _, extra = spec.partition("=")
        cmd, tt_args, out = worker_command(args.json, name, extra, args.steps, args.warmup)
        print(f"=== torchtitan {name}: {' '.join(tt_args)}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            ok = proc.returncode == 0 and os.path.exists(out)
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            ok, tail = False, f"timed out after {args.timeout} s"
        if not ok:
            print(tail, flush=True)
            runs.append({"variant": name, "args": tt_args, "error": tail[-1500:]})
            continue
        with open(out) as f:
            rec = json.load(f)
        os.remove(out)
        rec["variant"] = name
        runs.append(rec)
        print(f"{name}: {rec['tokens_per_s']:,.0f} tokens/s, step {rec['step_s'] * 1e3:.1f} ms, "
              f"peak {rec['peak_mem_gib']:.1f} GiB", flush=True)
    import torchtitan

    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
              "torchtitan": getattr(torchtitan, "__version__", "?"), "command": " ".join(sys.argv), "runs": runs}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
