"""EPAS through the real trainer and real processes: a region that grows during the run (each switch
preceded by a one-step transition) gives the same losses with TP=1, TP=2 and PP=2, a run killed after a
switch resumes with the same region and losses, and a fresh run can start from converted/pretrained
weights (checkpoint.init_from)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.launching import NO_CHECKPOINTS, ROOT, clean_env, in_parallel, losses, run_train

pytestmark = pytest.mark.slow

STEPS = 7
EPAS = [f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "data.seq_length=64",
        "logging.tensorboard=false", "checkpoint.interval=3", "optim.warmup_steps=2", "epas.enabled=true",
        "epas.start_step=1", "epas.interval=2", "epas.group_size=1", "epas.final_region=3",
        # Each layer blends its Q/K into the incoming ones during the step before it joins (steps 0, 2, 4):
        # at step 2 layer 2, first of the second pp=2 stage, needs layer 1's Q/K across the boundary.
        "epas.transition_steps=1"]


def _regions(run_dir):
    return {json.loads(line)["step"]: json.loads(line)["epas_region"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()}


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("epas_single")
    proc = run_train(run, EPAS + [f"data.cache_dir={data_cache}"])
    (run / "console.txt").write_text(proc.stderr)
    return run


@pytest.fixture(scope="module")
def runs(single, tmp_path_factory, data_cache):
    """Every run the tests below compare with `single`, launched two at a time: {name: (run dir, process)}.
    Runs whose checkpoints nothing reads skip saving (NO_CHECKPOINTS)."""
    root = tmp_path_factory.mktemp("epas_runs")
    common = EPAS + [f"data.cache_dir={data_cache}"]
    # As if killed at step 5 (after the switches at steps 2 and 4): only the step-3 checkpoint survives.
    resumed = root / "resumed"
    shutil.copytree(single, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"iter_{STEPS:07d}")
    shutil.rmtree(resumed / "checkpoints" / "iter_0000006")
    (resumed / "checkpoints" / "latest").write_text("iter_0000003")
    mean = common + ["epas.anchor_grad=mean", *NO_CHECKPOINTS]
    layouts = {  # one-process runs between the two-process ones: each pair keeps both cores busy
        "tp2": (common + ["parallel.tp=2", *NO_CHECKPOINTS], 2),
        "mean_pp1": (mean, 1),
        "pp2_1f1b": (common + ["parallel.pp=2", "pipeline.schedule=1f1b", *NO_CHECKPOINTS], 2),
        "resumed": (common, 1),
        "pp2_v-zb": (common + ["parallel.pp=2", "pipeline.schedule=v-zb", *NO_CHECKPOINTS], 2),
        "mean_pp2": (mean + ["parallel.pp=2"], 2),
    }
    jobs = {name: (lambda name=name, o=o, n=n: run_train(root / name, o, nproc=n)) for name, (o, n) in layouts.items()}
    jobs["init_from"] = lambda: _init_from(single / "checkpoints" / "iter_0000003", root / "fresh", data_cache)
    return {name: (root / name, proc) for name, proc in in_parallel(jobs).items()}


def test_region_grows_deep_to_shallow_on_schedule(single):
    # start 1, every 2 steps one more layer, up to 3 of 4 layers: steps are logged 1-based after running.
    assert _regions(single) == {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3, 7: 3}
    ls = losses(single)
    assert ls[STEPS] < ls[1]


def test_throughput_counts_the_flops_sharing_layers_execute(single):
    from effdist.config import load_config
    from effdist.train.flops import flops_per_token

    cfg = load_config(single / "config.yaml")
    records = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        count = flops_per_token(cfg, sharing_layers=r["epas_region"])
        # Both are rounded to 4 significant digits in metrics.jsonl.
        assert r["tflops_executed"] / r["tflops"] == pytest.approx(count.executed_fraction, rel=2e-3), r["step"]
        assert r["tokens_per_s_dense_equiv"] / r["tokens_per_s"] == pytest.approx(count.executed_fraction, rel=2e-3)
        assert r["mfu"] is None and r["mfu_executed"] is None  # CPU: no datasheet peak
    assert flops_per_token(cfg, sharing_layers=3).executed_fraction < 0.95
    # The console line reports the executed TFLOP/s (the last step's, 3 sharing layers), not the dense count.
    last = records[-1]
    line = [x for x in (single / "console.txt").read_text().splitlines() if f"step {STEPS}/{STEPS}" in x][-1]
    shown = float(line.split(" TFLOP/s")[0].split()[-1])
    assert abs(shown - last["tflops_executed"]) < abs(shown - last["tflops"]), line
    assert "dense-equiv" in line


def test_tp2_matches_tp1_while_region_grows(single, runs):
    run, _ = runs["tp2"]
    assert _regions(run) == _regions(single)
    for s, v in losses(single).items():
        assert losses(run)[s] == pytest.approx(v, rel=2e-5), s


def test_resume_after_a_switch_continues_region_and_losses(single, runs):
    run, proc = runs["resumed"]
    assert "resumed from" in proc.stderr
    assert _regions(run) == _regions(single)
    for s, v in losses(single).items():
        assert losses(run)[s] == pytest.approx(v, rel=1e-6, abs=0), s


def test_resume_with_other_epas_settings_is_one_line_and_exit_2(single, data_cache, tmp_path):
    # The controller's EpasError used to end the run with a traceback and exit 1, like a crash.
    common = EPAS + [f"data.cache_dir={data_cache}"]
    proc = run_train(tmp_path / "other", common + ["epas.transition_steps=0"], check=False,
                     resume=str(single / "checkpoints" / "iter_0000003"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("effdist: error")]
    assert len(errors) == 1 and "epas.transition_steps = 1, this config has 0" in errors[0], errors
    assert "--set epas.transition_steps=1" in errors[0], errors
    # EPAS off on resume used to go on silently with the sharing layers' stale Q/K weights
    proc = run_train(tmp_path / "dense", common + ["epas.enabled=false"], check=False,
                     resume=str(single / "checkpoints" / "iter_0000003"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("effdist: error")]
    assert len(errors) == 1 and "share Q/K there (EPAS), and epas.enabled=false would" in errors[0], errors


def _init_from(source, fresh, data_cache) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import torch
        from pathlib import Path
        from effdist.config import load_config
        from effdist.train.trainer import Trainer
        from effdist.model.hf_convert import load_effdist_model
        overrides = {EPAS + [f"data.cache_dir={data_cache}"]!r} + ["checkpoint.init_from={source}"]
        cfg = load_config("{ROOT / 'configs/tiny-cpu.yaml'}", overrides)
        t = Trainer(cfg, Path("{fresh}"), resume="none")
        t.setup()
        _, want = load_effdist_model("{source}", cfg)
        got = t.model_chunks[0].module.state_dict()
        n = 0
        for k, v in want.items():
            if k in got and torch.is_tensor(v):
                assert torch.equal(got[k], v), k
                n += 1
        assert n > 20, n
        assert t.step == 0
        print("OK", n)
    """)
    return subprocess.run([sys.executable, "-c", script], env=clean_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_init_from_loads_weights_into_a_fresh_run(runs):
    """checkpoint.init_from puts a checkpoint's weights into a new run (continual pretraining)."""
    _, proc = runs["init_from"]
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.parametrize("schedule", ["1f1b", "v-zb"])
def test_pp2_region_crossing_the_stage_boundary_matches_pp1(single, runs, schedule):
    """Layers 1-3 end up sharing: the anchor's Q/K cross the boundary (1f1b: between ranks; v-zb:
    four chunks, across ranks and at the V's local turn), and the losses equal the pp=1 run."""
    run, proc = runs[f"pp2_{schedule}"]
    assert _regions(run) == _regions(single)
    for s, v in losses(single).items():
        assert losses(run)[s] == pytest.approx(v, rel=2e-5), (s, proc.stderr[-2000:])


def test_mean_anchor_grad_pp2_matches_pp1_and_changes_the_gradient(single, runs):
    """epas.anchor_grad=mean divides the anchor's Wq/Wk gradient by its uses counted over the whole model:
    with pp=2 the anchor (layer 0) and the layers using its Q/K (1-3) sit on different stages, and both
    must count the same uses. The losses equal the one-process run, and the gradient norms differ from the
    exact-gradient run's (same first loss) by more than fp32 noise: the option is in effect through the
    trainer (its arithmetic: test_epas_controller.py). In this tiny model Q/K carry little of the norm, so
    the difference is small (~2e-4 at step 4)."""
    one, _ = runs["mean_pp1"]
    two, proc = runs["mean_pp2"]
    assert _regions(two) == _regions(one) == _regions(single)
    for s, v in losses(one).items():
        assert losses(two)[s] == pytest.approx(v, rel=2e-5), (s, proc.stderr[-2000:])

    def grad_norms(run_dir):
        return {r["step"]: r["grad_norm"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}

    with_mean, exact = grad_norms(one), grad_norms(single)
    assert losses(one)[1] == losses(single)[1]
    assert max(abs(with_mean[s] / exact[s] - 1) for s in exact) > 5e-5, (with_mean, exact)
