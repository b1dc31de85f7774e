"""EPAS under tensor parallelism: TP=2 (with and without sequence parallelism) follows a single-process
run step for step while the region grows, in real gloo processes launched with torchrun; with torch's
AdamW (the controller restores the frozen rows) and with MasterWeightAdamW on the fused kernel (the
optimizer leaves the rows of each rank's shard alone).

This file is also the worker: ``torchrun --nproc_per_node=2 tests/test_epas_tp.py --out F`` trains every
scenario of RUNS in turn in the same two processes (one launch: each process costs seconds of imports). The
TP=1 references run on both ranks with tensor parallelism 1 (each rank a whole model, nothing reduced
between them), exactly as one process would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
# The region grows by one layer per step from step 1: sizes 0, 1, 2, 3, 3.
EPAS = ["epas.enabled=true", "epas.start_step=1", "epas.interval=1", "epas.group_size=1", "epas.final_region=3"]
# name: (tp, sequence parallelism, MasterWeightAdamW on the fused kernel)
RUNS = {"tp1": (1, False, False), "tp2": (2, False, False), "tp2_sp": (2, True, False),
        "tp1_fused": (1, False, True), "tp2_fused": (2, False, True)}


def worker(out: str) -> None:
    import torch.distributed as dist

    from effdist.runtime import cpu_compat

    cpu_compat.install()
    dist.init_process_group("gloo")
    results = {name: train(tp, sp, fused) for name, (tp, sp, fused) in RUNS.items()}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def train(tp: int, sequence_parallel: bool, master_fused: bool) -> dict:
    """STEPS steps of one scenario at tensor parallelism `tp` ({losses, regions}); the frozen-row checks
    are asserted on every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from effdist.config import load_config
    from effdist.epas import EpasController
    from effdist.model.gpt import build_gpt
    from effdist.runtime.distributed import _seed_cpu_tracker

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1, create_gloo_process_groups=False)
    cfg = load_config(None, ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4",
                             "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.vocab_size=128",
                             f"parallel.tp={tp}", f"parallel.sequence_parallel={str(sequence_parallel).lower()}",
                             "optim.weight_decay=0.1", *EPAS])
    torch.manual_seed(11)
    _seed_cpu_tracker(11)
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    if master_fused:
        from effdist.train.optim import MasterWeightAdamW

        optimizer = MasterWeightAdamW(list(model.parameters()), cfg.optim, fused=True,
                                      tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                                      model_parallel_group=parallel_state.get_model_parallel_group())
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    controller = EpasController(cfg, [model], optimizer=optimizer)
    tp_group = parallel_state.get_tensor_model_parallel_group()

    qkv = model.decoder.layers[3].self_attention.linear_qkv.weight
    heads, groups = 4 // tp, 2 // tp
    blocks = lambda t: t.detach().view(groups, heads // groups + 2, 16, 64)  # noqa: E731
    losses, regions, frozen_at_switch = [], [], None
    for step in range(STEPS):
        regions.append(controller.begin_step(step))
        g = torch.Generator().manual_seed(100)  # one batch, so the loss must fall
        tokens = torch.randint(0, 128, (2, 32), generator=g)
        positions = torch.arange(32).unsqueeze(0).expand(2, 32)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).mean()
        loss.backward()
        if sequence_parallel:
            # What megatron's finalize_model_grads does: norm weights see only this rank's tokens.
            for p in model.parameters():
                if getattr(p, "sequence_parallel", False):
                    dist.all_reduce(p.grad, group=tp_group)
        if step == 1:
            frozen_at_switch = blocks(qkv)[:, : heads // groups + 1].clone()
            v_at_switch = blocks(qkv)[:, heads // groups + 1].clone()
        if master_fused:
            optimizer.collect_grads()
            optimizer.step(lr=1e-2)
        else:
            optimizer.step()
        controller.after_optimizer_step(optimizer)
        losses.append(loss.item())
    # Layer 3 shared from step 1 on: this rank's slice of its Wq/Wk rows never moved, its V rows did.
    assert torch.equal(blocks(qkv)[:, : heads // groups + 1], frozen_at_switch)
    assert not torch.equal(blocks(qkv)[:, heads // groups + 1], v_at_switch)
    if master_fused:
        assert len(optimizer._trainable_pieces) == 3, "the optimizer itself leaves the rows alone"
    parallel_state.destroy_model_parallel()
    return {"losses": losses, "regions": regions}


def _launch(out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_tp2_follows_tp1_while_the_region_grows(tmp_path):
    proc = _launch(tmp_path / "results.json")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"the worker failed:\n{output[-6000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(RUNS)
    reference = results["tp1"]
    assert reference["regions"] == [0, 1, 2, 3, 3]
    assert reference["losses"][-1] < reference["losses"][0]
    assert results["tp1_fused"]["losses"][-1] < results["tp1_fused"]["losses"][0]
    for name, ref in (("tp2", "tp1"), ("tp2_sp", "tp1"), ("tp2_fused", "tp1_fused")):
        assert results[name]["regions"] == reference["regions"]
        for step, (a, b) in enumerate(zip(results[name]["losses"], results[ref]["losses"])):
            assert a == pytest.approx(b, rel=1e-5), f"{name} vs {ref} step {step}: {a} vs {b}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    worker(parser.parse_args().out)
