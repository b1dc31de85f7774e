"""What an operator does to a run directory, in real processes (tiny-cpu, a few steps each): nothing is
lost, nothing restarts silently.

- one trainer per run directory (a second one exits at once naming the holder; SIGKILL frees the lock);
- `--resume none` refuses where a run exists; `--resume none --fresh` moves it aside, deletes nothing;
- a rollback sticks (the newer checkpoints are moved aside, `--resume auto` continues the rollback line,
  metrics.jsonl records the rollback and plots draw the current line);
- `--resume auto` with checkpoints but none loadable fails with one line per checkpoint;
- resuming with a config that changes tensor shapes is a named error listing the keys;
- a full disk, a failing write, non-finite weights or a non-finite last step: a named error, no
  checkpoint written, the older ones intact.
- Ctrl-C: at once, one line naming the checkpoint to resume from; also while starting (imports, data
  preparation) and inside library code that wraps the KeyboardInterrupt.

The scenarios share processes where one run's end is the next one's start, to keep the file at a few
process launches per behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launching import ROOT, TINY, clean_env, free_port, in_parallel

pytestmark = pytest.mark.slow

BASE = ["train.global_batch=8", "train.micro_batch=2", "data.seq_length=64", "logging.tensorboard=false",
        "logging.progress_bar=false", "optim.warmup_steps=2", "checkpoint.keep_last=20"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _cmd(run: Path, overrides: list[str], resume: str = "auto", fresh: bool = False) -> list[str]:
    args = ["--config", str(TINY), "--run-dir", str(run), "--resume", resume] + (["--fresh"] if fresh else [])
    for o in overrides:
        args += ["--set", o]
    return [sys.executable, "-m", "effdist.train", *args]


def _train(run: Path, data_cache: Path, extra: list[str], resume: str = "auto", fresh: bool = False,
           env: dict[str, str] | None = None, preexec_fn=None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    overrides = BASE + [f"data.cache_dir={data_cache}"] + extra
    return subprocess.run(_cmd(run, overrides, resume, fresh), env=clean_env(**(env or {})), cwd=cwd,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)


@contextlib.contextmanager
def _long_run(run: Path, data_cache: Path, extra: list[str], log: Path, **popen):
    """A trainer of 100000 steps in the background (its own session, output to `log`), killed with its process
    group on leaving the block if it is still running (as a preemption without warning would)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(_cmd(run, BASE + [f"data.cache_dir={data_cache}", "train.steps=100000"] + extra),
                                env=clean_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                **popen)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _names(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("iter_"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _last_step(run: Path) -> int:
    try:
        steps = [r["step"] for r in _records(run) if "loss" in r]
        return steps[-1] if steps else 0
    except (OSError, ValueError):
        return 0


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 240
    while _last_step(run) < step:
        assert proc.poll() is None, f"the run ended before step {step}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no step {step} after 240 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _error_lines(proc: subprocess.CompletedProcess) -> str:
    return "\n".join(line for line in proc.stderr.splitlines() if "effdist" in line)


def test_lock_start_over_rollback_and_fresh(tmp_path, data_cache):
    from effdist.train.metrics import current_line, read_metrics
    from effdist.train.plot import series

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # keep_every: steps 4, 8 and 12 survive however far the holder gets before the kill (on a fast machine it
    # runs ~100 steps while the second trainer starts); the step count is out of its reach in that time.
    first = ["train.steps=100000", "checkpoint.interval=4", "checkpoint.keep_every=4"]

    # A long run holds the directory; a second trainer on it exits at once, naming the holder.
    log = tmp_path / "first.log"
    # Killed on leaving the block, as a preemption without warning would: the lock must die with it.
    with _long_run(run, data_cache, first[1:], log) as holder:
        _wait_for_step(run, 1, holder, log)
        second = _train(run, data_cache, first)
        assert second.returncode == 2, second.stderr[-3000:]
        assert (f"is in use by another trainer (host {socket.gethostname()}, pid {holder.pid}, started"
                in second.stderr), second.stderr[-3000:]
        assert "Traceback" not in second.stderr, second.stderr[-3000:]
        # The first trainer's metrics are whole: the second one touched nothing. Step 13 is logged after the
        # (synchronous) save at step 12 is visible, so the kill below cannot land inside that save.
        _wait_for_step(run, 13, holder, log)
        steps = [r["step"] for r in _records(run)]
        assert steps == list(range(1, len(steps) + 1)), steps
    killed_at = [int(n[len("iter_"):]) for n in _names(ckpts) if not n.endswith(".tmp")]
    assert {4, 8, 12} <= set(killed_at), killed_at

    # Starting over in it is refused (and the refusal, not "in use", shows the lock died with SIGKILL).
    refused = _train(run, data_cache, ["train.steps=4"], resume="none")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "already holds a run" in refused.stderr and "--fresh" in refused.stderr, _error_lines(refused)
    assert {f"iter_{s:07d}" for s in killed_at} <= set(_names(ckpts))

    # Roll back to step 4, stop at step 6 (as a preemption would), then --resume auto: it continues the
    # rollback line, not the newer checkpoints of the abandoned one.
    back = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2"], resume=str(ckpts / "iter_0000004"))
    assert back.returncode == 0, back.stderr[-3000:]
    assert "moved" in back.stderr and "iter_0000012" in back.stderr, _error_lines(back)
    assert _names(ckpts) == ["iter_0000004", "iter_0000006"], _names(ckpts)
    aside = next((ckpts / "rolled-back").iterdir())
    assert {"iter_0000008", "iter_0000012"} <= set(_names(aside)), _names(aside)
    assert (ckpts / "latest").read_text() == "iter_0000006"

    auto = _train(run, data_cache, ["train.steps=8", "checkpoint.interval=2"])
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert f"resumed from {ckpts / 'iter_0000006'} at step 6" in auto.stderr, _error_lines(auto)
    records = read_metrics(run)
    events = [r for r in records if "event" in r]
    assert len(events) == 1 and events[0]["event"] == "rollback" and events[0]["step"] == 4, events
    assert events[0]["from_step"] >= 12
    # The abandoned line is kept in the file (before the event); the current line is steps 1..8 once.
    assert max(r["step"] for r in records[:records.index(events[0])]) >= 12
    line = current_line(records)
    assert [r["step"] for r in line] == list(range(1, 9))
    steps, _ = series(run, "loss")
    assert steps == list(range(1, 9))

    # --resume none --fresh moves the whole run into previous/<time>/ and starts over.
    fresh = _train(run, data_cache, ["train.steps=2", "checkpoint.interval=2"], resume="none", fresh=True)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    old = next((run / "previous").iterdir())
    assert _names(old / "checkpoints") == ["iter_0000004", "iter_0000006", "iter_0000008"]
    assert (old / "checkpoints" / "rolled-back").is_dir()
    assert [r["step"] for r in current_line(read_metrics(old))] == list(range(1, 9))
    assert _names(ckpts) == ["iter_0000002"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_nothing_to_do_past_train_steps_says_past_not_step_8_of_3():
    """A run at step 8 started again with --set train.steps=3 said 'already at step 8 of 3'; it says the run is past
    train.steps and how far to raise it. At train.steps the line is as docs/launch.md quotes it."""
    from types import SimpleNamespace

    from effdist.train.trainer import Trainer

    def line(step: int, steps: int) -> str:
        cfg = SimpleNamespace(train=SimpleNamespace(steps=steps))
        return Trainer._nothing_to_do_line(SimpleNamespace(cfg=cfg, step=step, run_dir="runs/r", resume="auto"))

    assert line(8, 3) == ("nothing to do: the run in runs/r is already at step 8, past train.steps = 3 (raise "
                          "train.steps above 8, or start over with --resume none --fresh or another --run-dir)")
    assert line(3, 3) == ("nothing to do: the run in runs/r is already at step 3 of 3 (raise train.steps, or start "
                          "over with --resume none --fresh or another --run-dir)")


def test_fresh_needs_resume_none(tmp_path):
    proc = subprocess.run(_cmd(tmp_path / "run", BASE, resume="auto", fresh=True), env=clean_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--fresh starts over: use it with --resume none" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, data_cache):
    """A finished 4-step run with checkpoints at steps 2 and 4, copied by each scenario."""
    run = tmp_path_factory.mktemp("base") / "run"
    proc = _train(run, data_cache, ["train.steps=4", "checkpoint.interval=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_no_loadable_checkpoint_and_shape_change_are_named(tmp_path, data_cache, four_steps):
    from effdist.train import checkpoint as ckpt

    # Every checkpoint damaged: one lost its effdist.json, one is truncated. Exit non-zero, one line each.
    run = _copy(four_steps, tmp_path / "damaged")
    (run / "checkpoints" / "iter_0000004" / "effdist.json").unlink()
    victim = next((run / "checkpoints" / "iter_0000002").glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:10])
    before = (run / "metrics.jsonl").read_text()
    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert "2 checkpoint(s)" in err and "none loadable" in err, _error_lines(proc)
    assert "iter_0000004 has no readable effdist.json" in err and "truncated" in err, _error_lines(proc)
    assert "resumed from" not in err and "done:" not in err
    assert (run / "metrics.jsonl").read_text() == before
    assert _names(run / "checkpoints") == ["iter_0000002", "iter_0000004"]

    # A change of tensor shapes is refused before loading, naming every differing key and the fix.
    run = _copy(four_steps, tmp_path / "reshaped")
    proc = _train(run, data_cache, ["train.steps=6", "model.make_vocab_size_divisible_by=128",
                                    "model.ffn_hidden_size=192"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("model.ffn_hidden_size: 176 in the checkpoint, 192 now; model.make_vocab_size_divisible_by: 64 in the "
            "checkpoint, 128 now" in proc.stderr), _error_lines(proc)
    assert "--set model.ffn_hidden_size=176 --set model.make_vocab_size_divisible_by=64" in proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("iter_0000002", "iter_0000004"):
        ckpt.verify(four_steps / "checkpoints" / name)


def test_a_float32_checkpoint_resumed_in_half_precision_is_refused_in_one_line(tmp_path, data_cache, four_steps):
    """A float32 run (train.dtype auto on a CPU) resumed with train.dtype=bf16 or fp16 (or auto on a GPU): megatron's
    mixed-precision optimizer loads fp32 master weights the checkpoint does not hold, and the load ended in a
    KeyError traceback (`optimizer.state.master... not in state dict`), exit 1. Refused before loading, exit 2."""
    run = _copy(four_steps, tmp_path / "half")
    before = (run / "metrics.jsonl").read_text()
    proc = _train(run, data_cache, ["train.steps=6", "train.dtype=bf16"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("iter_0000004 was trained in float32 and this run would train in bfloat16 (train.dtype=bf16)"
            in proc.stderr), _error_lines(proc)
    assert "--set train.dtype=fp32" in proc.stderr and "checkpoint.init_from=" in proc.stderr, _error_lines(proc)
    assert (run / "metrics.jsonl").read_text() == before and _names(run / "checkpoints") == ["iter_0000002",
                                                                                             "iter_0000004"]


def test_a_config_yaml_of_the_users_in_the_run_directory_is_moved_aside_not_overwritten(tmp_path, data_cache):
    """--run-dir a directory holding the user's own config.yaml (a hand-written config kept with the experiment): the
    run's record of its resolved config replaced it without a word. It is moved into previous/<time>/, said in one
    line; a trainer's own record (a run that never logged a step) is still replaced in place."""
    run = tmp_path / "mine"
    run.mkdir()
    (run / "config.yaml").write_text("# my notes\nmodel: {num_layers: 4}\n")
    (run / "README").write_text("mine\n")
    proc = _train(run, data_cache, ["train.steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = list((run / "previous").glob("*/config.yaml"))
    assert [p.read_text() for p in kept] == ["# my notes\nmodel: {num_layers: 4}\n"], kept
    assert f"moved it to {kept[0]}" in proc.stderr, _error_lines(proc)
    assert (run / "README").read_text() == "mine\n" and "steps: 2" in (run / "config.yaml").read_text()
    # The run's own record is not foreign: training on replaces it in place, nothing more is moved.
    proc = _train(run, data_cache, ["train.steps=3"])
    assert proc.returncode == 0 and "moved it to" not in proc.stderr, proc.stderr[-3000:]
    assert list((run / "previous").glob("*/config.yaml")) == kept and "steps: 3" in (run / "config.yaml").read_text()


def test_missing_checkpoints_and_resumes_from_elsewhere_never_restart_silently(tmp_path, data_cache, four_steps):
    """--resume auto must not start at step 0 over a run whose checkpoints went missing, nor replace the records
    of a run that never saved; a resume from another run's checkpoint moves this run's line aside only when it
    trains, and the line it left is named afterwards.

    Each scenario trains its own copy of the 4-step run: the copies are prepared first, their trainers run two at
    a time (the three launches on one copy, "mine", in a row), and the checks follow in the same order."""
    from effdist.train.metrics import read_metrics

    before = (four_steps / "metrics.jsonl").read_text()
    launches = {}

    # Every checkpoint gone, `latest` still naming one (a moved or unmounted checkpoint directory): refused.
    vanished = _copy(four_steps, tmp_path / "vanished")
    for name in _names(vanished / "checkpoints"):
        shutil.rmtree(vanished / "checkpoints" / name)
    launches["vanished"] = lambda: _train(vanished, data_cache, ["train.steps=6", "checkpoint.interval=2"])

    # Only the newest gone: continue from the one before, say so, keep the records of the steps redone.
    newest_gone = _copy(four_steps, tmp_path / "newest-gone")
    shutil.rmtree(newest_gone / "checkpoints" / "iter_0000004")
    launches["newest-gone"] = lambda: _train(newest_gone, data_cache, ["train.steps=6", "checkpoint.interval=2"])

    # A run that never saved: its records move into previous/<time>/, the new run starts at 0 beside them.
    never_saved = _copy(four_steps, tmp_path / "never-saved")
    shutil.rmtree(never_saved / "checkpoints")
    launches["never-saved"] = lambda: _train(never_saved, data_cache, ["train.steps=2", "checkpoint.interval=2"])

    # Loading an older checkpoint of this run with nothing to train changes nothing: its newer checkpoints, the
    # records of the steps after it (tensorboard's too) and config.yaml stay as they were.
    nothing = _copy(four_steps, tmp_path / "nothing-to-do")
    kept = {p.relative_to(nothing): p.read_bytes() for p in nothing.rglob("*")
            if p.is_file() and p.name != "effdist.lock"}
    launches["nothing-to-do"] = lambda: _train(
        nothing, data_cache, ["train.steps=2", "checkpoint.interval=2", "logging.tensorboard=true"],
        resume=str(nothing / "checkpoints" / "iter_0000002"))

    # A run that continues from its own checkpoints no longer needs the checkpoint.init_from it started from.
    init_from_gone = _copy(four_steps, tmp_path / "init-from-gone")
    launches["init-from-gone"] = lambda: _train(init_from_gone, data_cache, [
        "train.steps=5", "checkpoint.interval=2", f"checkpoint.init_from={tmp_path / 'deleted-source'}"])

    # A changed global batch is said on resume (the data goes on by samples consumed); so is a change of what decides
    # the samples (sequence length, seed), which used to pass without a word.
    bigger = _copy(four_steps, tmp_path / "bigger-batch")
    saved = yaml.safe_load((four_steps / "config.yaml").read_text())
    seq, seed = saved["data"]["seq_length"], saved["train"]["seed"]
    launches["bigger-batch"] = lambda: _train(bigger, data_cache, [
        "train.steps=5", "checkpoint.interval=2", "train.global_batch=16", f"data.seq_length={seq // 2}",
        "train.seed=7"])

    # --resume at another run's checkpoint, first with nothing to train, then with steps to train; then --resume
    # auto once the new line's save is lost too. One after the other on one copy, checked below.
    mine = _copy(four_steps, tmp_path / "mine")
    other = four_steps / "checkpoints" / "iter_0000004"
    config_yaml = (mine / "config.yaml").read_text()
    mine_states = {}

    def mine_in_a_row():
        nothing_to_train = _train(mine, data_cache, ["train.steps=4", "checkpoint.interval=2", "logging.interval=7"],
                                  resume=str(other))
        mine_states["after nothing to train"] = (_names(mine / "checkpoints"), (mine / "config.yaml").read_text(),
                                                 (mine / "checkpoints" / "latest").read_text().strip())
        if nothing_to_train.returncode != 0:
            return nothing_to_train, None, None
        trained = _train(mine, data_cache, ["train.steps=6", "checkpoint.interval=2"], resume=str(other))
        if trained.returncode != 0:
            return nothing_to_train, trained, None
        mine_states["after training"] = (_names(mine / "checkpoints"),
                                         yaml.safe_load((mine / "config.yaml").read_text())["train"]["steps"],
                                         sorted(p.name for p in (mine / "checkpoints" / "rolled-back").iterdir()))
        aside = next((mine / "checkpoints" / "rolled-back").iterdir())
        mine_states["aside"] = (aside, sorted(p.name for p in aside.iterdir()))
        shutil.rmtree(mine / "checkpoints" / "iter_0000006")
        (mine / "checkpoints" / "latest").unlink()
        return nothing_to_train, trained, _train(mine, data_cache, ["train.steps=8", "checkpoint.interval=2"])

    done = in_parallel({"mine": mine_in_a_row, **launches})

    proc = done["vanished"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"--resume auto: {vanished / 'checkpoints' / 'latest'} names iter_0000004, which does not exist"
            in proc.stderr), _error_lines(proc)
    assert (vanished / "metrics.jsonl").read_text() == before

    proc = done["newest-gone"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latest names iter_0000004, which does not exist; continuing from iter_0000002" in proc.stderr
    records = read_metrics(newest_gone)
    steps = [r.get("step") if "event" not in r else "event" for r in records]
    assert steps == [1, 2, 3, 4, "event", 3, 4, 5, 6], steps

    proc = done["never-saved"]
    assert proc.returncode == 0 and "which never saved, moved into" in proc.stderr, proc.stderr[-3000:]
    (previous,) = (never_saved / "previous").iterdir()
    assert (previous / "metrics.jsonl").read_text() == before
    assert [r["step"] for r in read_metrics(never_saved)] == [1, 2]

    proc = done["nothing-to-do"]
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr[-3000:]
    # train.steps 4 -> 2 changes the LR schedule, which matters only to steps that will not be trained.
    assert "LR schedule changed" not in proc.stderr, _error_lines(proc)
    now = {p.relative_to(nothing): p.read_bytes() for p in nothing.rglob("*")
           if p.is_file() and p.name != "effdist.lock"}
    assert now == kept, sorted(set(now) ^ set(kept)) or [str(k) for k in now if now[k] != kept.get(k)]

    proc = done["init-from-gone"]
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]

    proc = done["bigger-batch"]
    assert proc.returncode == 0 and "train.global_batch changed since iter_0000004: 8 -> 16" in proc.stderr, \
        proc.stderr[-3000:]
    assert (f"WARNING: the data order changed since iter_0000004 (data.seq_length: {seq} -> {seq // 2}; train.seed: "
            f"{seed} -> 7): the samples after step 4 are not the ones this run would have seen; --set "
            f"data.seq_length={seq} --set train.seed={seed} continues exactly") in proc.stderr, _error_lines(proc)

    # --resume at another run's checkpoint with nothing to train: nothing of this run moves.
    proc, trained, lost = done["mine"]
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr[-3000:]
    names, config_now, latest = mine_states["after nothing to train"]
    assert names == ["iter_0000002", "iter_0000004"]
    # config.yaml still describes the invocation that trained here, not the one that found nothing to do.
    assert config_now == config_yaml
    assert latest == "iter_0000004"
    # ... with steps to train: this run's checkpoints and `latest` move aside together, the new line saves here.
    assert trained is not None and trained.returncode == 0, trained and trained.stderr[-3000:]
    names, steps_in_config, rolled_back = mine_states["after training"]
    assert names == ["iter_0000006"]
    assert steps_in_config == 6
    assert len(rolled_back) == 1, rolled_back
    aside, aside_names = mine_states["aside"]
    assert aside_names == ["README", "iter_0000002", "iter_0000004", "latest"]
    # ... and when the new line's save is lost too, --resume auto names where this run's own checkpoints went.
    assert lost is not None
    proc = lost
    assert proc.returncode == 2 and "were moved aside into" in proc.stderr, proc.stderr[-3000:]
    assert str(aside / "iter_0000004") in proc.stderr, _error_lines(proc)



def test_a_rollback_with_nothing_to_train_says_the_run_stays_where_it_is(tmp_path, data_cache, four_steps):
    """--resume at an older checkpoint of the run whose step is train.steps: it said "nothing to do: the run in R is
    already at step 2 of 2" although the run is at step 4 and nothing rolled back. Now the one line says the
    checkpoint asked for is at train.steps, the run stays at step 4 with nothing moved, and how to train on."""
    run = _copy(four_steps, tmp_path / "run")
    ckpts = run / "checkpoints"
    kept = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "effdist.lock"}
    back = ckpts / "iter_0000002"
    proc = _train(run, data_cache, ["train.steps=2", "checkpoint.interval=2"], resume=str(back))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "nothing to do" in line]
    assert lines == [f"[effdist] nothing to do: the checkpoint to roll back to, --resume {back}, is at step 2 = "
                     f"train.steps, so there is nothing to train after it; the run in {run} stays at step 4 "
                     "(iter_0000004), nothing moved. To train on from step 2, raise train.steps (e.g. --set "
                     "train.steps=4) with the same --resume"], _error_lines(proc)
    now = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "effdist.lock"}
    assert now == kept, sorted(set(now) ^ set(kept)) or [str(k) for k in now if now[k] != kept.get(k)]
    assert (ckpts / "latest").read_text() == "iter_0000004"

def test_two_runs_sharing_one_checkpoint_dir_never_take_or_delete_each_others_checkpoints(tmp_path, data_cache):
    """checkpoint.dir shared by two run directories: the second run neither resumes from the first one's
    checkpoints nor deletes them through checkpoint.keep_last (one line, exit 2); while one trainer saves there,
    a second one is refused at once; the owner itself still resumes."""
    shared = tmp_path / "shared"
    first, second = tmp_path / "first", tmp_path / "second"
    proc = _train(first, data_cache, ["train.steps=4", "checkpoint.interval=2", f"checkpoint.dir={shared}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _train(second, data_cache, ["train.steps=6", "checkpoint.interval=2", f"checkpoint.dir={shared}",
                                       "checkpoint.keep_last=1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"checkpoint.dir = '{shared}' holds the checkpoints of another run (iter_0000004 was saved by the run "
            f"in {first.resolve()})") in proc.stderr, _error_lines(proc)
    assert _names(shared) == ["iter_0000002", "iter_0000004"]
    assert not (second / "metrics.jsonl").exists()
    proc = _train(second, data_cache, ["train.steps=6", f"checkpoint.dir={shared}"], resume="none", fresh=True)
    assert proc.returncode == 2 and "holds the checkpoints of another run" in proc.stderr, proc.stderr[-3000:]
    assert _names(shared) == ["iter_0000002", "iter_0000004"] and not (shared / "previous").exists()
    proc = _train(first, data_cache, ["train.steps=6", "checkpoint.interval=2", f"checkpoint.dir={shared}"])
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    # A run directory moved elsewhere (its old path gone) still continues from its checkpoint.dir.
    moved = tmp_path / "first-moved"
    first.rename(moved)
    proc = _train(moved, data_cache, ["train.steps=8", "checkpoint.interval=2", f"checkpoint.dir={shared}"])
    assert proc.returncode == 0 and "resumed from" in proc.stderr and "at step 6" in proc.stderr, proc.stderr[-3000:]

    # Two trainers at once on one checkpoint.dir that holds nothing yet: the second is refused, naming the first;
    # so is one whose checkpoint.dir is the holder's checkpoint.dir as a run directory's default (fifth/checkpoints),
    # and one whose checkpoint.dir is the default one of the holder's run directory (third/checkpoints).
    empty = tmp_path / "fifth" / "checkpoints"
    log = tmp_path / "holder.log"
    with _long_run(tmp_path / "third", data_cache, [f"checkpoint.dir={empty}"], log) as holder:
        _wait_for_step(tmp_path / "third", 1, holder, log)
        # Two refused trainers side by side (the holder trains, a core, only until the last one exits), then the
        # third: "same" and "default" both want fifth/checkpoints, and while "default" briefly holds its run
        # directory fifth on its way to being refused, "same" may be refused for that run instead of the holder.
        refused = in_parallel({
            "same": lambda: _train(tmp_path / "fourth", data_cache, ["train.steps=2", f"checkpoint.dir={empty}"]),
            "holders": lambda: _train(tmp_path / "sixth", data_cache,
                                      ["train.steps=2", f"checkpoint.dir={tmp_path / 'third' / 'checkpoints'}"]),
        }, workers=2)
        refused["default"] = _train(tmp_path / "fifth", data_cache, ["train.steps=2"])
        assert holder.poll() is None, f"the holder ended while the others were refused:\n{log.read_text()[-3000:]}"
    same, default, holders = refused["same"], refused["default"], refused["holders"]
    for proc in (same, default, holders):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"checkpoint.dir {empty} is in use by another trainer (host {socket.gethostname()}, pid {holder.pid}" \
        in same.stderr, _error_lines(same)
    assert f"checkpoint.dir {empty} is in use by another trainer (host {socket.gethostname()}, pid {holder.pid}" \
        in default.stderr, _error_lines(default)
    assert (f"checkpoint.dir = '{tmp_path / 'third' / 'checkpoints'}' is the checkpoint directory of the run in "
            f"{(tmp_path / 'third').resolve()}, which is training now (host {socket.gethostname()}, pid {holder.pid}"
            in holders.stderr), _error_lines(holders)
    assert not (tmp_path / "fifth" / "metrics.jsonl").exists() and not (tmp_path / "sixth" / "metrics.jsonl").exists()
    # A refused trainer leaves no empty run directory behind where it created one.
    assert not (tmp_path / "fourth").exists() and not (tmp_path / "sixth").exists()


def test_a_changed_checkpoint_dir_never_restarts_a_run_that_saved(tmp_path, data_cache, four_steps):
    """--resume auto with checkpoint.dir set (or unset) after the run saved elsewhere: refused with one line naming
    where its checkpoints are, instead of "the earlier run, which never saved" and a silent start at step 0;
    --resume at one of them continues and saves into the new checkpoint.dir."""
    run = _copy(four_steps, tmp_path / "run")
    before = (run / "metrics.jsonl").read_text()
    elsewhere = tmp_path / "elsewhere"
    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2", f"checkpoint.dir={elsewhere}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"--resume auto: checkpoint.dir {elsewhere} holds no checkpoint, but this run saved up to iter_0000004 "
            f"into {run / 'checkpoints'} before checkpoint.dir changed") in proc.stderr, _error_lines(proc)
    assert (run / "metrics.jsonl").read_text() == before and not (run / "previous").exists()
    assert _names(run / "checkpoints") == ["iter_0000002", "iter_0000004"]
    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2", f"checkpoint.dir={elsewhere}"],
                  resume=str(run / "checkpoints" / "iter_0000004"))
    assert proc.returncode == 0 and "at step 4" in proc.stderr, proc.stderr[-3000:]
    assert _names(elsewhere) == ["iter_0000006"]
    # ... and back: config.yaml names `elsewhere`, RUN_DIR/checkpoints holds older ones only (resuming from those
    # would drop the records of steps 5-6): refused too.
    before = (run / "metrics.jsonl").read_text()
    proc = _train(run, data_cache, ["train.steps=8", "checkpoint.interval=2"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"holds checkpoints up to iter_0000004 only, but this run saved up to iter_0000006 into {elsewhere}"
            in proc.stderr), _error_lines(proc)
    assert (run / "metrics.jsonl").read_text() == before


def test_a_relative_checkpoint_dir_is_found_from_another_working_directory(tmp_path, data_cache):
    """checkpoint.dir given relative (to the working directory, as megatron reads it) is recorded absolute in the run's
    config.yaml: --resume auto started from another directory, where the same relative string names an empty place,
    is refused naming where the checkpoints are (it used to move the records aside and start at step 0), and
    continues from the first directory."""
    first, other = tmp_path / "first-cwd", tmp_path / "other-cwd"
    first.mkdir(), other.mkdir()
    run = tmp_path / "run"
    proc = _train(run, data_cache, ["train.steps=2", "checkpoint.interval=2", "checkpoint.dir=ck"], cwd=first)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["checkpoint"]["dir"] == str(first / "ck")
    before = (run / "metrics.jsonl").read_text()
    proc = _train(run, data_cache, ["train.steps=4", "checkpoint.interval=2", "checkpoint.dir=ck"], cwd=other)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"--resume auto: checkpoint.dir ck holds no checkpoint, but this run saved up to iter_0000002 into "
            f"{first / 'ck'} before checkpoint.dir changed") in proc.stderr, _error_lines(proc)
    assert (run / "metrics.jsonl").read_text() == before and not (run / "previous").exists()
    proc = _train(run, data_cache, ["train.steps=4", "checkpoint.interval=2", "checkpoint.dir=ck"], cwd=first)
    assert proc.returncode == 0 and "at step 2" in proc.stderr, proc.stderr[-3000:]


def test_a_damaged_metrics_file_is_named_not_a_traceback(tmp_path, data_cache, four_steps):
    from effdist.train.plot import main as plot_main

    run = _copy(four_steps, tmp_path / "edited")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1] + ["{oops"] + lines[1:]) + "\n")
    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{run / 'metrics.jsonl'}:2: not a JSON object" in proc.stderr, _error_lines(proc)
    assert _names(run / "checkpoints") == ["iter_0000002", "iter_0000004"]
    assert plot_main([str(run), "--out", str(tmp_path / "loss.png")]) == 2


def test_shape_keys_cover_ffn_and_vocab_but_not_the_layout():
    from effdist.config import Config
    from effdist.train.checkpoint import shape_changes

    saved = Config().to_dict()
    for key, value in [("ffn.elas_expand", 2.0), ("ffn.elas_rank", 16), ("ffn.kind", "elas"),
                       ("model.make_vocab_size_divisible_by", 128), ("model.num_layers", 8),
                       ("model.hidden_size", 128), ("model.num_attention_heads", 8)]:
        now = Config().to_dict()
        section, name = key.split(".")
        now[section][name] = value
        assert [k for k, _, _ in shape_changes(saved, now)] == [key]
    now = Config().to_dict()
    now["parallel"].update(tp=2, pp=2)
    now["train"].update(steps=10, global_batch=64, micro_batch=1)
    now["optim"]["distributed_optimizer"] = True
    assert shape_changes(saved, now) == []


def test_the_data_order_check_compares_the_files_data_paths_name(tmp_path, monkeypatch):
    """data.paths on resume: the same files under another spelling (relative from the run's directory, absolute) are
    no change; the same relative spelling from another directory is, and is said with the files it names."""
    from effdist.config import load_config
    from effdist.train.trainer import data_order_changes, resolved_data_paths

    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    saved_cfg = load_config(TINY, ["data.kind=indexed", "data.paths=[data/web]"])
    marker = {"config": saved_cfg.to_dict(), "data_paths": resolved_data_paths(saved_cfg)}
    assert marker["data_paths"] == [str(tmp_path / "a" / "data" / "web")]
    absolute = load_config(TINY, ["data.kind=indexed", f"data.paths=[{tmp_path / 'a' / 'data' / 'web'}]"])
    assert data_order_changes(marker, absolute) == []
    monkeypatch.chdir(tmp_path / "b")
    assert data_order_changes(marker, saved_cfg) == [
        ("data.paths", [str(tmp_path / "a" / "data" / "web")], [str(tmp_path / "b" / "data" / "web")])]
    # A checkpoint saved before the marker named the files: its config's spelling, as before.
    assert data_order_changes({"config": saved_cfg.to_dict()}, saved_cfg) == []


def test_a_save_into_a_deleted_run_directory_makes_nothing_and_names_the_directory(tmp_path):
    """The run directory deleted after the check before a save and before its write: the save fails (and the
    trainer then says the directory went) instead of making RUN_DIR/checkpoints again without its records."""
    from types import SimpleNamespace

    from effdist.train import checkpoint as ckpt

    gone = tmp_path / "run"
    rank0 = SimpleNamespace(is_logging_rank=True)
    with pytest.raises(ckpt.CheckpointSpaceError, match="its directory is gone"):
        with ckpt.write_errors_named(gone / "checkpoints" / "iter_0000004.tmp"):
            ckpt._start_save(gone / "checkpoints", 4, rank0)
    assert not gone.exists()


def test_nonfinite_and_disk_failures_save_nothing(tmp_path, data_cache, four_steps):
    from effdist.train import checkpoint as ckpt

    # The newest checkpoint lost its manifest: reported, the older one resumed (and the damaged one moved
    # aside, kept). Then the last step is NaN: non-zero exit naming the step and the last good checkpoint.
    run = _copy(four_steps, tmp_path / "nan_last")
    ckpts = run / "checkpoints"
    (ckpts / "iter_0000004" / "effdist.json").unlink()
    proc = _train(run, data_cache, ["train.steps=4", "checkpoint.interval=1"], env={"EFFDIST_FAULT_NAN_STEPS": "4"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert "iter_0000004 has no readable effdist.json" in err and f"resumed from {ckpts / 'iter_0000002'}" in err, \
        _error_lines(proc)
    assert "the last step (4) had a non-finite loss" in err, _error_lines(proc)
    assert f"Last good checkpoint: {ckpts / 'iter_0000003'}" in err, _error_lines(proc)
    assert _names(ckpts) == ["iter_0000002", "iter_0000003"]
    assert _names(next((ckpts / "rolled-back").iterdir())) == ["iter_0000004"]

    # An update that overflowed the weights: the save refuses them.
    run = _copy(four_steps, tmp_path / "inf_weights")
    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=1"],
                  env={"EFFDIST_FAULT_INF_WEIGHT_STEPS": "5"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "step 5: 1 weight tensor(s) hold NaN or inf" in proc.stderr, _error_lines(proc)
    assert f"Last good checkpoint: {run / 'checkpoints' / 'iter_0000004'}" in proc.stderr
    assert _names(run / "checkpoints") == ["iter_0000002", "iter_0000004"]

    # Not enough free space for the next checkpoint (estimated from the last one): named before writing.
    run = _copy(four_steps, tmp_path / "full")
    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2"], env={"EFFDIST_FAULT_FREE_BYTES": "1000"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    need = ckpt.checkpoint_bytes(run / "checkpoints" / "iter_0000004") / 2**20
    assert (f"not enough space to save iter_0000006 in {run / 'checkpoints'}: about {need:.1f} MiB needed, 1000 B free"
            in proc.stderr), _error_lines(proc)
    assert _names(run / "checkpoints") == ["iter_0000002", "iter_0000004"]

    # A write that really fails mid-save (files capped at 64 KiB by RLIMIT_FSIZE, as a full disk would):
    # a named error with the path, no traceback, the older checkpoints intact.
    run = _copy(four_steps, tmp_path / "write_fails")

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2"], preexec_fn=cap_file_size)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"writing checkpoint {run / 'checkpoints' / 'iter_0000006.tmp'} failed: the file write failed" in proc.stderr, \
        _error_lines(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _names(run / "checkpoints") == ["iter_0000002", "iter_0000004", "iter_0000006.tmp"]
    for name in ("iter_0000002", "iter_0000004"):
        ckpt.verify(run / "checkpoints" / name)
    # The same in a background save (checkpoint.async_save): the line names the .tmp directory it failed in.
    run = _copy(four_steps, tmp_path / "async_write_fails")
    proc = _train(run, data_cache, ["train.steps=6", "checkpoint.interval=2", "checkpoint.async_save=true"],
                  preexec_fn=cap_file_size)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"writing checkpoint {run / 'checkpoints' / 'iter_0000006.tmp'} failed: the file write failed" in proc.stderr, \
        _error_lines(proc)
    assert _names(run / "checkpoints") == ["iter_0000002", "iter_0000004", "iter_0000006.tmp"]


def test_a_file_where_a_checkpoint_directory_belongs_is_named_on_every_rank(tmp_path, data_cache, four_steps):
    """A file in the way of a save (where `iter_N.tmp` or `iter_N` must be made): every rank of a 2-process run
    stops with the same named line (which path, that a file is in the way, what to do), exit 1, no traceback and
    no "lost the connection" from the other rank; the checkpoints already there are intact."""
    from effdist.train import checkpoint as ckpt

    for blocked in ("iter_0000006.tmp", "iter_0000006"):
        run = _copy(four_steps, tmp_path / blocked)
        (run / "checkpoints" / blocked).write_text("not a checkpoint\n")
        overrides = BASE + [f"data.cache_dir={data_cache}", "train.steps=6", "checkpoint.interval=2"]
        cmd = [sys.executable, str(ROOT / "launch" / "torchrun.py"), "--standalone", "--nproc_per_node=2",
               *_cmd(run, overrides)[1:]]
        proc = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        err = proc.stderr
        path = run / "checkpoints" / blocked
        assert f"saving checkpoint iter_0000006 failed: {path} is a file where a directory belongs" in err, \
            _error_lines(proc)
        assert "move or delete it" in err and "intact" in err, _error_lines(proc)
        assert "Traceback" not in err and "lost the connection" not in err and "Not a directory" not in err, \
            err[-3000:]
        assert (path).is_file()
        for name in ("iter_0000002", "iter_0000004"):
            ckpt.verify(run / "checkpoints" / name)
        assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000004"


def test_the_space_advice_is_one_that_can_be_followed(tmp_path, monkeypatch):
    """A full disk with checkpoint.keep_last already 1: "lower checkpoint.keep_last" is not offered (it cannot go
    lower); above 1 it is, with the value now."""
    from effdist.train import checkpoint as ckpt

    monkeypatch.setenv("EFFDIST_FAULT_FREE_BYTES", "1000")
    at_one = ckpt.space_problem(tmp_path, 2, 10**6, keep_last=1)
    assert "not enough space to save iter_0000002" in at_one and "keep_last" not in at_one
    assert "(or lower checkpoint.keep_last, now 3)" in ckpt.space_problem(tmp_path, 2, 10**6, keep_last=3)


def test_ctrl_c_stops_at_once_with_one_line_naming_the_checkpoint(tmp_path, data_cache):
    """SIGINT (Ctrl-C) is not a save signal: the run stops now, says what is lost and where to resume, no
    traceback; the checkpoints it wrote stay and the lock dies with it."""
    run = tmp_path / "run"
    log = tmp_path / "int.log"
    # As from a terminal: a process that inherits SIGINT ignored (pytest-xdist's workers, a shell's background job)
    # keeps ignoring it, as it should.
    with _long_run(run, data_cache, ["checkpoint.interval=2"], log,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        _wait_for_step(run, 3, proc, log)  # step 3 is logged after the save at step 2 is visible
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 128 + signal.SIGINT, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    line = next(line for line in text.splitlines() if "interrupted (SIGINT) at step" in line)
    named = line.split("the last checkpoint is ", 1)[1].split(" (--resume auto continues from it)", 1)[0]
    complete = [n for n in _names(run / "checkpoints") if not n.endswith(".tmp")]
    # The newest complete one (or the one before it, if the signal fell between a save's rename and its notice).
    assert Path(named).parent == run / "checkpoints" and Path(named).name in complete[-2:], (line, complete)
    # The lock died with the process: a start-over is refused for the run it holds, not for "in use".
    again = _train(run, data_cache, ["train.steps=1"], resume="none")
    assert again.returncode == 2 and "already holds a run" in again.stderr, _error_lines(again)




def test_a_run_directory_deleted_while_training_stops_the_run_instead_of_recreating_it(tmp_path, data_cache):
    """`rm -rf RUN_DIR` (or a cleanup, or a move) while the run trains: it trained on, its records went into the
    unlinked metrics.jsonl, and each save made a new RUN_DIR/checkpoints without records, config.yaml or lock
    (a second trainer could then start there). It stops at the next record with one line, exit 1."""
    run = tmp_path / "run"
    log = tmp_path / "deleted.log"
    with _long_run(run, data_cache, ["checkpoint.interval=4"], log) as proc:
        _wait_for_step(run, 2, proc, log)
        deadline = time.time() + 30
        while True:  # again while it fails, as a user would repeat `rm -rf`: a save may be writing into it
            try:
                shutil.rmtree(run)
                break
            except OSError:
                assert time.time() < deadline, sorted(p.name for p in run.rglob("*"))
        rc = proc.wait(timeout=30)
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("effdist: error")]
    assert len(errors) == 1 and f"{run / 'metrics.jsonl'} was deleted or replaced while this run trained" in errors[0]
    assert not (run / "checkpoints").exists(), sorted(p.name for p in run.rglob("*"))


def test_wrong_run_dir_or_resume_is_one_line_and_exit_2(tmp_path, data_cache):
    """Found before anything starts where possible; nothing is created or changed."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    done = _train(a_file, data_cache, ["train.steps=1"])
    assert done.returncode == 2 and f"--run-dir {a_file} is a file, not a directory" in done.stderr, done.stderr
    assert a_file.read_text() == "mine"
    run = tmp_path / "run"
    done = _train(run, data_cache, ["train.steps=1"], resume="latest")
    assert done.returncode == 2 and "--resume latest: no such directory. --resume takes auto" in done.stderr, done.stderr
    assert not run.exists()
    unfinished = tmp_path / "old" / "checkpoints" / "iter_0000004.tmp"
    unfinished.mkdir(parents=True)
    done = _train(run, data_cache, ["train.steps=1"], resume=str(unfinished))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"--resume {unfinished}: not a complete effdist checkpoint directory; it is a save that never finished" \
        in done.stderr, _error_lines(done)
    # checkpoint.dir naming a file: refused before any step (it used to train every step and then fail to save).
    done = _train(tmp_path / "run2", data_cache, ["train.steps=1", f"checkpoint.dir={a_file}"])
    assert done.returncode == 2 and f"checkpoint.dir = '{a_file}' is a file, not a directory" in done.stderr, \
        done.stderr[-3000:]
    assert a_file.read_text() == "mine" and not (tmp_path / "run2").exists()
    # checkpoint.init_from that does not exist, for a run that starts from it: refused before the process group and
    # the data (it used to fail after them, leaving config.yaml and data/ in the new run directory).
    missing = tmp_path / "no-such-model"
    done = _train(tmp_path / "run3", data_cache, ["train.steps=1", f"checkpoint.init_from={missing}"])
    assert done.returncode == 2 and f"checkpoint.init_from = '{missing}': no such file or directory" in done.stderr, \
        done.stderr[-3000:]
    assert not (tmp_path / "run3").exists()


def test_a_launch_whose_processes_cannot_meet_is_one_line_and_exit_2(tmp_path, data_cache):
    """Launcher variables set by hand (a half-copied torchrun line, one rank of two started): the variable to fix
    or the processes that never arrived, in one line, not a traceback from the launch code or from c10d."""
    done = _train(tmp_path / "a", data_cache, ["train.steps=1"], env={"RANK": "0"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "effdist: launch error: RANK=0 is set but WORLD_SIZE is not" in done.stderr, done.stderr
    lonely = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = _train(tmp_path / "b", data_cache, ["train.steps=1", "parallel.timeout_s=3"], env=lonely)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (f"rank 0 of WORLD_SIZE=2 waited parallel.timeout_s=3 s at 127.0.0.1:{lonely['MASTER_PORT']} and not "
            "every process arrived: start all 2") in done.stderr, _error_lines(done)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing was written
    # Through the launcher, a config error is exit 2 as with `effdist train`, said once per node, not per rank.
    done = subprocess.run(["bash", str(ROOT / "launch" / "run.sh"), "2", str(TINY), "--run-dir", str(tmp_path / "c"),
                           "--set", "train.bogus=1"], env=clean_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("effdist: config error: unknown config key 'train.bogus'") == 1, \
        done.stderr[-3000:]


# A Ctrl-C while a module is imported (torch and megatron take seconds to import): an import hook raises the
# KeyboardInterrupt at the import of `module`, every time it is tried.
_CTRL_C_AT_IMPORT = """
import sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            raise KeyboardInterrupt

sys.meta_path.insert(0, CtrlC())
from effdist.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("module, line", [
    ("torch", "effdist train: interrupted (SIGINT) while starting; nothing was saved"),
    # Inside the trainer's setup: the stop's line, and its teardown does not import megatron again.
    ("megatron.core.nccl_allocator", "interrupted (SIGINT) at step 0: steps since the last save are lost; no "
                                     "checkpoint yet"),
    # While the sample dataset is built: its staging directory goes with the stop.
    ("effdist.data.sources", "interrupted (SIGINT) at step 0: steps since the last save are lost; no "
                             "checkpoint yet"),
], ids=["before-the-trainer", "in-setup", "building-data"])
def test_ctrl_c_while_starting_is_one_line(tmp_path, module, line):
    cache = tmp_path / "data"
    args = _cmd(tmp_path / "run", BASE + [f"data.cache_dir={cache}", "train.steps=2"])[3:]
    done = subprocess.run([sys.executable, "-c", _CTRL_C_AT_IMPORT, module, *args], env=clean_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGINT, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and line in done.stderr, done.stderr[-3000:]
    assert not list(cache.glob("**/*.building-*")), list(cache.rglob("*"))

# The trainer, with the second checkpoint save interrupted by a real SIGINT inside code that wraps whatever it
# catches, as torch.distributed.checkpoint does (a KeyboardInterrupt in a save comes out as a CheckpointException).
_CTRL_C_IN_A_WRAPPING_SAVE = """
import os, signal, sys, time
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.utils import _wrap_exception

real, calls = dist_checkpointing.save, []

def save(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException as e:
            raise CheckpointException("write_data", {0: _wrap_exception(e)})
        sys.exit("the SIGINT did not interrupt the save")
    return real(*args, **kwargs)

dist_checkpointing.save = save
from effdist.train.trainer import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_inside_a_library_that_wraps_it_is_still_the_interrupt(tmp_path, data_cache):
    run = tmp_path / "run"
    args = _cmd(run, BASE + [f"data.cache_dir={data_cache}", "train.steps=6", "checkpoint.interval=2"])[3:]
    done = subprocess.run([sys.executable, "-c", _CTRL_C_IN_A_WRAPPING_SAVE, *args], env=clean_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 128 + signal.SIGINT, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (f"interrupted (SIGINT) at step 4: steps since the last save are lost; the last checkpoint is "
            f"{run / 'checkpoints' / 'iter_0000002'} (--resume auto continues from it)") in done.stderr, _error_lines(done)
