"""Reliability in real processes: SIGKILL at random steps (also during an async save) then resume gives
exactly the uninterrupted loss sequence (TP=2 and DP=2); corrupt checkpoints are detected and skipped;
SIGTERM saves and exits for a requeue; non-finite steps are skipped, counted, and stop the run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effdist.runtime.launch_env import PREEMPTED_EXIT_CODE
from tests.launching import ROOT, TINY, clean_env, losses, run_train

pytestmark = pytest.mark.slow

STEPS = 8
BASE = [f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "data.seq_length=64",
        "logging.tensorboard=false", "checkpoint.interval=2", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _cmd(run_dir: Path, overrides: list[str], nproc: int) -> list[str]:
    args = ["--config", str(TINY), "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    if nproc == 1:
        return [sys.executable, "-m", "effdist.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "effdist.train", *args]


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


def _kill_at(run_dir: Path, overrides: list[str], nproc: int, step: int, during_save: bool) -> None:
    """Start a run and SIGKILL its whole process group once it passed `step` (or is mid async save)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(_cmd(run_dir, overrides, nproc), env=clean_env(), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        try:
            while time.time() < deadline and proc.poll() is None:
                text = log.read_text()
                if during_save and "in the background" in text and _last_step(run_dir) >= step:
                    break
                if not during_save and _last_step(run_dir) >= step:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, f"run finished before it could be killed:\n{log.read_text()[-3000:]}"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("layout, nproc, seed, during_save", [("tp2", 2, 11, False), ("dp2", 2, 12, True)])
def test_sigkill_then_resume_reproduces_uninterrupted_run(tmp_path, data_cache, layout, nproc, seed, during_save):
    """TP=2 killed at a random step; DP=2 killed at a random step while an async save is being written."""
    overrides = BASE + [f"data.cache_dir={data_cache}", "checkpoint.async_save=true"]
    if layout == "tp2":
        overrides.append("parallel.tp=2")
    reference = tmp_path / "reference"
    run_train(reference, overrides, nproc=nproc)

    rng = random.Random(seed)
    run = tmp_path / "killed"
    _kill_at(run, overrides, nproc, step=rng.randint(3, STEPS - 2), during_save=during_save)
    assert not any(p.name.endswith(".tmp") and (p / "effdist.json").exists()
                   for p in (run / "checkpoints").iterdir()), "a half-written checkpoint looks complete"
    run_train(run, overrides, nproc=nproc)
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=0), f"step {s}: {got[s]} vs {want[s]}"


def test_corrupt_checkpoint_falls_back_and_sigterm_requeues(tmp_path, data_cache):
    overrides = BASE + [f"data.cache_dir={data_cache}"]
    run = tmp_path / "run"
    # SIGTERM mid-run: a complete checkpoint at the step it stopped, and the requeue exit code.
    run.mkdir()
    log = tmp_path / "term.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_cmd(run, overrides + ["train.steps=200", "checkpoint.interval=0"], 1),
                                env=clean_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while _last_step(run) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    assert rc == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    stopped = _last_step(run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert f"iter_{stopped:07d}" in names, names
    assert (run / "checkpoints" / f"iter_{stopped:07d}" / "effdist.json").is_file()

    # Continue to step 8 with checkpoints every 2 steps, then corrupt the newest one.
    run_train(run, overrides)
    newest = run / "checkpoints" / f"iter_{STEPS:07d}"
    victim = max((p for p in newest.rglob("*.distcp")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_train(run, overrides + [f"train.steps={STEPS + 2}"])
    assert "fails its CRC32 check" in proc.stderr and "falling back" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'iter_{STEPS - 2:07d}'}" in proc.stderr

    # A truncated file is caught by its size alone.
    older = run / "checkpoints" / f"iter_{STEPS + 2:07d}"
    victim = next(older.rglob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:10])
    proc = run_train(run, overrides + [f"train.steps={STEPS + 3}", "checkpoint.verify_crc=false"])
    assert "truncated" in proc.stderr, proc.stderr[-3000:]


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, data_cache):
    overrides = BASE + [f"data.cache_dir={data_cache}", "checkpoint.interval=0"]
    run = tmp_path / "one_nan"
    env_run = dict(EFFDIST_FAULT_NAN_STEPS="3")
    proc = subprocess.run(_cmd(run, overrides, 1), env=clean_env(**env_run), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[2]["loss"] is None or recs[2]["loss"] != recs[2]["loss"] or str(recs[2]["loss"]) == "nan"
    assert recs[-1]["skipped_steps"] == 1
    assert "update skipped" in proc.stderr

    run = tmp_path / "many_nan"
    proc = subprocess.run(_cmd(run, overrides + ["train.max_consecutive_nonfinite=3"], 1),
                          env=clean_env(EFFDIST_FAULT_NAN_STEPS="3,4,5"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in proc.stderr
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir()), \
        "a checkpoint was written from a non-finite state"
