#!/usr/bin/env python
"""What one training microbatch keeps alive for backward, per module, through the real trainer.

    python tools/probe_activation_memory.py --model llama-350m --variant swiglu= --variant moc=ffn.kind=moc \
        --json docs/results/probe_activation_memory_h100.json          # GPU, one process per variant
    python tools/probe_activation_memory.py --tiny                        # CPU smoke test

Why. A sparse FFN stores a compact form of its activation and hands fc2 a recipe instead of the dense input
(effdist.model.ffn.saved). The saved-tensor accounting of the FFN blocks (tools/bench_ffn.py, the unit tests)
sees only what autograd's pack hooks receive; whether the dense tensor is really freed shows only in the
allocator. This tool measures both for one forward of the trainer's model (built and wrapped exactly as
`effdist train` does, megatron DDP and the fused kernels included) at the preset's micro-batch:

* ``saved``: distinct storages that autograd saves during the forward (an outer saved-tensor hook; parameters
  excluded), attributed to the innermost module running, summed per module class, in bytes per token and layer;
* on CUDA ``allocated``: what ``torch.cuda.memory_allocated`` grew by over the forward (the loss included), and the
  blocks still allocated afterwards that were allocated during it, grouped by the effdist/megatron source line
  that allocated them (``torch.cuda.memory._record_memory_history``). ``allocated - saved`` is memory that
  something other than autograd's saved tensors keeps alive (or that the hooks never saw).

Random tokens, one process per variant (--isolate is the default on CUDA: the allocator starts clean).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=4",
        "model.ffn_hidden_size=176", "model.vocab_size=512", "data.seq_length=32", "train.micro_batch=2",
        "train.global_batch=2", "data.kind=mock", "logging.tensorboard=false"]


class ModuleAttribution:
    """Forward pre/post hooks that keep the stack of running modules, so a saved tensor can be charged to the
    innermost one (by class name)."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = []
        self.handles = []
        for module in model.modules():
            name = type(module).__name__
            self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n)))
            self.handles.append(module.register_forward_hook(lambda m, a, o: self._leave()))

    def _enter(self, name: str) -> None:
        self.stack.append(name)

    def _leave(self) -> None:  # returns None: a forward hook's return value would replace the module's output
        self.stack.pop()

    def current(self) -> str:
        return self.stack[-1] if self.stack else "(outside modules)"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _frames_where(frames: list[dict]) -> str:
    mine = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames
            if ("effdist" in f["filename"] or "megatron" in f["filename"]) and "probe_activation_memory" not in f["filename"]]
    return " < ".join(mine[:3]) or "(no effdist/megatron frame)"


def live_blocks_by_site(before_ids: set[int], top: int = 25) -> list[dict]:
    """Blocks allocated now that were not allocated before the forward, grouped by the allocating source line."""
    snap = torch.cuda.memory._snapshot()
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for seg in snap["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated" or blk["address"] in before_ids:
                continue
            groups[_frames_where(blk.get("frames") or [])].append(blk["size"])
    rows = [{"where": where, "blocks": len(sizes), "bytes": sum(sizes), "largest_block": max(sizes)}
            for where, sizes in groups.items()]
    rows.sort(key=lambda r: -r["bytes"])
    return rows[:top]


def _allocated_addresses() -> set[int]:
    return {blk["address"] for seg in torch.cuda.memory._snapshot()["segments"] for blk in seg["blocks"]
            if blk["state"] == "active_allocated"}


def probe_one(model_name: str, overrides: list[str], warmup: int) -> dict:
    from bench_train import RandomTokens

    from effdist.config import load_config
    from effdist.runtime.distributed import setup, teardown
    from effdist.train.loss import masked_loss_sum
    from effdist.train.trainer import Trainer

    cfg_path = ROOT / "configs" / f"{model_name}.yaml"
    cfg = load_config(cfg_path if cfg_path.is_file() else None, overrides)
    trainer = Trainer(cfg, Path("/tmp/effdist-probe") / model_name, resume="none")
    trainer.runtime = rt = setup(cfg)
    try:
        trainer._build_model()
        trainer._build_features()
        trainer.loader = RandomTokens(cfg, rt.dp)
        for _ in range(warmup):  # kernels compiled, optimizer state allocated: what stays is the steady state
            trainer.train_step()
            trainer.step += 1
        model = trainer.model_chunks[0]
        microbatch = trainer.loader.next_step()[0]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        attribution = ModuleAttribution(model)
        saved: dict[int, tuple[int, str]] = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in saved:
                saved[storage.data_ptr()] = (storage.nbytes(), attribution.current())
            return t

        cuda = rt.is_cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            before_ids = _allocated_addresses()
            before = torch.cuda.memory_allocated()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss_sum, _ = masked_loss_sum(model, microbatch, rt.device)
            if cuda:
                torch.cuda.synchronize()
                allocated = torch.cuda.memory_allocated() - before
                sites = live_blocks_by_site(before_ids)
                torch.cuda.reset_peak_memory_stats()
            # The recipes rebuild what they replaced in backward: a peak above the forward's, or memory still
            # allocated afterwards, would show something kept from backward (a rebuilt input held to the end).
            loss_sum.backward()
            if cuda:
                torch.cuda.synchronize()
                backward_peak = torch.cuda.max_memory_allocated() - before
                after_backward = torch.cuda.memory_allocated() - before
                sites_after_backward = live_blocks_by_site(before_ids)
        finally:
            attribution.remove()
            if cuda:
                torch.cuda.memory._record_memory_history(enabled=None)
        tokens = cfg.train.micro_batch * cfg.data.seq_length // (rt.tp if cfg.parallel.sequence_parallel else 1)
        layers = len(model.decoder.layers) if hasattr(model, "decoder") else cfg.model.num_layers
        by_module: dict[str, int] = collections.Counter()
        for nbytes, module in saved.values():
            by_module[module] += nbytes
        total_saved = sum(by_module.values())
        out = {"model": model_name, "overrides": overrides, "tokens": tokens, "layers": layers,
               "saved_bytes": total_saved,
               "saved_bytes_per_token_layer": {m: b / tokens / layers for m, b in
                                               sorted(by_module.items(), key=lambda kv: -kv[1])}}
        if cuda:
            out.update(allocated_bytes=allocated, unexplained_bytes_per_token_layer=(allocated - total_saved) / tokens / layers,
                       live_blocks_by_site=sites, backward_peak_bytes=backward_peak,
                       allocated_after_backward_bytes=after_backward, live_after_backward_by_site=sites_after_backward)
        return out
    finally:
        del trainer
        teardown(keep_process_group=False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _in_subprocess(name: str, model: str, overrides: list[str], warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--one", model, "--warmup", str(warmup)] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"variant": name, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return dict(json.loads(lines[-1]), variant=name)


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<12} {'saved B/token/layer':>20} {'allocated B/token/layer':>24} {'unexplained':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<12} failed: {r['error']}")
            continue
        per = r["saved_bytes"] / r["tokens"] / r["layers"]
        alloc = r.get("allocated_bytes")
        alloc_s = f"{alloc / r['tokens'] / r['layers']:,.0f}" if alloc is not None else "(CPU)"
        unexplained = r.get("unexplained_bytes_per_token_layer")
        print(f"{r['variant']:<12} {per:>20,.0f} {alloc_s:>24} {'' if unexplained is None else f'{unexplained:,.0f}':>12}")
        for module, b in list(r["saved_bytes_per_token_layer"].items())[:6]:
            print(f"    saved in {module:<34} {b:>10,.0f}")
        for site in r.get("live_blocks_by_site", [])[:8]:
            print(f"    live {site['bytes'] / r['tokens'] / r['layers']:>10,.0f} B/token/layer in {site['blocks']:>4} "
                  f"blocks  {site['where']}")
        if "backward_peak_bytes" in r:
            print(f"    backward: peak {r['backward_peak_bytes'] / 2**20:,.0f} MiB above the start (forward kept "
                  f"{r['allocated_bytes'] / 2**20:,.0f} MiB), {r['allocated_after_backward_bytes'] / 2**20:,.0f} MiB "
                  "still allocated after it")
            for site in r.get("live_after_backward_by_site", [])[:4]:
                print(f"    after backward {site['bytes'] / 2**20:>9,.1f} MiB in {site['blocks']:>4} blocks  {site['where']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-350m", help="a preset under configs/ (default llama-350m)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=KEY=VALUE;KEY=VALUE (repeatable; default: swiglu, moc, topk, elas)")
    p.add_argument("--set", action="append", default=[], help="override for every variant")
    p.add_argument("--warmup", type=int, default=1, help="training steps before the probed forward (default 1)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny model, in this process")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # one variant in this process (--isolate child)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(probe_one(args.one, args.set, args.warmup)))
        return 0
    variants = args.variant or ["swiglu=", "moc=ffn.kind=moc", "topk=ffn.kind=topk",
                                "elas=ffn.kind=elas;ffn.elas_warmup_steps=0"]
    model = "tiny" if args.tiny else args.model
    base = (TINY if args.tiny else ["data.kind=mock", "logging.tensorboard=false"]) + args.set
    rows = []
    for spec in variants:
        name, _, sets = spec.partition("=")
        overrides = base + [s for s in sets.split(";") if s]
        if args.tiny:
            from effdist.runtime.distributed import one_process_megatron  # noqa: F401  (imports megatron once)
            try:
                rows.append(dict(probe_one(model, overrides, args.warmup), variant=name))
            except Exception as e:  # a variant that fails is reported, the table goes on
                traceback.print_exc()
                rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"})
        else:
            rows.append(_in_subprocess(name, model, overrides, args.warmup))
    print_table(rows)
    if args.json:
        if torch.cuda.is_available():
            from gpu_result import write_gpu_json

            write_gpu_json(args.json, "probe_activation_memory.py", rows=rows)
        else:
            Path(args.json).write_text(json.dumps({"device": "cpu", "torch": torch.__version__, "rows": rows,
                                                   "command": "python tools/probe_activation_memory.py "
                                                              + " ".join(sys.argv[1:])}, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
