"""slurm/train.sbatch with a fake srun that behaves like Slurm's, slurm/rendezvous_store.py, and the
rendezvous address (effdist.runtime.launch_env.rendezvous_host).

The fake srun runs the task command for real once per node, each node's task in its own process group
(as slurmstepd does), forwards SIGUSR1/SIGTERM to every process of every task, kills the tasks still
running `--wait` seconds after the first one ended, and exits with the highest task exit code (a task
killed by a signal counts as 128 + the signal). The node task is the sbatch's own (it writes the per-node
exit records); only the launcher behind `$PYTHON launch/torchrun.py` is fake: it records its arguments and
exits with the code the test gives its node, at once or after a signal. tools/slurm_e2e.sh runs the same
script on a real Slurm."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from effdist.runtime import launch_env
from effdist.runtime.launch_env import PREEMPTED_EXIT_CODE, LaunchEnvError, rendezvous_host
from tests.launching import free_port

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "slurm" / "train.sbatch"
STORE = ROOT / "slurm" / "rendezvous_store.py"
NODES = ("node07", "node08")


def _executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# ------------------------------------------------------------------------------------------ the fakes
FAKE_SRUN = r"""
# srun OPTIONS... COMMAND...: see the module docstring.
printf '%s\0' "$@" > "$FAKE_DIR/srun.args"
echo $$ > "$FAKE_DIR/srun.pid"
nodes=1 wait_s=0
while [[ $1 == -* ]]; do
    case $1 in --nodes=*) nodes=${1#*=} ;; --wait=*) wait_s=${1#*=} ;; esac
    shift
done
declare -A code
pids=()
forward() { local p; for p in "${pids[@]}"; do [[ -n ${code[$p]:-} ]] || kill -s "$1" -- "-$p" 2>/dev/null; done; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'echo "srun: timed out waiting for the step" >&2; forward KILL' USR2
for ((i = 0; i < nodes; i++)); do
    SLURMD_NODENAME=node0$((7 + i)) SLURM_NODEID=$i SLURM_PROCID=$i setsid "$@" &
    pids+=($!)
done
# A task has ended once its process is gone or a zombie; `wait PID` then gives its code (bash keeps it).
ended() { local st; [[ -e /proc/$1/stat ]] || return 0; read -r _ _ st _ < "/proc/$1/stat"; [[ $st == Z ]]; }
timer=""
left=$nodes
while ((left)); do
    for p in "${pids[@]}"; do
        [[ -z ${code[$p]:-} ]] && ended "$p" || continue
        wait "$p"
        code[$p]=$?
        left=$((left - 1))
        if [[ -z $timer ]] && ((wait_s > 0)); then
            (trap 'kill $nap; exit' TERM; sleep "$wait_s" & nap=$!; wait $nap && kill -USR2 $$) >/dev/null 2>&1 &
            timer=$!
        fi
    done
    sleep 0.05
done
[[ -n $timer ]] && kill "$timer" 2>/dev/null
max=0
for p in "${pids[@]}"; do ((code[$p] > max)) && max=${code[$p]}; done
exit "$max"
"""

# $PYTHON for the script: the launcher is fake (FAKE_<node>: "CODE" exits at once; "CODE@DELAY" waits for
# SIGUSR1/SIGTERM, records it, exits CODE after DELAY seconds; "gone" kills its node's whole task, as
# Slurm does to a node that fails). The rendezvous store is fake unless FAKE_STORE=real; anything else
# is the real interpreter.
FAKE_PYTHON = r"""
if [[ $1 == launch/torchrun.py ]]; then
    node=$SLURMD_NODENAME
    printf '%s\n' "$@" > "$FAKE_DIR/launcher.$node.args"
    printenv CUDA_DEVICE_MAX_CONNECTIONS NCCL_NVLS_ENABLE OMP_NUM_THREADS > "$FAKE_DIR/launcher.$node.env"
    port=$(printf '%s\n' "$@" | sed -n 's/^--rdzv_endpoint=.*://p')
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo up > "$FAKE_DIR/store.seen.$node"; fi
    spec=FAKE_$node
    spec=${!spec:-0}
    if [[ $spec == gone ]]; then kill -KILL 0; fi
    if [[ $spec != *@* ]]; then exit "$spec"; fi
    # On a signal: record it, take DELAY seconds (a save), record whether the rendezvous store still serves (the
    # agents poll it until their workers exit), exit CODE.
    on_signal() {
        echo "$1" >> "$FAKE_DIR/signals.$node"
        sleep "${spec#*@}"
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then s=up; else s=down; fi
        echo "$s" >> "$FAKE_DIR/store.after-save.$node"
        exit "${spec%@*}"
    }
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
    echo $$ > "$FAKE_DIR/launcher.$node.pid"
    for _ in $(seq 600); do sleep 0.05; done
    exit 9
fi
if [[ $1 == slurm/rendezvous_store.py ]]; then
    echo $$ > "$FAKE_DIR/store.pid"   # the real one keeps this pid (exec below)
fi
if [[ $1 == slurm/rendezvous_store.py && ${FAKE_STORE:-fake} == fake ]]; then
    # In Python, as the real store: bash cannot trap a SIGHUP that was ignored when it started (a test run under
    # nohup), Python's signal.signal can.
    exec "$REAL_PYTHON" -c '
import os, signal, sys, time
def stop(*_):
    open(os.path.join(os.environ["FAKE_DIR"], "store.stopped"), "w").write("stopped\n")
    sys.exit(0)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, stop)
print("ready", flush=True)
while True:
    time.sleep(0.05)
'
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with the fake srun and a recording scontrol, and $PYTHON with the fake launcher."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", f"""
echo "$*" >> {tmp_path}/scontrol.calls
case "$1" in requeue) exit "${{FAKE_REQUEUE_RC:-0}}" ;; esac
""")
    # squeue -h -j JOB -o %l: the job's time limit; the lines of time_limits one per call (the last one stays),
    # else a day.
    _executable(bin_dir / "squeue", f"""
echo "$*" >> {tmp_path}/squeue.calls
limits={tmp_path}/time_limits
if [[ -s $limits ]]; then
    head -n1 "$limits"
    (($(wc -l < "$limits") > 1)) && sed -i 1d "$limits"
else
    echo 1-00:00:00
fi
""")
    python = _executable(tmp_path / "python", FAKE_PYTHON)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "FAKE_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_DIR=str(tmp_path), REAL_PYTHON=sys.executable,
               PYTHON=str(python), SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[07-08]",
               SLURM_GPUS_ON_NODE="4", SLURM_JOB_CPUS_PER_NODE="6(x2)", SLURMD_NODENAME="node07",
               HEAD_ADDR="10.9.8.7", EFFDIST_DIR=str(ROOT), CONFIG="configs/tiny-cpu.yaml",
               RUN_DIR=str(tmp_path / "run"), TRAIN_ARGS="--set train.steps=7")
    for var in ("CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_NVLS_ENABLE", "OMP_NUM_THREADS", "STEP_END_GRACE",
                "MAX_REQUEUES", "CPUS_PER_TASK", "RDZV_PORT"):
        env.pop(var, None)
    yield tmp_path, env
    _stop_leftovers(tmp_path)


def _stop_leftovers(tmp: Path) -> None:
    """After a failed test: end the fake processes this test started (each names `tmp` in its command line)."""
    for pid_file in [*tmp.glob("launcher.*.pid"), tmp / "store.pid", tmp / "srun.pid"]:
        try:
            pid = int(pid_file.read_text())
            if str(tmp).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            group = os.getpgid(pid)
            if group == pid or pid_file.name.startswith("launcher."):  # a node task's own group (setsid)
                assert group != os.getpgid(0)
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _sbatch(env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH)], env=dict(env, **extra), capture_output=True, text=True, timeout=60)


def _requeues(tmp: Path) -> list[str]:
    calls = tmp / "scontrol.calls"
    return [c for c in calls.read_text().splitlines() if c.startswith("requeue")] if calls.exists() else []


def _srun_args(tmp: Path) -> list[str]:
    return (tmp / "srun.args").read_text().split("\0")[:-1]


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------------------------------ slurm/train.sbatch
def test_sbatch_script_parses():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SBATCH.read_text()
    for directive in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --exclusive"):
        assert directive in text
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in text


def test_sbatch_launches_torchrun_per_node(fake_slurm):
    tmp, env = fake_slurm
    proc = _sbatch(env)
    assert proc.returncode == 0, proc.stderr
    args = _srun_args(tmp)
    # No --kill-on-bad-exit: it killed a node still exiting with 75 after a save. --wait bounds the step's end.
    # --cpus-per-task: the smallest per-node CPU count of the job (srun does not inherit sbatch's).
    assert args[:6] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=6",
                        "--kill-on-bad-exit=0", "--wait=120"]
    # Each node's task: the script's node task (records the exit code under the run dir), then the launcher.
    assert args[6:8] == ["bash", "-c"] and args[9:13] == ["node-task", str(tmp / "run/.slurm-exit/4242.0"),
                                                          env["PYTHON"], "launch/torchrun.py"]
    for node in NODES:
        launcher = (tmp / f"launcher.{node}.args").read_text().splitlines()
        assert launcher[:2] == ["launch/torchrun.py", "--nnodes=2"] and "--nproc_per_node=4" in launcher
        assert f"--rdzv_endpoint=10.9.8.7:{29500 + 4242}" in launcher and "--rdzv_id=4242" in launcher
        assert "--rdzv_backend=c10d" in launcher and "--rdzv_conf=is_host=0" in launcher  # the script hosts it
        assert launcher[launcher.index("-m"):] == ["-m", "effdist.train", "--config", "configs/tiny-cpu.yaml",
                                                   "--run-dir", str(tmp / "run"), "--resume", "auto",
                                                   "--set", "train.steps=7"]
        assert (tmp / f"launcher.{node}.env").read_text().split() == ["1", "0", "4"]
    # Every node's exit code was recorded and reported; the records are removed afterwards.
    assert "launcher exit codes by node: node07=0 node08=0" in proc.stderr
    assert not (tmp / "run" / ".slurm-exit").exists()
    # The rendezvous store the script hosted is stopped by pid once the step ended.
    assert (tmp / "store.stopped").exists() and not _pid_alive(int((tmp / "store.pid").read_text()))
    assert _requeues(tmp) == []


def test_sbatch_a_rollback_or_start_over_in_train_args_is_done_once_not_at_every_requeue(fake_slurm):
    """TRAIN_ARGS="--resume RUN/checkpoints/iter_N" (a rollback) or "--resume none --fresh" is for the job's first
    start. A requeued start (after a preemption save) must continue from that save: with the flag again it rolled
    back (or started over) at every requeue, moving the saves aside and training the same steps again."""
    tmp, env = fake_slurm
    run = tmp / "run"
    for flags in (["--resume", str(run / "checkpoints/iter_0000005")], ["--resume", "none", "--fresh"]):
        args = " ".join(["--set", "train.steps=7", *flags])
        # The first start: the flags go to the trainer, which saves for a requeue (75) after it trained.
        first = _sbatch(env, TRAIN_ARGS=args, FAKE_node07="75", FAKE_node08="75")
        assert first.returncode == 0 and len(_requeues(tmp)) >= 1, first.stderr
        launcher = (tmp / "launcher.node07.args").read_text().splitlines()
        assert launcher[launcher.index("auto") + 1:] == args.split()
        run.mkdir(exist_ok=True)
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # it trained
        # The requeued start continues from the newest checkpoint.
        again = _sbatch(env, TRAIN_ARGS=args, SLURM_RESTART_COUNT="1")
        assert again.returncode == 0, again.stderr
        launcher = (tmp / "launcher.node07.args").read_text().splitlines()
        assert launcher[launcher.index("-m"):] == ["-m", "effdist.train", "--config", "configs/tiny-cpu.yaml",
                                                   "--run-dir", str(run), "--resume", "auto",
                                                   "--set", "train.steps=7"], launcher
        assert "took effect at the job's first start: this restart continues" in again.stderr, again.stderr
        assert not list(run.glob(".slurm-*"))  # finished: the job's record of its first start is gone
    # A first start that ended before it trained (stopped while loading): the restart still carries the flags.
    _sbatch(env, TRAIN_ARGS="--resume none --fresh", FAKE_node07="75", FAKE_node08="75")
    os.utime(run / "metrics.jsonl", (1, 1))
    _sbatch(env, TRAIN_ARGS="--resume none --fresh", SLURM_RESTART_COUNT="1")
    launcher = (tmp / "launcher.node07.args").read_text().splitlines()
    assert launcher[-4:] == ["auto", "--resume", "none", "--fresh"], launcher


def test_sbatch_cpus_per_task_and_bad_settings(fake_slurm):
    tmp, env = fake_slurm
    assert _sbatch(env, SLURM_JOB_CPUS_PER_NODE="8,4(x1)").returncode == 0
    assert "--cpus-per-task=4" in _srun_args(tmp)
    assert _sbatch(env, CPUS_PER_TASK="3").returncode == 0
    assert "--cpus-per-task=3" in _srun_args(tmp)
    (tmp / "srun.args").unlink()
    proc = _sbatch(env, CPUS_PER_TASK="0")
    assert proc.returncode == 2 and "CPUS_PER_TASK=0" in proc.stderr and not (tmp / "srun.args").exists()
    proc = _sbatch(env, CONFIG="configs/nope.yaml")
    assert proc.returncode == 2 and "CONFIG=configs/nope.yaml not found" in proc.stderr
    assert not (tmp / "srun.args").exists()
    # Submitted from a directory that has a configs/ but is no checkout (EFFDIST_DIR defaults to the submit
    # directory; sbatch --chdir does not change it): one line, not each node's launcher failing to open its file.
    elsewhere = tmp / "elsewhere"
    (elsewhere / "configs").mkdir(parents=True)
    (elsewhere / "configs" / "tiny-cpu.yaml").write_text((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    proc = _sbatch(env, EFFDIST_DIR=str(elsewhere))
    assert proc.returncode == 2 and f"EFFDIST_DIR={elsewhere} is not an effdist checkout" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp / "srun.args").exists()


@pytest.mark.parametrize("codes, extra, rc, requeued, says", [
    # Both nodes saved: requeue.
    ((75, 75), {}, 0, True, ["node07=75 node08=75", "exited with 75 (on node07, node08)", "requeued (restart 1)"]),
    # One node saved and the other's task was killed before it recorded anything (srun reports 137):
    # the record of the node that saved still leads to a requeue.
    ((75, "gone"), {}, 0, True, ["step exited with 137", "node07=75 ", "(on node07)", "requeued"]),
    ((0, 0), {}, 0, False, ["node07=0 node08=0"]),
    # A crash is not retried; its code is the job's.
    ((3, 0), {}, 3, False, ["node07=3 node08=0"]),
    ((0, "gone"), {}, 137, False, ["node07=0 "]),
    # Past MAX_REQUEUES the job's code says a checkpoint was saved (75), whatever srun reported.
    ((75, 75), {"SLURM_RESTART_COUNT": "5", "MAX_REQUEUES": "5"}, 75, False, ["MAX_REQUEUES=5", "sbatch again"]),
    ((75, "gone"), {"SLURM_RESTART_COUNT": "2", "MAX_REQUEUES": "2"}, 75, False, ["step exited with 137",
                                                                                  "MAX_REQUEUES=2"]),
    ((75, 75), {"SLURM_RESTART_COUNT": "4", "MAX_REQUEUES": "5"}, 0, True, ["requeued (restart 5)"]),
    # `scontrol requeue` failing: 75, so that the job does not look finished.
    ((75, 75), {"FAKE_REQUEUE_RC": "1"}, 75, True, ["scontrol requeue 4242 failed"]),
], ids=["both-saved", "saved-and-killed", "finished", "crash", "finished-and-killed", "past-max", "killed-past-max",
        "last-requeue", "requeue-fails"])
def test_sbatch_exit_code_and_requeue(fake_slurm, codes, extra, rc, requeued, says):
    tmp, env = fake_slurm
    proc = _sbatch(env, FAKE_node07=str(codes[0]), FAKE_node08=str(codes[1]), **extra)
    assert proc.returncode == rc, proc.stderr
    assert _requeues(tmp) == (["requeue 4242"] if requeued else [])
    for needle in says:
        assert needle in proc.stderr, proc.stderr
    assert not (tmp / "run" / ".slurm-exit").exists()


def _preempt(tmp: Path, env: dict[str, str], target: str, sig: int, **extra: str) -> subprocess.CompletedProcess:
    """Run the script with both launchers waiting for a signal, then send `sig` to the batch script
    (target "batch": the time-limit warning, `scancel --batch`), to every launcher ("steps":
    `scancel --signal=USR1`, `--signal=USR1@N` without B:) or to both and every other process of the batch step,
    the rendezvous store included ("job": `scancel`, `scontrol requeue`, the time limit)."""
    proc = subprocess.Popen(["bash", str(SBATCH)], env=dict(env, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pids = [tmp / f"launcher.{node}.pid" for node in NODES]
        deadline = time.time() + 30
        while not all(p.exists() and p.read_text().strip() for p in pids) and time.time() < deadline:
            time.sleep(0.02)
        if target in ("batch", "job"):
            proc.send_signal(sig)
        if target == "job":  # scancel, scontrol requeue, the time limit: every process of the batch step too
            os.kill(int((tmp / "store.pid").read_text()), sig)
        if target in ("steps", "job"):  # Slurm signals every process of the step: the node task's shell too
            for p in pids:
                os.killpg(os.getpgid(int(p.read_text())), sig)
        out, err = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _signals(tmp: Path) -> dict[str, list[str]]:
    return {node: _read(tmp / f"signals.{node}").split() for node in NODES}


def test_sbatch_batch_shell_sigusr1_reaches_every_node_and_requeues(fake_slurm):
    # The time-limit warning (--signal=B:USR1@N) and `scancel --batch --signal=USR1` reach the script.
    tmp, env = fake_slurm
    proc = _preempt(tmp, env, "batch", signal.SIGUSR1, FAKE_node07="75@0", FAKE_node08="75@0.5")
    assert _signals(tmp) == {"node07": ["USR1"], "node08": ["USR1"]}
    assert proc.returncode == 0, proc.stderr
    assert _requeues(tmp) == ["requeue 4242"] and "node07=75 node08=75" in proc.stderr


def test_sbatch_steps_sigusr1_lets_the_slower_node_finish_and_requeues(fake_slurm):
    # `scancel --signal=USR1`: the script itself gets no signal. node08 takes 2 s longer to save and exit;
    # with --kill-on-bad-exit=1 Slurm killed it once node07 exited 75; now it gets STEP_END_GRACE.
    tmp, env = fake_slurm
    proc = _preempt(tmp, env, "steps", signal.SIGUSR1, FAKE_node07="75@0", FAKE_node08="75@2", STEP_END_GRACE="20")
    assert _signals(tmp) == {"node07": ["USR1"], "node08": ["USR1"]}
    assert proc.returncode == 0, proc.stderr
    assert "step exited with 75 (launcher exit codes by node: node07=75 node08=75" in proc.stderr
    assert _requeues(tmp) == ["requeue 4242"]


def test_sbatch_steps_a_node_past_the_grace_is_killed_and_the_job_still_requeues(fake_slurm):
    tmp, env = fake_slurm
    start = time.time()
    proc = _preempt(tmp, env, "steps", signal.SIGUSR1, FAKE_node07="75@0", FAKE_node08="75@30", STEP_END_GRACE="1")
    assert time.time() - start < 20  # bounded by STEP_END_GRACE, not by the slow node
    assert proc.returncode == 0, proc.stderr
    assert "step exited with 137 (launcher exit codes by node: node07=75 )" in proc.stderr
    assert _requeues(tmp) == ["requeue 4242"]


def test_sbatch_saves_but_does_not_requeue_on_sigterm(fake_slurm):
    # `scancel JOBID`: SIGTERM to the script (and by Slurm to the steps); the trainers save, no requeue.
    tmp, env = fake_slurm
    proc = _preempt(tmp, env, "batch", signal.SIGTERM, FAKE_node07="75@0", FAKE_node08="75@0")
    assert _signals(tmp) == {"node07": ["TERM"], "node08": ["TERM"]}
    assert proc.returncode == 75, proc.stderr
    assert _requeues(tmp) == [] and _sigterm_line(tmp, 75) in proc.stderr, proc.stderr


def _sigterm_line(tmp: Path, rc: int) -> str:
    """What the script says after SIGTERM. It said "step exited with 75 after SIGTERM (...): not requeueing", and
    after `scontrol requeue` (a SIGTERM too) Slurm then requeued and resumed the job anyway."""
    return (f"job stopped by SIGTERM (scancel, the time limit, `scontrol requeue` or a preemption by Slurm); the step "
            f"exited with {rc}. This script does not requeue it: Slurm requeues it itself if it was `scontrol "
            "requeue` (or a preemption with PreemptMode=REQUEUE), and that start resumes from "
            f"{tmp / 'run'}/checkpoints; otherwise sbatch again to continue\n")


def test_sbatch_a_time_limit_within_the_warning_lead_is_said_and_not_requeued_again_and_again(fake_slurm):
    """A time limit at or below the time-limit warning's lead (--signal=B:USR1@120): the warning comes as the job
    starts, and each start was stopped and requeued before it could train, up to MAX_REQUEUES times. Now the start
    says so with the fix (a longer --time), and that stop is not requeued (75: saved, sbatch again)."""
    tmp, env = fake_slurm
    (tmp / "time_limits").write_text("2:00\n")  # squeue's M:SS: 120 s
    proc = _preempt(tmp, env, "batch", signal.SIGUSR1, FAKE_node07="75@0", FAKE_node08="75@0")
    assert _signals(tmp) == {"node07": ["USR1"], "node08": ["USR1"]}
    assert proc.returncode == 75 and _requeues(tmp) == [], proc.stderr
    assert ("the job's time limit, 120 s, is not comfortably above the time-limit warning, which comes 120 s before "
            "the end (--signal=B:USR1@120): this start may be told to save and stop before it trains, and such a stop "
            "is not requeued. Submit with a longer --time (more than 240 s, e.g. --time=1:00:00)\n") in proc.stderr
    assert ("not requeueing: the job's time limit, 120 s, is not above twice the time-limit warning lead "
            "(WARNING_LEAD=120 s): a requeued start would be stopped again before it trains; exit 75. sbatch again "
            f"with a longer --time (e.g. --time=1:00:00) to continue from {tmp / 'run'}/checkpoints\n") in proc.stderr
    assert (tmp / "squeue.calls").read_text().splitlines()[0] == "-h -j 4242 -o %l"
    # The same without the warning: a save for a preemption is not requeued either (a requeue would be warned at once).
    proc = _sbatch(env, FAKE_node07="75", FAKE_node08="75", SLURM_RESTART_COUNT="1")
    assert proc.returncode == 75 and _requeues(tmp) == [] and "not requeueing: the job's time limit" in proc.stderr
    # A limit raised while the job ran (scontrol update ... TimeLimit=) requeues; a finished run never warns.
    (tmp / "time_limits").write_text("4:00\n1:00:00\n")
    proc = _sbatch(env, FAKE_node07="75", FAKE_node08="75")
    assert "is not comfortably above" in proc.stderr and "not requeueing" not in proc.stderr
    assert proc.returncode == 0 and _requeues(tmp) == ["requeue 4242"], proc.stderr
    for limit in ("4:01", "1-00:00:00", "UNLIMITED", ""):
        (tmp / "time_limits").write_text(f"{limit}\n")
        proc = _sbatch(env)
        assert proc.returncode == 0 and "time limit" not in proc.stderr, (limit, proc.stderr)
    # MAX_REQUEUES still comes first.
    (tmp / "time_limits").write_text("0:30\n")
    proc = _sbatch(env, FAKE_node07="75", FAKE_node08="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert proc.returncode == 75 and "(MAX_REQUEUES=3)" in proc.stderr, proc.stderr
    proc = _sbatch(env, WARNING_LEAD="2m")
    assert proc.returncode == 2 and "WARNING_LEAD=2m is not a number of seconds" in proc.stderr, proc.stderr


def test_sbatch_scancel_signals_every_process_and_the_rendezvous_store_outlives_the_save(fake_slurm):
    # Plain `scancel`, `scontrol requeue` and the time limit SIGTERM every process of the job, the batch step's
    # rendezvous store too. It ended on that SIGTERM while the workers were still saving: each agent, polling it,
    # died with a RendezvousConnectionError traceback and exit 1, and the job's exit code said "failed" although a
    # checkpoint was saved. It ignores SIGTERM now and is stopped (SIGHUP) once the step ended.
    tmp, env = fake_slurm
    port = free_port()
    proc = _preempt(tmp, env, "job", signal.SIGTERM, FAKE_node07="75@1", FAKE_node08="75@1.5", FAKE_STORE="real",
                    RDZV_PORT=str(port), HEAD_ADDR="127.0.0.1")
    # From Slurm and again through the batch script and srun: twice.
    assert {node: set(sigs) for node, sigs in _signals(tmp).items()} == {"node07": {"TERM"}, "node08": {"TERM"}}
    assert {node: set(_read(tmp / f"store.after-save.{node}").split()) for node in NODES} == \
        {"node07": {"up"}, "node08": {"up"}}, proc.stderr
    assert proc.returncode == 75 and "node07=75 node08=75" in proc.stderr, proc.stderr
    # `scontrol requeue` is this path too: the line must not say the job will not be requeued.
    assert _requeues(tmp) == [] and _sigterm_line(tmp, 75) in proc.stderr, proc.stderr
    assert "not requeueing" not in proc.stderr
    assert not _pid_alive(int((tmp / "store.pid").read_text()))  # stopped by the script once the step ended


def test_sbatch_refuses_to_run_outside_slurm(fake_slurm):
    tmp, env = fake_slurm
    env = {k: v for k, v in env.items() if k != "SLURM_JOB_ID"}
    proc = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr and not (tmp / "srun.args").exists()


def test_sbatch_head_address_from_the_node_list(fake_slurm):
    tmp, env = fake_slurm
    del env["HEAD_ADDR"]
    # Node names that resolve nowhere: one line naming HEAD_ADDR, and no step is started.
    proc = _sbatch(env, SLURM_JOB_NODELIST="n[07-08].invalid")
    assert proc.returncode == 1 and "set HEAD_ADDR" in proc.stderr and "rendezvous host" in proc.stderr
    assert not (tmp / "srun.args").exists()
    # An emulated cluster whose nodes are all this machine (tools/slurm_e2e.sh): its loopback address.
    proc = _sbatch(env, SLURM_JOB_NODELIST="localhost")
    assert proc.returncode == 0, proc.stderr
    assert f"--rdzv_endpoint=127.0.0.1:{29500 + 4242}" in (tmp / "launcher.node07.args").read_text().splitlines()


def test_sbatch_hosts_the_real_rendezvous_store_and_falls_back_when_the_port_is_taken(fake_slurm):
    tmp, env = fake_slurm
    port = free_port()
    proc = _sbatch(env, FAKE_STORE="real", RDZV_PORT=str(port), HEAD_ADDR="127.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert [_read(tmp / f"store.seen.{node}").strip() for node in NODES] == ["up", "up"]  # listening during the step
    assert "--rdzv_conf=is_host=0" in (tmp / "launcher.node07.args").read_text().splitlines()
    with socket.socket() as s:  # and stopped after it (REUSEADDR: only a listener blocks the bind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    # Port taken: one line, and the first node's torchrun hosts the store as usual (no is_host=0).
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))
        s.listen()
        proc = _sbatch(env, FAKE_STORE="real", RDZV_PORT=str(port), HEAD_ADDR="127.0.0.1")
    assert proc.returncode == 0, proc.stderr
    assert f"rendezvous store did not start (cannot host the rendezvous store on port {port}" in proc.stderr
    assert "--rdzv_conf=is_host=0" not in (tmp / "launcher.node07.args").read_text().splitlines()
    assert "Traceback" not in proc.stderr


def _taken_port_in_default_range() -> socket.socket:
    """A listening socket on a port of train.sbatch's default range (29500 + job id % 10000)."""
    import random

    for _ in range(200):
        s = socket.socket()
        try:
            s.bind(("0.0.0.0", random.randrange(29500, 39300)))
        except OSError:
            s.close()
            continue
        s.listen()
        return s
    raise RuntimeError("no free port in 29500-39300")


def test_sbatch_moves_the_default_rendezvous_port_on_when_it_is_taken(fake_slurm):
    """The default port (29500 + job id % 10000) can be held by another job or an outgoing connection (the CI's
    local Slurm hit it): the store listens on the next free port and every node's torchrun is given that one."""
    tmp, env = fake_slurm
    env = {k: v for k, v in env.items() if k != "RDZV_PORT"}
    with _taken_port_in_default_range() as taken:
        port = taken.getsockname()[1]
        proc = _sbatch(env, FAKE_STORE="real", HEAD_ADDR="127.0.0.1", SLURM_JOB_ID=str(port - 29500))
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stderr.splitlines() if f"rendezvous port {port} is in use on this node" in x]
    assert len(line) == 1, proc.stderr
    moved = int(line[0].rsplit("listens on ", 1)[1].split()[0])
    assert port < moved <= port + 200
    args = (tmp / "launcher.node07.args").read_text().splitlines()
    assert f"--rdzv_endpoint=127.0.0.1:{moved}" in args and "--rdzv_conf=is_host=0" in args
    assert [_read(tmp / f"store.seen.{node}").strip() for node in NODES] == ["up", "up"]


# ------------------------------------------------------------------------------------------ rendezvous_store.py
def test_rendezvous_store_searches_past_a_taken_port_only_when_asked():
    with _taken_port_in_default_range() as taken:
        port = taken.getsockname()[1]
        plain = subprocess.run([sys.executable, str(STORE), str(port)], capture_output=True, text=True, timeout=60)
        assert plain.returncode == 1 and f"cannot host the rendezvous store on port {port}: " in plain.stderr
        server = subprocess.Popen([sys.executable, str(STORE), str(port), "--search", "50"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            ready = server.stdout.readline().split()
            assert ready[0] == "ready" and port < int(ready[1]) <= port + 50, ready
        finally:
            server.send_signal(signal.SIGHUP)
            server.wait(timeout=30)


@pytest.mark.parametrize("args", [[], ["0"], ["70000"], ["http"], ["1", "2"], ["1", "--search"],
                                  ["1", "--search", "x"], ["1", "--seek", "3"]])
def test_rendezvous_store_usage(args):
    proc = subprocess.run([sys.executable, str(STORE), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "PORT" in proc.stderr


def test_rendezvous_store_serves_ignores_sigusr1_and_sigterm_and_stops_on_sighup():
    from torch.distributed import TCPStore

    port = free_port()
    server = subprocess.Popen([sys.executable, str(STORE), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        client.set("k", "v")
        server.send_signal(signal.SIGUSR1)  # "save and requeue" is for the trainers, not the store
        server.send_signal(signal.SIGTERM)  # scancel / scontrol requeue: the agents need it until the save is done
        time.sleep(0.3)
        assert server.poll() is None and client.get("k") == b"v"
        del client
        server.send_signal(signal.SIGHUP)  # what the batch script sends once the step ended
        assert server.wait(timeout=10) == 0
        assert server.stderr.read() == ""
    finally:
        if server.poll() is None:
            server.kill()


# ------------------------------------------------------------------------------------------ rendezvous_host
def _resolver(table: dict[str, list[str]]):
    return lambda name: table.get(name, [])


def _no_route(addr: str) -> None:
    raise AssertionError(f"no route lookup expected (asked for {addr})")


def test_rendezvous_host_prefers_the_head_nodes_routable_address():
    # Debian maps a host's own name to 127.0.1.1 (what `hostname --ip-address` returns); skip loopback.
    table = {"gpu07": ["127.0.1.1", "10.0.0.7", "fd00::7"], "gpu08": ["10.0.0.8"]}
    assert rendezvous_host("gpu[07-08]", resolve=_resolver(table), route_from_here=_no_route) == "10.0.0.7"
    assert rendezvous_host("gpu07", resolve=_resolver({"gpu07": ["::1", "fd00::7"]}),
                           route_from_here=_no_route) == "fd00::7"


def test_rendezvous_host_on_the_head_node_asks_the_route_to_another_node():
    table = {"gpu07": ["127.0.1.1"], "gpu08": ["127.0.0.1"], "gpu09": ["10.0.0.9", "10.0.1.9"]}
    asked = []

    def route(addr):
        asked.append(addr)
        return {"10.0.0.9": "127.0.0.1", "10.0.1.9": "10.0.1.7"}[addr]  # a loopback answer is skipped

    assert rendezvous_host("gpu[07-09]", this_node="gpu07", resolve=_resolver(table), route_from_here=route) == \
        "10.0.1.7"
    assert asked == ["10.0.0.9", "10.0.1.9"]
    # Not on the head node: its own route would be the wrong host's address.
    with pytest.raises(LaunchEnvError, match=r"'gpu07' of 'gpu\[07-09\]' resolves to 127.0.1.1 .*set HEAD_ADDR"):
        rendezvous_host("gpu[07-09]", this_node="gpu08", resolve=_resolver(table), route_from_here=route)
    # On the head node but no route out that is not loopback.
    with pytest.raises(LaunchEnvError, match="HEAD_ADDR"):
        rendezvous_host("gpu[07-09]", this_node="gpu07", resolve=_resolver(table), route_from_here=lambda a: None)


def test_rendezvous_host_all_loopback_is_one_machine_and_unresolvable_is_named():
    # Every node resolves to loopback only: they are all this host (an emulated cluster).
    table = {"n1": ["127.0.0.1"], "n2": ["127.0.0.1"]}
    assert rendezvous_host("n[1-2]", resolve=_resolver(table), route_from_here=_no_route) == "127.0.0.1"
    with pytest.raises(LaunchEnvError, match="'n1' of 'n1,n2' resolves to nothing here"):
        rendezvous_host("n1,n2", resolve=_resolver({"n2": ["10.0.0.2"]}), route_from_here=_no_route)
    with pytest.raises(LaunchEnvError, match="empty"):
        rendezvous_host("  ", resolve=_resolver({}), route_from_here=_no_route)


def test_resolve_host_and_local_route_on_this_machine():
    addrs = launch_env.resolve_host("localhost")
    assert addrs and addrs[0] == "127.0.0.1"  # IPv4 first
    assert launch_env.resolve_host("no-such-host.invalid") == []
    assert launch_env.local_address_towards("127.0.0.1") == "127.0.0.1"


def test_rendezvous_host_command(capsys, monkeypatch):
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    assert launch_env.main(["rendezvous-host", "localhost"]) == 0
    assert capsys.readouterr().out == "127.0.0.1\n"
    monkeypatch.setattr(launch_env, "rendezvous_host", lambda nodes, this_node=None: "fd00::7")
    assert launch_env.main(["rendezvous-host", "gpu07"]) == 0
    assert capsys.readouterr().out == "[fd00::7]\n"  # torchrun reads HOST:PORT
    assert launch_env.main(["rendezvous-host"]) == 2
    assert capsys.readouterr().err.startswith("usage: python -m effdist.runtime.launch_env rendezvous-host NODELIST")
    monkeypatch.undo()
    assert launch_env.main(["rendezvous-host", "n[07-08].invalid"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("effdist: the first node 'n07.invalid'") and err.count("\n") == 1
