"""`effdist eval` (effdist.infer.evaluate): the loss of a trained EPAS checkpoint at each inference region, the
record it leaves in the run directory, and `effdist generate`'s warning outside the usable regions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from effdist.infer.evaluate import default_regions, main, read_windows
from effdist.infer.generate import Generator
from effdist.infer.generate import main as generate_main
from effdist.infer.region_quality import QUALITY_FILE
from tests.launching import ROOT, TINY, clean_env, run_train


EPAS_RUN = ["train.steps=4", "epas.enabled=true", "epas.interval=1", "epas.final_region=2",
            "data.sample_documents=200", "data.seq_length=64", "train.global_batch=4", "logging.tensorboard=false",
            "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def epas_run(tmp_path_factory):
    """A tiny model trained on one process until 2 of its 4 layers share Q/K."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    run_train(run_dir, EPAS_RUN, resume="none")
    return run_dir


def test_default_regions_are_the_quarters_the_trained_region_and_one_beyond():
    assert default_regions(16, 12) == [0, 4, 8, 12, 13]
    assert default_regions(4, 3) == [0, 1, 2, 3]  # nothing beyond the last layer


def test_eval_scores_every_region_and_generate_warns_outside_the_usable_ones(epas_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(epas_run), "--windows", "3", "--seq-length", "16", "--batch", "2",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(the run's training data, not held out)" in printed
    result = json.loads(out.read_text())
    assert result["step"] == 4 and result["trained_region"] == 2
    assert sorted(map(int, result["losses"])) == [0, 1, 2, 3]
    saved = json.loads((epas_run / QUALITY_FILE).read_text())
    assert saved["losses"] == result["losses"] and saved["usable_regions"] == result["usable_regions"]

    # The loss at a region is the mean next-token cross entropy of the model's forward over the same windows.
    gen = Generator.from_checkpoint(epas_run, device="cpu")
    tokens = read_windows(result["data"], 16, 3)
    assert tokens.shape == (3, 17)
    for region in (0, 2):
        logits = gen.model(tokens[:, :-1], gen.plan_for(region, warn=False)).float()
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
        assert result["losses"][str(region)] == pytest.approx(want, rel=1e-6)

    # A record whose region 0 costs 10% (written by hand: the tiny model's regions barely differ).
    saved.update(losses={"0": 3.3, "2": 3.0, "3": 3.01}, usable_regions=[2, 3])
    (epas_run / QUALITY_FILE).write_text(json.dumps(saved))
    assert generate_main(["--checkpoint", str(epas_run), "--prompt-ids", "5,6", "--max-new-tokens", "2",
                          "--epas-region", "0"]) == 0
    err = capsys.readouterr().err
    assert ("warning: epas region = 0: its held-out loss is +10.00% against the trained region's (2) in "
            f"{epas_run / QUALITY_FILE} (`effdist eval`); regions within 0.5%: 2, 3") in err, err
    assert generate_main(["--checkpoint", str(epas_run), "--prompt-ids", "5", "--max-new-tokens", "1",
                          "--epas-region", "2"]) == 0
    assert "held-out loss" not in capsys.readouterr().err
    assert "is shorter than" not in err  # measured: the record's line, not the expectation
    # A record of another checkpoint (step) says nothing about this one: a region shorter than the trained one
    # turns back on Q/K projections that stopped training when their layers began to share (layer 3 at step 0,
    # layer 2 at step 1 of this run; llama-1b measured +18% at every shorter region).
    (epas_run / QUALITY_FILE).write_text(json.dumps({**saved, "step": 3}))
    assert generate_main(["--checkpoint", str(epas_run), "--prompt-ids", "5", "--max-new-tokens", "1",
                          "--epas-region", "0"]) == 0
    err = capsys.readouterr().err
    assert "held-out loss" not in err
    assert ("warning: epas region = 0 is shorter than the 2 sharing layers this checkpoint was trained with: layers "
            "2, 3 compute their own Q/K again, whose projections have not trained since steps 0-1 of 4; expect worse "
            "text unless `effdist eval --checkpoint ...` measures region 0 within 0.5%") in err, err
    assert generate_main(["--checkpoint", str(epas_run), "--prompt-ids", "5", "--max-new-tokens", "1",
                          "--epas-region", "1"]) == 0
    assert "region = 1 is shorter than the 2 sharing layers this checkpoint was trained with: layer 2 computes its own" \
        in capsys.readouterr().err


def test_a_record_of_a_run_started_over_or_rolled_back_says_nothing_about_the_new_checkpoint(epas_run, tmp_path,
                                                                                              capsys):
    """region_quality.json describes the checkpoint `effdist eval` measured, not any checkpoint of that step: after
    `--resume none --fresh` (or a rollback) the run saves another checkpoint at the same step, and `effdist
    generate` must not warn (or stay silent) from the old model's losses."""
    run = tmp_path / "run"
    shutil.copytree(epas_run, run)
    assert main(["--checkpoint", str(run), "--windows", "2", "--seq-length", "16", "--batch", "2"]) == 0
    saved = json.loads((run / QUALITY_FILE).read_text())
    saved.update(losses={"0": 3.3, "2": 3.0, "3": 3.01}, usable_regions=[2, 3])
    (run / QUALITY_FILE).write_text(json.dumps(saved))
    args = ["--checkpoint", str(run), "--prompt-ids", "5", "--max-new-tokens", "1", "--epas-region", "0"]
    capsys.readouterr()
    assert generate_main(args) == 0
    assert "its held-out loss is +10.00%" in capsys.readouterr().err
    cmd = [sys.executable, "-m", "effdist.train", "--config", str(TINY), "--run-dir", str(run), "--resume", "none",
           "--fresh"] + [a for o in EPAS_RUN + ["train.seed=7"] for a in ("--set", o)]
    proc = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert generate_main(args) == 0
    err = capsys.readouterr().err
    assert "held-out loss" not in err and "is shorter than the 2 sharing layers" in err, err


@pytest.mark.parametrize("args, line", [
    (["--regions", "0,9"], "epas region = 9: this model has 4 layers, so at most 3 can share Q/K"),
    (["--regions", "a"], "--regions 'a': expected comma-separated whole numbers, e.g. 0,4,8,12"),
    (["--data", "nowhere/x"], "--data nowhere/x: no nowhere/x.bin/.idx here"),
    (["--tolerance", "5"], "--tolerance 5.0: a fraction in [0, 1), e.g. 0.005 for 0.5%"),
    (["--windows", "0"], "--windows 0: must be at least 1"),
    (["--seq-length", "4000"], "--seq-length 4000: this model takes at most 256 positions"),
])
def test_bad_input_is_one_line_and_exit_2(epas_run, capsys, args, line):
    assert main(["--checkpoint", str(epas_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("effdist eval: error: ") and line in err[0], err
