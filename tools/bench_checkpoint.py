#!/usr/bin/env python
"""How long a checkpoint save stalls training: synchronous save vs async save (state copied into reused
pinned host buffers in the saving step, files written in the background), measured in one process.

    python tools/bench_checkpoint.py --model llama-1b --json ckpt.json
    python tools/bench_checkpoint.py --tiny            # CPU smoke test

Stall of a save = (time of the steps from the save until it is complete) - (the same number of plain
steps). For the sync save that is the whole write; for async, the staging copy plus whatever the
background write slows the following steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.bench_train import RandomTokens  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_step(trainer) -> float:
    _sync()
    t0 = time.perf_counter()
    trainer.train_step()
    trainer.step += 1
    _sync()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    from effdist.config import load_config
    from effdist.runtime.distributed import setup, teardown
    from effdist.train import checkpoint as ckpt
    from effdist.train.trainer import Trainer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--dir", default="/tmp/effdist-ckpt-bench")
    p.add_argument("--steps", type=int, default=6, help="plain steps timed for the baseline")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    name = "tiny-cpu" if args.tiny else args.model
    overrides = ["data.kind=mock", f"train.micro_batch={args.micro_batch}", f"train.global_batch={args.micro_batch}",
                 "logging.tensorboard=false", "checkpoint.keep_last=1", f"checkpoint.dir={args.dir}"]
    if args.tiny:
        overrides.append("data.seq_length=64")
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", overrides)
    shutil.rmtree(args.dir, ignore_errors=True)
    trainer = Trainer(cfg, Path(args.dir) / "run", resume="none")
    trainer.runtime = setup(cfg)
    try:
        trainer._build_model()
        trainer._build_features()
        trainer.loader = RandomTokens(cfg, trainer.runtime.dp)
        trainer.ckpt_dir = Path(args.dir)
        trainer.saver = None
        for _ in range(3):
            timed_step(trainer)
        base = statistics.median(timed_step(trainer) for _ in range(args.steps))

        # Synchronous: the step that saves waits for every byte to be on disk.
        _sync()
        t0 = time.perf_counter()
        trainer.save()
        sync_stall = time.perf_counter() - t0

        # Async: the save call stages into pinned buffers and returns; later steps poll for completion.
        trainer.saver = ckpt.AsyncSaver()
        timed_step(trainer)  # first async save allocates its pinned buffers: time the second one
        trainer.save()
        trainer._finish_saves()
        results = {}
        for attempt in ("first_reuse",):
            _sync()
            t0 = time.perf_counter()
            trainer.save()
            save_call = time.perf_counter() - t0
            steps, polls = [], 0
            while trainer.saver.in_flight is not None and polls < 200:
                dt = timed_step(trainer)
                t1 = time.perf_counter()
                trainer.saver.poll()
                steps.append(dt + time.perf_counter() - t1)
                polls += 1
            results[attempt] = {"save_call_s": save_call, "steps_until_visible": len(steps),
                                "extra_in_following_steps_s": sum(steps) - base * len(steps)}
        r = results["first_reuse"]
        async_stall = r["save_call_s"] + max(0.0, r["extra_in_following_steps_s"])
        size = sum(f.stat().st_size for f in Path(args.dir).rglob("*") if f.is_file())
        out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d"), "model": name, "step_s": base, "sync_stall_s": sync_stall,
               "async_save_call_s": r["save_call_s"], "async_steps_until_visible": r["steps_until_visible"],
               "async_extra_in_following_steps_s": r["extra_in_following_steps_s"], "async_stall_s": async_stall,
               "checkpoint_bytes_on_disk": size, "stall_ratio_async_vs_sync": async_stall / sync_stall}
        print(json.dumps(out))
        print(f"\n{name}: step {base * 1e3:.0f} ms; checkpoint {size / 2**30:.2f} GiB on disk")
        print(f"  sync save stall   {sync_stall:8.2f} s")
        print(f"  async save stall  {async_stall:8.2f} s  (save call {r['save_call_s']:.2f} s, then "
              f"{r['steps_until_visible']} steps until visible, {r['extra_in_following_steps_s']:+.2f} s in them)")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        trainer.saver.close()
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
