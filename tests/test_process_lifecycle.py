"""How trainer processes stop, in real processes (gloo, tiny-cpu, 2 ranks through launch/torchrun.py unless
said otherwise): together, quickly, and with nothing left behind.

- SIGUSR1 / SIGTERM to the launcher: the workers save, the launcher exits 75, `--resume auto` continues
  from that save;
- SIGKILL of the launcher: the workers notice, save, and are gone within parallel.timeout_s;
  also when it dies while they start, with their output piped to it (one worker, no launcher of ours);
- SIGKILL of one rank: every rank stops within seconds, one line names the dead rank, no traceback; its
  helper processes (megatron's asynchronous-save manager) die with it; without a launcher too;
- SIGTERM / SIGUSR1 while rank 0 is held in data preparation / index building / model construction: ends
  within a bounded time with one line, exit 143 before the run has a checkpoint and 75 once it has one;
- a torn megatron index cache (.npy) is rebuilt with one line; index files are written atomically.
- a Ctrl-C or SIGTERM that Python drops (inside an at-fork hook) still stops the process, with one line (one process).

Processes are told apart by pid (their own sessions), never by name: other tests may run beside these.
The scenarios chain where one run's end is the next one's start, to keep the file at a few launches.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import psutil
import pytest

from tests.launching import ROOT, TINY, clean_env, free_port

pytestmark = pytest.mark.slow

LAUNCHER = ROOT / "launch" / "torchrun.py"
BASE = ["train.global_batch=8", "train.micro_batch=2", "data.seq_length=64", "logging.tensorboard=false",
        "logging.progress_bar=false", "optim.warmup_steps=2", "train.steps=400", "checkpoint.keep_last=50"]
# A stop before a checkpoint exists / after one exists.
NOTHING_SAVED, PREEMPTED = 128 + signal.SIGTERM, 75


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


class Run:
    """One launch: launch/torchrun.py with 2 workers (or, with `direct`, 2 trainers started by hand with the
    env:// variables, no launcher), output in a log file, in a session of its own."""

    def __init__(self, run_dir: Path, data_cache: Path, extra: list[str], env: dict[str, str] | None = None,
                 direct: bool = False, tag: str = "run"):
        self.run_dir, self.log = run_dir, run_dir.parent / f"{run_dir.name}.{tag}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        args = ["-m", "effdist.train", "--config", str(TINY), "--run-dir", str(run_dir)]
        for o in BASE + [f"data.cache_dir={data_cache}"] + extra:
            args += ["--set", o]
        self._out = open(self.log, "w")
        self.procs: list[subprocess.Popen] = []
        self.direct = direct
        if direct:
            port = free_port()
            for rank in range(2):
                rank_env = clean_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}))
                self.procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, cwd=ROOT, stdout=self._out,
                                                   stderr=subprocess.STDOUT, start_new_session=True))
        else:
            cmd = [sys.executable, str(LAUNCHER), "--standalone", "--nproc_per_node=2", *args]
            self.procs.append(subprocess.Popen(cmd, env=clean_env(**(env or {})), cwd=ROOT, stdout=self._out,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        self.launcher = self.procs[0]
        self.seen: dict[int, psutil.Process] = {}

    # -- watching ------------------------------------------------------------------------------
    def text(self) -> str:
        return self.log.read_text()

    def last_step(self) -> int:
        try:
            steps = [json.loads(line)["step"] for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()
                     if line.strip() and '"loss"' in line]
        except (OSError, ValueError, KeyError):
            return 0
        return steps[-1] if steps else 0

    def wait_for(self, what: str, ok, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not ok():
            self.remember()
            assert all(p.poll() is None for p in self.procs), f"ended before {what}:\n{self.text()[-4000:]}"
            assert time.time() < deadline, f"no {what} after {timeout} s:\n{self.text()[-4000:]}"
            time.sleep(0.1)
        self.remember()

    def remember(self) -> None:
        """Note every process started under this launch (workers, their helpers) while they run."""
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                for q in [root, *root.children(recursive=True)]:
                    self.seen.setdefault(q.pid, q)
            except psutil.NoSuchProcess:
                pass

    def workers(self) -> dict[int, psutil.Process]:
        """Trainer processes by global rank (the launcher's children; their own forks carry RANK too)."""
        if self.direct:
            candidates = [self.seen[p.pid] for p in self.procs if p.pid in self.seen]
        else:
            candidates = psutil.Process(self.launcher.pid).children(recursive=False)
        return {int(q.environ()["RANK"]): q for q in candidates}

    def alive(self) -> list[str]:
        """Processes of this launch still running (a recorded pid counts only while it is the same process)."""
        left = []
        for q in self.seen.values():
            try:
                if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{q.pid} (parent {q.ppid()}) {' '.join(q.cmdline())[:160]}")
            except psutil.NoSuchProcess:
                pass
        return left

    def wait_gone(self, timeout: float) -> float:
        """Seconds until every process of this launch is gone (fails after `timeout`)."""
        t0 = time.time()
        while self.alive():
            assert time.time() - t0 < timeout, (f"still running {timeout} s later: {self.alive()}\n"
                                                f"{self.text()[-4000:]}")
            for p in self.procs:
                p.poll()
            time.sleep(0.1)
        return time.time() - t0

    def finish(self, timeout: float = 120) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            self.close()

    def close(self) -> None:
        for q in self.seen.values():  # only what this launch started, by pid
            try:
                if q.is_running():
                    q.kill()
            except psutil.NoSuchProcess:
                pass
        for p in self.procs:
            p.poll()
        self._out.close()


def _saved(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in ckpts.glob("iter_???????") if (p / "effdist.json").is_file())


def _effdist_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "effdist" in line and ("error" in line or "launch/torchrun" in line)]


def _no_stack_traces(text: str) -> None:
    """Neither Python tracebacks nor c10d's C++ ones ("Exception raised from ... frame #0")."""
    assert "Traceback" not in text and "Exception raised from" not in text, text[-4000:]


def test_launcher_signals_save_and_resume_and_launcher_sigkill_stops_workers(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    # SIGTERM to the launcher mid-run (kill, scancel, Slurm preemption): the workers save, exit 75.
    run = Run(run_dir, data_cache, [], tag="term")
    try:
        run.wait_for("step 3", lambda: run.last_step() >= 3)
        run.launcher.send_signal(signal.SIGTERM)
        codes = run.finish()
    finally:
        run.close()
    assert codes == [PREEMPTED], run.text()[-4000:]
    first = _saved(run_dir)
    assert first and first[-1] >= 3, (first, run.text()[-4000:])
    _no_stack_traces(run.text())
    assert not run.alive()

    # `--resume auto` continues from that save. SIGKILL of the launcher: each worker sees its parent gone,
    # saves, and stops within parallel.timeout_s.
    timeout_s = 30
    run = Run(run_dir, data_cache, [f"parallel.timeout_s={timeout_s}"], tag="kill")
    try:
        run.wait_for("a step after the resume", lambda: run.last_step() > first[-1] + 1)
        assert f"resumed from {run_dir / 'checkpoints' / f'iter_{first[-1]:07d}'}" in run.text()
        assert len(run.workers()) == 2
        run.launcher.kill()
        took = run.wait_gone(timeout=timeout_s + 5)
    finally:
        run.close()
    second = _saved(run_dir)
    assert second[-1] > first[-1], (second, run.text()[-4000:])
    assert took < timeout_s, took
    assert run.text().count("is gone: stopping") == 1, run.text()[-4000:]

    # A torn index cache (a run killed while megatron wrote it) is rebuilt with one line. SIGUSR1 (Slurm's
    # time-limit warning) while rank 0 builds the model: nothing new to save, the newest checkpoint holds
    # everything, so 75 for a requeue.
    cache = next(data_cache.rglob("*-sample_index.npy"))
    size = cache.stat().st_size
    with open(cache, "r+b") as f:
        f.truncate(size // 2)
    run = Run(run_dir, data_cache, [], env={"EFFDIST_FAULT_STALL_PHASE": "model construction"}, tag="usr1")
    try:
        run.wait_for("rank 0 in model construction", lambda: "holds in model construction" in run.text())
        run.launcher.send_signal(signal.SIGUSR1)
        codes = run.finish(timeout=60)
    finally:
        run.close()
    text = run.text()
    assert codes == [PREEMPTED], text[-4000:]
    newest = run_dir / "checkpoints" / f"iter_{second[-1]:07d}"
    assert f"stopped by SIGUSR1 during model construction; nothing new to save: {newest} stays" in text, text[-4000:]
    assert "effdist (rank 0): stopped by SIGUSR1" in text and "error" not in text, text[-4000:]  # a stop, no error
    assert text.count(f"index cache {cache} is incomplete") == 1, text[-4000:]
    assert cache.stat().st_size == size
    assert _saved(run_dir) == second
    _no_stack_traces(text)
    assert not run.alive()


# A launcher that starts one torchrun-style worker with its output piped to itself (as `torchrun ... | tee log`
# does to a terminal's pipeline), points it at a store that does not exist (the worker waits in process group setup,
# in native code), and dies (SIGKILL) `sys.argv[1]` seconds later: before or after the worker watches it.
_LAUNCHER_THAT_DIES = """
import os, subprocess, sys, time
env = dict(os.environ, TORCHELASTIC_RUN_ID="test", TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1",
           MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", GROUP_RANK="0")
worker = subprocess.Popen([sys.executable, "-m", "effdist.train", "--config", sys.argv[2], "--run-dir", sys.argv[4],
                           "--set", "data.cache_dir=" + sys.argv[5]], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
print(worker.pid, flush=True)
time.sleep(float(sys.argv[1]))
os.kill(os.getpid(), 9)
"""


def test_a_console_nobody_reads_is_silenced_not_fatal():
    """stderr a pipe whose reader died: the next write would raise BrokenPipeError in whichever thread logs; the
    guard's console writes point it at /dev/null instead (stdout, still read, is left alone)."""
    script = """
import os, sys
from effdist.runtime import lifecycle
r, w = os.pipe()
os.dup2(w, 2)
os.close(r)  # the reader is gone
lifecycle.say("this line has no reader")  # must not raise
print("silenced", lifecycle.silence_broken_console(), flush=True)  # already silenced by say(): nothing left to do
print("still writable", file=sys.stderr, flush=True)
print("done", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], env=clean_env(RANK="0"), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.splitlines() == ["silenced []", "done"], (done.stdout, done.stderr)


def test_the_trainers_last_error_line_with_nobody_reading_is_not_a_second_error():
    """The trainer's error line (a failed run, a stop) went through a plain print: with the reader of stderr gone
    it raised BrokenPipeError over the exit code and the cleanup after it."""
    script = """
import os, sys
from effdist.train.trainer import _error_line
r, w = os.pipe()
os.dup2(w, 2)
os.close(r)  # the reader is gone
_error_line("a config field is wrong")  # must not raise
print("done", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], env=clean_env(RANK="0"), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines() == ["done"], (done.stdout, done.stderr)


def test_the_lines_of_ranks_writing_at_once_are_never_glued_together():
    """Each rank says its stop in one line through print_to_console; under `python -u` (torchrun's workers) print
    wrote the text and its newline in two writes, so two ranks stopping together left
    `...--resume auto)effdist: error (rank 1): ...` and an empty line in the launcher's log."""
    script = """
import sys
from effdist.runtime import lifecycle
for i in range(2000):
    lifecycle.print_to_console(f"effdist: error (rank {sys.argv[1]}): line {i} of a stop")
"""
    r, w = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-u", "-c", script, str(rank)], env=clean_env(), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=w) for rank in (0, 1)]
    os.close(w)
    with os.fdopen(r) as pipe:
        lines = pipe.read().split("\n")
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert lines.pop() == ""  # after the last newline
    bad = [line for line in lines if not re.fullmatch(r"effdist: error \(rank [01]\): line \d+ of a stop", line)]
    assert not bad and len(lines) == 4000, bad[:3]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_worker_outlives_neither_a_launcher_that_died_early_nor_its_broken_output(tmp_path, data_cache):
    """Twice, side by side: the launcher dies 0.3 s after starting the worker (still importing torch, before the
    trainer watches anything) and 8 s after (the worker waits in process group setup). Its output pipe is broken
    then: the notice that the launcher is gone used to kill the watchdog (BrokenPipeError), and the worker waited
    for the store for parallel.timeout_s."""
    launchers = {}
    for delay in ("0.3", "8"):
        launchers[delay] = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER_THAT_DIES, delay, str(TINY), str(free_port()), str(tmp_path / delay),
             str(data_cache)], env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    workers = {delay: int(proc.stdout.readline()) for delay, proc in launchers.items()}
    try:
        for proc in launchers.values():
            assert proc.wait(timeout=60) == -signal.SIGKILL
        deadline = time.time() + 90  # STOP_GRACE_S after they notice; generous for a loaded 2-core CI machine
        while time.time() < deadline and any(_running(pid) for pid in workers.values()):
            time.sleep(0.5)
        alive = {d: pid for d, pid in workers.items() if _running(pid)}
        assert not alive, f"workers still running 90 s after their launcher died: {alive}"
    finally:
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_launcher_death_is_announced_once_even_when_the_run_ends_first(capsys, monkeypatch):
    """Rank 1's watchdog may notice the dead launcher first; the stop the ranks agree on can then end rank 0 before
    its own watchdog looks. finish() says it then, and the watchdog and finish() say it once between them."""
    from effdist.runtime import lifecycle

    monkeypatch.setenv("RANK", "0")
    guard = lifecycle.ProcessGuard()
    guard._parent = os.getppid() + 1_000_000  # the launcher this rank was started by, no longer its parent
    guard.finish(PREEMPTED)
    assert guard._launcher_gone() is False
    assert capsys.readouterr().err.count("is gone: stopping") == 1


# A process whose Ctrl-C lands inside an at-fork hook, as when a checkpoint writer forks: Python drops the
# KeyboardInterrupt raised there ("Exception ignored in ..."), and the fork returns as if nothing happened.
_CTRL_C_DURING_FORK = """
import os, signal, sys, threading, time
from effdist.runtime import lifecycle

guard = lifecycle.guard()
guard.install(timeout_s=600)
guard.resume_point = "/runs/x/checkpoints/iter_0000004"
signum = signal.SIGTERM if sys.argv[1] == "sigterm" else signal.SIGINT
os.register_at_fork(after_in_parent=lambda: (os.kill(os.getpid(), signum), time.sleep(0.2)))
child = os.fork()
if child == 0:
    os._exit(0)
os.waitpid(child, 0)
print("the fork returned", flush=True)
if sys.argv[1] == "boundary":
    try:
        guard.raise_if_interrupted()
    except KeyboardInterrupt:
        print("raised again at the step boundary", flush=True)
        guard.finish(130)
        sys.exit(130)
    sys.exit(0)
threading.Event().wait()  # the main thread never reaches a boundary: the watchdog must end it
"""


# A SIGTERM asked for a save at the end of the step; the save hangs (a slow file system), and the operator presses
# Ctrl-C: the process must end STOP_GRACE_S later, not after parallel.timeout_s.
_CTRL_C_DURING_A_REQUESTED_SAVE = """
import os, signal, threading, time
from effdist.runtime import lifecycle

guard = lifecycle.guard()
guard.install(timeout_s=600)
guard.resume_point = "/runs/x/checkpoints/iter_0000004"
guard.unsaved, guard.phase = True, "training"
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
assert guard.requested
guard.leaving = True  # the trainer's preemption path: save, then exit 75
print("saving", flush=True)
os.kill(os.getpid(), signal.SIGINT)
threading.Event().wait()  # the save that never ends
"""


def test_stops_python_drops_or_saves_that_hang_are_still_bounded():
    """Four one-process scenarios of the guard, side by side (each waits up to STOP_GRACE_S):

    - the Ctrl-C of a CI failure: SIGINT while megatron's checkpoint writer forked was dropped by Python and the run
      trained on. The guard raises it again at the next step boundary (`boundary`); a main thread that never gets
      there is ended by the watchdog STOP_GRACE_S later, with the checkpoint to resume from (`stuck`);
    - a SIGTERM stop (nothing to save) dropped the same way is ended by the watchdog too (`sigterm`);
    - a SIGTERM asked for a save, the save hangs, the operator presses Ctrl-C: the process ends STOP_GRACE_S
      later, not after parallel.timeout_s (`save`)."""
    from effdist.runtime import lifecycle

    scripts = {where: (_CTRL_C_DURING_FORK, where) for where in ("boundary", "stuck", "sigterm")}
    scripts["save"] = (_CTRL_C_DURING_A_REQUESTED_SAVE, "save")
    t0 = time.time()
    procs = {where: subprocess.Popen([sys.executable, "-c", script, arg], env=clean_env(), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for where, (script, arg) in scripts.items()}
    out, code, took = {}, {}, {}
    try:
        for where, proc in procs.items():
            out[where] = proc.communicate(timeout=120)[0]
            code[where], took[where] = proc.returncode, time.time() - t0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    bound = lifecycle.STOP_GRACE_S + 30  # far below parallel.timeout_s=600; generous for a loaded CI machine
    for where in ("boundary", "stuck", "sigterm"):
        assert "the fork returned" in out[where], out[where]  # the stop did not leave os.fork(): it was dropped
        assert "Traceback" not in out[where] and "Exception ignored" not in out[where], out[where]
    assert code["boundary"] == 128 + signal.SIGINT and "raised again at the step boundary" in out["boundary"], \
        out["boundary"]
    assert code["stuck"] == 128 + signal.SIGINT and took["stuck"] < bound, (took, out["stuck"])
    assert ("interrupted (SIGINT) during setup: still running 10 s later, exiting now; steps since the last save "
            "are lost; the last checkpoint is /runs/x/checkpoints/iter_0000004 (--resume auto continues from it)") \
        in out["stuck"], out["stuck"]
    assert code["sigterm"] == PREEMPTED and took["sigterm"] < bound, (took, out["sigterm"])
    assert ("stopped by SIGTERM during setup; nothing new to save: /runs/x/checkpoints/iter_0000004 stays the "
            "checkpoint to resume from") in out["sigterm"], out["sigterm"]
    assert code["save"] == 128 + signal.SIGINT and took["save"] < bound, (took, out["save"])
    assert "received SIGTERM: will save a checkpoint after this step and exit" in out["save"], out["save"]
    assert "interrupted (SIGINT) during training: still running 10 s later, exiting now" in out["save"], out["save"]
    assert "Traceback" not in out["save"], out["save"]


@pytest.mark.parametrize("direct", [False, True], ids=["launcher", "no-launcher"])
def test_a_dead_rank_stops_every_rank_and_its_helpers(tmp_path, data_cache, direct):
    """checkpoint.async_save=true starts megatron's spawn Manager in each rank on its first save: after a
    SIGKILL of the rank it must not stay behind."""
    run = Run(tmp_path / "run", data_cache, ["checkpoint.async_save=true", "checkpoint.interval=2"], direct=direct)
    try:
        run.wait_for("a background save", lambda: "in the background" in run.text() and run.last_step() >= 3)
        workers = run.workers()
        assert sorted(workers) == [0, 1]
        # The rank that writes (with DP=2 rank 0 holds every shard to write) runs the Manager.
        with_helper = [r for r, w in workers.items()
                       if any("multiprocessing" in " ".join(h.cmdline()) for h in w.children(recursive=True))]
        assert with_helper, f"no helper process running, nothing to check:\n{run.alive()}"
        dead = with_helper[0]
        victim = workers[dead]
        victim.kill()
        took = run.wait_gone(timeout=30)
        codes = run.finish()
    finally:
        run.close()
    text = run.text()
    assert took < 20, took
    assert all(c not in (0, PREEMPTED) for c in codes if c is not None), (codes, text[-4000:])
    _no_stack_traces(text)
    named = [line for line in _effdist_lines(text) if re.search(rf"rank {dead} \((local rank {dead}, )?pid {victim.pid}", line)]
    assert len(named) == 1, text[-4000:]


@pytest.mark.parametrize("phase", ["data preparation", "index building"])
def test_sigterm_while_starting_ends_promptly(tmp_path, data_cache, phase):
    """Rank 0 is held in `phase` (EFFDIST_FAULT_STALL_PHASE); rank 1 waits for it inside a collective (native
    code: its Python signal handler cannot run there). The first start has no checkpoint (143); model
    construction with a checkpoint (75) is part of the first test."""
    run_dir = tmp_path / "run"
    env = {"EFFDIST_FAULT_STALL_PHASE": phase}
    run = Run(run_dir, data_cache, [], env=env)
    try:
        run.wait_for(f"rank 0 in {phase}", lambda: f"holds in {phase}" in run.text())
        time.sleep(0.5)
        t0 = time.time()
        run.launcher.send_signal(signal.SIGTERM)
        codes = run.finish(timeout=60)
        took = time.time() - t0
    finally:
        run.close()
    text = run.text()
    assert codes == [NOTHING_SAVED], text[-4000:]
    assert took < 25, took
    assert f"stopped by SIGTERM during {phase}" in text, text[-4000:]
    _no_stack_traces(text)
    assert not run.alive()


def test_index_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """What megatron's numpy.save becomes during the build: a write that dies before its rename leaves
    neither a file at the final name nor a temporary one; a truncated file is found and removed."""
    from effdist.data import index_cache

    target = tmp_path / "x-sample_index.npy"
    with index_cache.atomic_numpy_saves():
        numpy.save(str(target), numpy.arange(1000, dtype=numpy.int64), allow_pickle=True)
    assert numpy.array_equal(numpy.load(target), numpy.arange(1000))
    assert index_cache.torn_reason(target) is None

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for a signal between the write and the rename

    other = tmp_path / "y-shuffle_index.npy"
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt), index_cache.atomic_numpy_saves():
        numpy.save(str(other), numpy.arange(10), allow_pickle=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert numpy.save is not None and numpy.save.__module__.startswith("numpy")

    with open(target, "r+b") as f:
        f.truncate(500)
    assert "500 of 8128 bytes" in index_cache.torn_reason(target)
    assert index_cache.remove_torn_caches(tmp_path) == [target]
    assert not target.exists()


def test_a_launcher_death_stops_with_one_notice_not_a_second_about_a_sigterm(capsys, monkeypatch):
    """The watchdog stops a worker whose launcher died by sending itself SIGTERM, after saying why. The handler
    used to add "received SIGTERM: will save a checkpoint after this step and exit", a signal no one sent."""
    from effdist.runtime import lifecycle

    monkeypatch.setenv("RANK", "0")
    guard = lifecycle.ProcessGuard()
    guard.unsaved = True  # a step finished since the last save: the stop saves first
    guard._parent = os.getppid() + 1_000_000
    monkeypatch.setattr(lifecycle.os, "kill", lambda pid, signum: guard._on_signal(signum, None))
    guard._stop_if_launcher_gone()
    err = capsys.readouterr().err
    assert guard.requested and guard.signum == signal.SIGTERM
    assert err.count("is gone: stopping (saving first if a step finished)") == 1 and "received" not in err, err
    guard._on_signal(signal.SIGTERM, None)  # a second stop signal changes nothing and says nothing
    assert capsys.readouterr().err == ""
    # A SIGTERM someone did send is still announced.
    sent = lifecycle.ProcessGuard()
    sent.unsaved = True
    sent._on_signal(signal.SIGTERM, None)
    assert "received SIGTERM: will save a checkpoint after this step and exit" in capsys.readouterr().err
