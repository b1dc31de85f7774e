"""Reliability in real processes: SIGKILL at random steps (also during an async save) then resume gives
exactly the uninterrupted loss sequence (TP=2 and DP=2); corrupt checkpoints are detected and skipped;
SIGTERM saves and exits for a requeue; non-finite steps are skipped, counted, and stop the run.

Launches are few: the killed runs and their references go two at a time from one fixture, and the
single-process scenarios chain in one run directory (each starts where the previous one ended)."""

from __future__ import annotations

import contextlib
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
from tests.launching import NO_CHECKPOINTS, ROOT, TINY, clean_env, in_parallel, losses, run_train

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
            with contextlib.suppress(ProcessLookupError):  # the run may have ended by itself: keep its assertion
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


LAYOUTS = {"tp2": dict(nproc=2, seed=11, during_save=False), "dp2": dict(nproc=2, seed=12, during_save=True)}


def _sigkill_overrides(layout: str, data_cache: Path) -> list[str]:
    overrides = BASE + [f"data.cache_dir={data_cache}", "checkpoint.async_save=true"]
    return overrides + (["parallel.tp=2"] if layout == "tp2" else [])


def _killed_and_resumed(run: Path, layout: str, data_cache: Path) -> list[str]:
    """Kill a run at a random step, note what looks like a complete checkpoint but is half-written, resume."""
    spec, overrides = LAYOUTS[layout], _sigkill_overrides(layout, data_cache)
    step = random.Random(spec["seed"]).randint(3, STEPS - 2)
    _kill_at(run, overrides, spec["nproc"], step=step, during_save=spec["during_save"])
    half_written = [p.name for p in (run / "checkpoints").iterdir()
                    if p.name.endswith(".tmp") and (p / "effdist.json").exists()]
    run_train(run, overrides, nproc=spec["nproc"])
    return half_written


@pytest.fixture(scope="module")
def sigkilled_runs(tmp_path_factory, data_cache):
    """Both layouts' killed-then-resumed runs and their uninterrupted references, launched two at a time.

    The references only give losses: they skip saving (a save does not change what a step computes, which
    the comparison itself proves: the killed runs save every 2 steps)."""
    root = tmp_path_factory.mktemp("sigkill")
    jobs = {}
    for layout, spec in LAYOUTS.items():
        jobs[f"{layout}/killed"] = (lambda layout=layout: _killed_and_resumed(root / layout / "killed", layout,
                                                                                data_cache))
        jobs[f"{layout}/reference"] = (lambda layout=layout, spec=spec: run_train(
            root / layout / "reference", _sigkill_overrides(layout, data_cache) + NO_CHECKPOINTS,
            nproc=spec["nproc"]))
    done = in_parallel(jobs)
    return {layout: (root / layout, done[f"{layout}/killed"]) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_then_resume_reproduces_uninterrupted_run(sigkilled_runs, layout):
    """TP=2 killed at a random step; DP=2 killed at a random step while an async save is being written."""
    root, half_written = sigkilled_runs[layout]
    assert not half_written, f"a half-written checkpoint looks complete: {half_written}"
    got, want = losses(root / "killed"), losses(root / "reference")
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=0), f"step {s}: {got[s]} vs {want[s]}"


def _train(run: Path, overrides: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run, overrides, 1), env=clean_env(**env), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _checkpoints(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("iter_")}


def test_corrupt_checkpoint_falls_back_sigterm_requeues_and_nonfinite_steps_are_skipped_then_stop_the_run(
        tmp_path, data_cache):
    """One run directory through four launches (each scenario starts where the previous one ended):
    SIGTERM mid-run saves and exits for a requeue; a checkpoint that fails its CRC is skipped for the older
    one, and on the way a non-finite step is skipped and counted while the run finishes; a truncated
    checkpoint is caught by its size, and then three non-finite steps in a row stop the run unsaved."""
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
    # The run that falls back to step 6 gets a non-finite loss at step 9: skipped, counted, and it finishes.
    nan_step = STEPS + 1
    proc = _train(run, overrides + [f"train.steps={STEPS + 2}"], EFFDIST_FAULT_NAN_STEPS=str(nan_step))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fails its CRC32 check" in proc.stderr and "falling back" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'iter_{STEPS - 2:07d}'}" in proc.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in recs if r.get("step") == nan_step][-1]
    assert skipped["loss"] is None or skipped["loss"] != skipped["loss"] or str(skipped["loss"]) == "nan"
    assert recs[-1]["step"] == STEPS + 2 and recs[-1]["skipped_steps"] == 1
    assert "update skipped" in proc.stderr

    # A truncated file is caught by its size alone. The run that falls back then has 3 non-finite steps in
    # a row (its limit): it stops with a named error and saves nothing (no periodic saves in between either).
    older = run / "checkpoints" / f"iter_{STEPS + 2:07d}"
    victim = next(older.rglob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:10])
    before = _checkpoints(run)
    nan_steps = [STEPS + 1, STEPS + 2, STEPS + 3]
    proc = _train(run, overrides + [f"train.steps={STEPS + 4}", "checkpoint.verify_crc=false",
                                    "train.max_consecutive_nonfinite=3", "checkpoint.interval=0"],
                  EFFDIST_FAULT_NAN_STEPS=",".join(map(str, nan_steps)))
    assert "truncated" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'iter_{STEPS:07d}'}" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss" in proc.stderr, proc.stderr[-3000:]
    assert _checkpoints(run) <= before, f"a checkpoint was written from a non-finite state: {_checkpoints(run) - before}"
