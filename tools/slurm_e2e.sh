#!/usr/bin/env bash
# slurm/train.sbatch on a real Slurm: preempt, requeue, resume, finish; losses bit for bit.
#
#   sudo bash tools/slurm_e2e.sh          # root: it starts Slurm daemons and edits /etc/hosts
#
# Installs Slurm 22.05 + munge from the Debian packages if missing (apt-get), starts a private cluster
# of emulated nodes on this machine (munged, slurmctld and one slurmd per node, state under a temporary
# directory, private ports and munge socket), and runs slurm/train.sbatch on configs/tiny-cpu.yaml over
# 2 nodes (1 CPU process each), unchanged except for --export'ed settings:
#   reference  never interrupted
#   batch      `scancel --batch --signal=USR1`: the signal reaches the batch script, which forwards it
#   steps      `scancel --signal=USR1`: the signal reaches the steps' processes, not the batch script
#   timelimit  the time-limit warning (`--signal=B:USR1@N`): Slurm signals the batch script itself
#   maxrequeue the steps path with MAX_REQUEUES=0: saves, is not requeued, ends FAILED with exit code 75
#   cancel     plain `scancel`: SIGTERM to every process of the job; saves, ends CANCELLED, not requeued
#   requeue    `scontrol requeue` of the running job: SIGTERM to every process, Slurm requeues it itself
# and checks that each preempted job was requeued, resumed from the checkpoint it saved, ended COMPLETED
# with exit code 0, and logged exactly the reference's losses (metrics.jsonl, bit for bit); and that no
# job printed a Python traceback; that the cancelled job's launchers both exited 75 after its save; and that
# no process of any job (trainer, launcher, rendezvous store) is left once the jobs ended. One PASS/FAIL
# line per check; exit 0 only if every check passed.
#
# Slurm checks time limits every 30 s. To test the warning without a long run, the timelimit job is
# submitted with a long limit; once it trains, the test shortens the limit so that the warning is due,
# and holds the trainers (SIGSTOP) until the batch script reports the signal (SIGCONT), so that a fast
# machine cannot finish before Slurm's next check. After the requeue the long limit is restored.
#
# It stops only what it started, by pid (daemons run in the foreground of this script), removes its
# /etc/hosts line, and deletes its directory unless SLURM_E2E_KEEP=1. Settings: PYTHON (an interpreter
# with effdist's dependencies; default: python3 on PATH), SLURM_E2E_STEPS (default 40),
# SLURM_E2E_TIMEOUT (seconds for all jobs, default 600), SLURM_E2E_DIR (work directory).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
STEPS=${SLURM_E2E_STEPS:-40}
TIMEOUT=${SLURM_E2E_TIMEOUT:-600}
NODES=14          # 7 jobs of 2 nodes run at once
CASES=(reference batch steps timelimit maxrequeue cancel requeue)
TAG="effdist-slurm-e2e-$$"   # marks our /etc/hosts line

say() { echo "[slurm_e2e $(date +%H:%M:%S)] $*"; }
failures=0
check() {   # check NAME OK(0/1) WHAT-WAS-SEEN
    if [[ $2 == 0 ]]; then echo "PASS $1: $3"; else echo "FAIL $1: $3"; failures=$((failures + 1)); fi
}
die() { echo "FAIL setup: $*"; exit 1; }

[[ $(id -u) == 0 ]] || { echo "FAIL setup: needs root (starts slurmd as root, edits /etc/hosts)"; exit 1; }
"$PYTHON" -c "import torch, megatron.core" 2>/dev/null ||
    die "PYTHON=$PYTHON cannot import torch and megatron.core; set PYTHON to effdist's interpreter"

# ----------------------------------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
    ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurmctld slurmd slurm-client munge; } \
        >/tmp/slurm_e2e_apt.$$.log 2>&1 || die "apt-get failed: see /tmp/slurm_e2e_apt.$$.log"
fi

# ------------------------------------------------------------------------------------ cluster files
WORK=${SLURM_E2E_DIR:-$(mktemp -d /tmp/slurm_e2e.XXXXXX)}
mkdir -p "$WORK" && chmod 755 "$WORK"
export SLURM_CONF=$WORK/etc/slurm.conf
HOST=$(hostname -s)
PIDS=()          # daemons we started, stopped in reverse order
hosts_added=0

teardown() {
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        # Jobs first, so that their processes (children of slurmstepd, not of us) end with them.
        if ((${#JOBS[@]})); then
            scancel --quiet --full --signal=KILL "${JOBS[@]}" 2>/dev/null
            scancel --quiet "${JOBS[@]}" 2>/dev/null
        fi
        local t
        for t in $(seq 40); do
            [[ -z $(squeue -h -t R,CG -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
        local i
        for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill -TERM "${PIDS[i]}" 2>/dev/null; done
        for t in $(seq 40); do
            local alive=0
            for i in "${PIDS[@]}"; do kill -0 "$i" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.25
        done
        for i in "${PIDS[@]}"; do kill -KILL "$i" 2>/dev/null; done
    fi
    if ((hosts_added)); then
        # In place: /etc/hosts may be a bind mount that cannot be replaced.
        local kept
        kept=$(grep -v -- "$TAG" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    if [[ ${SLURM_E2E_KEEP:-0} == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
JOBS=()
trap teardown EXIT
trap 'exit 130' INT TERM

ports=$("$PYTHON" - "$NODES" <<'EOF'
import random, socket, sys
n = int(sys.argv[1]) + 1   # slurmctld + one port per slurmd
for _ in range(200):
    base = random.randrange(20000, 40000)
    try:
        for p in range(base, base + n):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
    except OSError:
        continue
    print(base)
    break
EOF
)
[[ -n $ports ]] || die "no free port range"
CTLD_PORT=$ports
SLURMD_BASE=$((ports + 1))

mkdir -p "$WORK"/{etc,ctld,log,run,jobs,runs,gpu,munge}
for g in 0 1 2 3 4 5 6 7; do ln -sf /dev/null "$WORK/gpu/nvidia$g"; done   # fake GPUs for --gpus-per-node
cat >"$SLURM_CONF" <<EOF
ClusterName=effdiste2e
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire=10 makes a requeued job start after ~12 s instead of ~2.5 min.
AuthInfo=socket=$WORK/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/ctld
SlurmdSpoolDir=$WORK/run/slurmd-%n
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd-%n.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MinJobAge=3600
SchedulerParameters=sched_interval=2,bf_interval=2
FirstJobId=$((RANDOM % 5000 + 1000))
NodeName=e2en[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$SLURMD_BASE-$((SLURMD_BASE + NODES - 1))] CPUs=1 Gres=gpu:8 State=UNKNOWN
PartitionName=e2e Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
echo "NodeName=e2en[1-$NODES] Name=gpu File=$WORK/gpu/nvidia[0-7]" >"$WORK/etc/gres.conf"

# The node names must resolve (the batch script resolves the first node for the rendezvous).
names=$(for i in $(seq "$NODES"); do printf 'e2en%s ' "$i"; done)
printf '127.0.0.1 %s # %s\n' "$names" "$TAG" >>/etc/hosts
hosts_added=1

# --------------------------------------------------------------------------------- daemons
# munged refuses to run as root: a key of our own, owned by munge, in a private directory; the socket's
# directory must be searchable by all.
mkdir -p "$WORK/munge/key"
mungekey --create --keyfile="$WORK/munge/key/munge.key" >/dev/null 2>&1 ||
    dd if=/dev/urandom of="$WORK/munge/key/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$WORK/munge" && chmod 755 "$WORK/munge" && chmod 700 "$WORK/munge/key" &&
    chmod 600 "$WORK/munge/key/munge.key"
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
    --socket="$WORK/munge/munge.socket" --key-file="$WORK/munge/key/munge.key" \
    --pid-file="$WORK/munge/munged.pid" --seed-file="$WORK/munge/munged.seed" \
    --log-file="$WORK/munge/munged.log" >"$WORK/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [[ -S $WORK/munge/munge.socket ]] && break; sleep 0.1; done
[[ -S $WORK/munge/munge.socket ]] || die "munged did not start: $(tail -n 3 "$WORK/log/munged.out" 2>&1)"

slurmctld -D -c >"$WORK/log/slurmctld.out" 2>&1 &
PIDS+=($!)
for i in $(seq "$NODES"); do
    slurmd -D -N "e2en$i" >"$WORK/log/slurmd-e2en$i.out" 2>&1 &
    PIDS+=($!)
done
for _ in $(seq 100); do
    [[ $(sinfo -h -t idle -o %D 2>/dev/null) == "$NODES" ]] && break
    sleep 0.3
done
idle=$(sinfo -h -t idle -o %D 2>/dev/null)
[[ $idle == "$NODES" ]] ||
    die "cluster not ready: $idle/$NODES nodes idle; $(tail -n 3 "$WORK/log/slurmctld.log" 2>&1)"
say "cluster up: $NODES nodes, slurmctld port $CTLD_PORT, work dir $WORK"

# ------------------------------------------------------------------------------------ jobs
declare -A JID
submit() {   # submit CASE [sbatch options...]
    local case=$1
    shift
    local extra=${SUBMIT_ENV:-}
    JID[$case]=$(env CONFIG=configs/tiny-cpu.yaml RUN_DIR="$WORK/runs/$case" GPUS_PER_NODE=1 PYTHON="$PYTHON" \
        PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 STEP_END_GRACE=60 \
        TRAIN_ARGS="--set train.steps=$STEPS --set data.cache_dir=$WORK/data" $extra \
        sbatch --parsable --job-name="$case" --chdir="$ROOT" --output="$WORK/jobs/$case.out" "$@" \
        "$ROOT/slurm/train.sbatch") || die "sbatch of the $case job failed"
    JOBS+=("${JID[$case]}")
    say "submitted $case: job ${JID[$case]}"
}
field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1; }
steps_logged() { [[ -f $WORK/runs/$1/metrics.jsonl ]] && wc -l <"$WORK/runs/$1/metrics.jsonl" || echo 0; }
job_log() { cat "$WORK/jobs/$1.out" 2>/dev/null; }

# The trainer processes (python -m effdist.train) of a job, found by the job id in their environment.
trainer_pids() {
    "$PYTHON" - "$1" <<'EOF'
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        continue
    if b"effdist.train" in cmd and b"launch/torchrun.py" not in cmd and f"SLURM_JOB_ID={sys.argv[1]}".encode() in env:
        print(pid)
EOF
}

deadline=$((SECONDS + TIMEOUT))
# The reference prepares the shared data cache; the others start once it trains.
submit reference
while (($(steps_logged reference) < 1)) && ((SECONDS < deadline)); do
    [[ $(field "${JID[reference]}" JobState) =~ ^(RUNNING|PENDING|CONFIGURING)$ ]] || break
    sleep 0.5
done
submit batch
submit steps
submit timelimit --time=30 --signal=B:USR1@600
SUBMIT_ENV="MAX_REQUEUES=0" submit maxrequeue
submit cancel
submit requeue

declare -A SIGNALLED STOPPED RESTORED
signal_when_training() {   # the preemption of each case, once it has logged 2 steps in its first start
    local case=$1 jid=${JID[$1]}
    [[ -z ${SIGNALLED[$case]:-} ]] || return 0
    [[ $(field "$jid" JobState) == RUNNING ]] && (($(steps_logged "$case") >= 2)) || return 0
    SIGNALLED[$case]=1
    case $case in
        batch) scancel --batch --signal=USR1 "$jid" ;;
        steps | maxrequeue) scancel --signal=USR1 "$jid" ;;
        cancel) scancel "$jid" ;;
        requeue) scontrol requeue "$jid" ;;
        timelimit)
            # Elapsed minutes + 1 as the limit: the warning (600 s before the end) is due now.
            local run_s minutes
            run_s=$(($(date +%s) - $(date -d "$(field "$jid" StartTime)" +%s)))
            minutes=$((run_s / 60 + 2))
            scontrol update JobId="$jid" TimeLimit="$minutes"
            STOPPED[$case]=$(trainer_pids "$jid" | tr '\n' ' ')
            # shellcheck disable=SC2086
            [[ -n ${STOPPED[$case]} ]] && kill -STOP ${STOPPED[$case]}
            ;;
    esac
    say "$case: preempted job $jid at step $(steps_logged "$case")"
}

while ((SECONDS < deadline)); do
    for case in batch steps timelimit maxrequeue cancel requeue; do signal_when_training "$case"; done
    # timelimit: release the trainers once the batch script has the warning; restore the long limit
    # once the job is back in the queue, so that the second start is not warned again.
    if [[ -n ${STOPPED[timelimit]:-} ]] && job_log timelimit | grep -q "received SIGUSR1"; then
        # shellcheck disable=SC2086
        kill -CONT ${STOPPED[timelimit]} 2>/dev/null
        STOPPED[timelimit]=""
    fi
    if [[ -n ${SIGNALLED[timelimit]:-} && -z ${RESTORED[timelimit]:-} ]] &&
        (($(field "${JID[timelimit]}" Restarts) >= 1)); then
        scontrol update JobId="${JID[timelimit]}" TimeLimit=30 && RESTORED[timelimit]=1
    fi
    running=0
    for case in "${CASES[@]}"; do
        [[ $(field "${JID[$case]}" JobState) =~ ^(RUNNING|PENDING|CONFIGURING|COMPLETING|REQUEUED|REQUEUE_HOLD)$ ]] &&
            running=1
    done
    ((running)) || break
    sleep 0.3
done
[[ -n ${STOPPED[timelimit]:-} ]] && kill -CONT ${STOPPED[timelimit]} 2>/dev/null
say "jobs ended after ${SECONDS}s"

# Every process of a job (trainers, launchers, the rendezvous store; found by the job id in their environment)
# must be gone once the job ended: give them the 10 s a slurmstepd may take to reap its step.
job_pids() {
    "$PYTHON" - "$@" <<'EOF'
import os, sys
ids = {f"SLURM_JOB_ID={j}".encode() for j in sys.argv[1:]}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        env = set(open(f"/proc/{pid}/environ", "rb").read().split(b"\0"))
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    if env & ids:
        print(pid, cmd[:100])
EOF
}
for _ in $(seq 20); do [[ -z $(job_pids "${JOBS[@]}") ]] && break; sleep 0.5; done
left=$(job_pids "${JOBS[@]}")
check "no process of any job is left" "$([[ -z $left ]]; echo $?)" "${left:-none}"

# ---------------------------------------------------------------------------------- checks
for case in "${CASES[@]}"; do
    jid=${JID[$case]}
    echo "----- $case (job $jid): $(scontrol show job -o "$jid" | grep -o 'JobState=[^ ]*\|Restarts=[^ ]*\|ExitCode=[^ ]*' | tr '\n' ' ')"
done
pairs=()
for case in "${CASES[@]}"; do pairs+=("$case=${JID[$case]}"); done
verdicts=$("$PYTHON" - "$WORK" "$STEPS" "${pairs[@]}" <<'EOF'
import json, re, subprocess, sys
from pathlib import Path

work, steps = Path(sys.argv[1]), int(sys.argv[2])
job_ids = dict(arg.split("=", 1) for arg in sys.argv[3:])

def job(case):
    out = subprocess.run(["scontrol", "show", "job", "-o", job_ids[case]], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

def losses(case):
    path = work / "runs" / case / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}

def line(name, ok, seen):
    print(f"{'PASS' if ok else 'FAIL'} {name}: {seen}")

ref = losses("reference")
for case in ("reference", "batch", "steps", "timelimit", "maxrequeue", "cancel", "requeue"):
    j, log = job(case), (work / "jobs" / f"{case}.out").read_text(errors="replace") if (work / "jobs" / f"{case}.out").exists() else ""
    state, restarts, code = j.get("JobState"), int(j.get("Restarts", "-1")), j.get("ExitCode")
    if case == "cancel":
        line(f"{case} ends CANCELLED and is not requeued", state == "CANCELLED" and restarts == 0,
             f"JobState={state} ExitCode={code} Restarts={restarts}")
        codes = re.findall(r"launcher exit codes by node: ([^)]*)\)", log)
        line(f"{case}: both launchers saved and exited 75", bool(codes) and
             sorted(c.split("=")[-1] for c in codes[-1].split()) == ["75", "75"], f"exit codes by node: {codes}")
        saved = sorted(p.name for p in (work / "runs" / case / "checkpoints").glob("iter_*"))
        line(f"{case} saved a checkpoint", bool(saved), f"checkpoints {saved}")
    elif case == "maxrequeue":
        line(f"{case} ends FAILED with exit code 75 and is not requeued", state == "FAILED" and code == "75:0" and restarts == 0,
             f"JobState={state} ExitCode={code} Restarts={restarts}")
        line(f"{case} says why", "MAX_REQUEUES=0" in log and "not requeueing" in log,
             "log names MAX_REQUEUES" if "MAX_REQUEUES=0" in log else "no MAX_REQUEUES line in the log")
        saved = sorted(p.name for p in (work / "runs" / case / "checkpoints").glob("iter_*"))
        line(f"{case} saved a checkpoint", bool(saved), f"checkpoints {saved}")
    else:
        want_restarts = "== 0" if case == "reference" else ">= 1"
        line(f"{case} ends COMPLETED with exit code 0 (restarts {want_restarts})",
             state == "COMPLETED" and code == "0:0" and (restarts == 0 if case == "reference" else restarts >= 1),
             f"JobState={state} ExitCode={code} Restarts={restarts}")
    if case in ("batch", "steps", "timelimit", "requeue"):
        resumed = re.findall(r"resumed from \S*iter_(\d+) at step (\d+)", log)
        line(f"{case} resumed from its checkpoint", bool(resumed) and 0 < int(resumed[0][1]) < steps,
             f"resumed at step {resumed[0][1]}" if resumed else "no 'resumed from' line in the log")
        got = losses(case)
        diff = [s for s in ref if got.get(s) != ref[s]] + [s for s in got if s not in ref]
        line(f"{case} losses identical to the reference", len(ref) == steps and not diff,
             f"{len(got)} steps, all {len(ref)} losses equal bit for bit" if not diff and len(ref) == steps else
             f"reference has {len(ref)}/{steps} steps; differing steps {diff[:5]}")
    if case == "reference":
        line("reference logged every step", len(ref) == steps, f"{len(ref)}/{steps} steps in metrics.jsonl")
    # Python tracebacks, C++ stack traces (torch's TCPStore) and the rendezvous shutdown warning.
    noise = [l for l in log.splitlines() if re.search(r"Traceback \(most recent|Exception raised from|"
                                                        r"RendezvousConnectionError|failed to shutdown the rendezvous", l)]
    line(f"{case} printed no traceback", not noise, f"{len(noise)} line(s) in {case}.out, first: {noise[0][:120]}"
         if noise else "none")
EOF
)
echo "$verdicts"
failures=$((failures + $(grep -c '^FAIL' <<<"$verdicts")))
if ((failures)); then
    say "$failures check(s) failed; logs: $WORK/jobs/*.out (SLURM_E2E_KEEP=1 keeps them)"
    for case in "${CASES[@]}"; do
        echo "===== $case.out (last 25 lines)"
        tail -n 25 "$WORK/jobs/$case.out" 2>/dev/null
    done
    exit 1
fi
say "all checks passed in ${SECONDS}s"
exit 0
