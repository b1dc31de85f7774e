"""Launchers: env -> rank mapping (fake env dicts), host lists, hostfiles, launch/run.sh, launch/torchrun.py's
exit code and signal forwarding. slurm/train.sbatch and the rendezvous address: tests/test_slurm.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effdist.runtime.launch_env import (
    PREEMPTED_EXIT_CODE,
    DistEnv,
    LaunchEnvError,
    expand_hostlist,
    parse_tasks_per_node,
    resolve_dist_env,
)
from tests.launching import free_port

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "launch" / "run.sh"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"launch_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


hostfile = _load(ROOT / "launch" / "hostfile.py")
torchrun_wrapper = _load(ROOT / "launch" / "torchrun.py")


# ------------------------------------------------------------------------------------------ env mapping
def test_preempted_exit_code_is_ex_tempfail():
    assert PREEMPTED_EXIT_CODE == 75


def test_single_process_without_variables():
    assert resolve_dist_env({}) == DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                                           nnodes=1, master_addr="127.0.0.1", master_port=29500, launcher="single")
    env = resolve_dist_env({"MASTER_PORT": "1234", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert (env.world_size, env.master_port, env.launcher) == (1, 1234, "single")


def test_torchrun_multi_node():
    env = resolve_dist_env({"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                            "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
                            "MASTER_PORT": "29401"})
    assert env == DistEnv(rank=13, world_size=16, local_rank=5, local_world_size=8, node_rank=1, nnodes=2,
                          master_addr="10.0.0.1", master_port=29401, launcher="torchrun")
    assert env.as_torch_env()["RANK"] == "13" and env.as_torch_env()["MASTER_ADDR"] == "10.0.0.1"


def test_torchrun_without_local_variables_means_one_node():
    env = resolve_dist_env({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert (env.local_rank, env.local_world_size, env.node_rank, env.nnodes) == (3, 4, 0, 1)
    # Without GROUP_* the node rank and count follow from the local world size.
    env = resolve_dist_env({"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                            "MASTER_ADDR": "h"})
    assert (env.node_rank, env.nnodes, env.master_port) == (1, 2, 29500)


def test_torchrun_wins_over_slurm_variables():
    # torchrun started by srun (slurm/train.sbatch): each worker sees both sets.
    env = resolve_dist_env({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                            "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500",
                            "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77"})
    assert (env.launcher, env.rank, env.world_size, env.master_port) == ("torchrun", 9, 16, 29500)


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "RANK=4"),
    ({"RANK": "-1", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "RANK=-1"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x'"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({"LOCAL_RANK": "1"}, "RANK"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "LOCAL_RANK=4"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "h"}, "LOCAL_WORLD_SIZE=8"),
    ({"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "GROUP_RANK": "2", "GROUP_WORLD_SIZE": "2"}, "GROUP_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({"EFFDIST_LAUNCHER": "mpi"}, "EFFDIST_LAUNCHER"),
    ({"EFFDIST_LAUNCHER": "torchrun"}, "RANK"),
])
def test_torchrun_inconsistent_env_names_the_variables(env, needle):
    with pytest.raises(LaunchEnvError, match=needle.replace("(", r"\(")):
        resolve_dist_env(env)


def _slurm(**extra: str) -> dict[str, str]:
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "123456"}
    env.update(extra)
    return env


def test_slurm_direct_srun():
    env = resolve_dist_env(_slurm())
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, nnodes=2,
                          master_addr="gpu07", master_port=29500 + 123456 % 10000, launcher="slurm")


def test_slurm_overrides_and_uneven_tasks():
    env = resolve_dist_env(_slurm(MASTER_ADDR="10.1.1.1", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 31000)
    # 3 nodes with 4, 4 and 2 tasks: the last node's local world is 2.
    env = resolve_dist_env(_slurm(SLURM_PROCID="9", SLURM_NTASKS="10", SLURM_LOCALID="1", SLURM_NODEID="2",
                                  SLURM_NNODES="3", SLURM_TASKS_PER_NODE="4(x2),2",
                                  SLURM_JOB_NODELIST="a[1-2],b9"))
    assert (env.local_world_size, env.node_rank, env.nnodes, env.master_addr) == (2, 2, 3, "a1")
    # The step's layout wins over the job's.
    env = resolve_dist_env(_slurm(SLURM_STEP_TASKS_PER_NODE="4(x2)", SLURM_TASKS_PER_NODE="1(x2)"))
    assert env.local_world_size == 4
    # Without any tasks-per-node variable: an even split of SLURM_NTASKS.
    base = _slurm()
    del base["SLURM_NTASKS_PER_NODE"]
    assert resolve_dist_env(base).local_world_size == 4


def test_slurm_single_task_and_no_job_id():
    env = resolve_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    assert (env.world_size, env.master_addr, env.master_port, env.launcher) == (1, "127.0.0.1", 29500, "slurm")


def test_forced_single_ignores_an_allocation():
    env = resolve_dist_env(_slurm(EFFDIST_LAUNCHER="single"))
    assert (env.rank, env.world_size, env.launcher, env.master_port) == (0, 1, "single", 29500 + 3456)


@pytest.mark.parametrize("extra, needle", [
    ({"SLURM_PROCID": "8"}, "SLURM_PROCID=8"),
    ({"SLURM_NTASKS": "nine"}, "SLURM_NTASKS='nine'"),
    ({"SLURM_LOCALID": "4"}, "SLURM_LOCALID=4"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({"SLURM_NTASKS_PER_NODE": "4(x3)"}, "3 nodes"),
    ({"SLURM_NTASKS_PER_NODE": "3,4"}, "adds up to 7"),
    ({"SLURM_NTASKS_PER_NODE": "4(y2)"}, "cannot read"),
    ({"SLURM_JOB_NODELIST": "gpu[07-08"}, "without"),
])
def test_slurm_inconsistent_env_names_the_variables(extra, needle):
    with pytest.raises(LaunchEnvError, match=needle.replace("(", r"\(")):
        resolve_dist_env(_slurm(**extra))


def test_slurm_missing_variables():
    env = _slurm()
    del env["SLURM_NTASKS"]
    with pytest.raises(LaunchEnvError, match="SLURM_NTASKS"):
        resolve_dist_env(env)
    env = _slurm()
    del env["SLURM_LOCALID"]
    with pytest.raises(LaunchEnvError, match="SLURM_LOCALID"):
        resolve_dist_env(env)
    env = _slurm()
    del env["SLURM_JOB_NODELIST"]
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR"):
        resolve_dist_env(env)


@pytest.mark.parametrize("hostlist, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("a,b , c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[3]-ib", ["x3-ib"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["n[1-2", "n1-2]", "n[2-1]", "n[a-b]", "n[[1]]", "a,,b", "n[1-]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(LaunchEnvError, match="host list"):
        expand_hostlist(bad)


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(LaunchEnvError, match="positive"):
        parse_tasks_per_node("0")


def test_real_torchrun_environment_of_two_uneven_nodes(tmp_path):
    """The variables a real torchrun sets (two agents on this machine: 2 + 1 workers) resolve as expected."""
    worker = tmp_path / "worker.py"
    worker.write_text("import os, json\nfrom effdist.runtime.launch_env import resolve_dist_env\n"
                      f"e = resolve_dist_env(os.environ)\nopen(r'{tmp_path}/rank' + str(e.rank), 'w')"
                      ".write(json.dumps(e.__dict__))\n")
    port = free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                                f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
                                "--monitor-interval=0.1", str(worker)], env=_worker_env(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for node, nproc in ((0, 2), (1, 1))]
    for agent in agents:
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, err[-2000:]
    got = {r: json.loads((tmp_path / f"rank{r}").read_text()) for r in range(3)}
    assert [(g["world_size"], g["local_rank"], g["local_world_size"], g["node_rank"], g["nnodes"])
            for g in got.values()] == [(3, 0, 2, 0, 2), (3, 1, 2, 0, 2), (3, 0, 1, 1, 2)]
    assert {(g["master_addr"], g["master_port"], g["launcher"]) for g in got.values()} == {
        ("127.0.0.1", port, "torchrun")}


# ------------------------------------------------------------------------------------------ hostfiles
def test_parse_hostfile_and_commands():
    hosts = hostfile.parse_hostfile("# cluster\nworker-1 slots=8\n\nworker-2   slots=4  # smaller\n")
    assert hosts == [hostfile.Host("worker-1", 8), hostfile.Host("worker-2", 4)]
    cmds = hostfile.torchrun_commands(hosts, ["--config", "c.yaml"], master_port=29600)
    assert cmds[0] == ["torchrun", "--nnodes=2", "--node_rank=0", "--nproc_per_node=8", "--master_addr=worker-1",
                       "--master_port=29600", "-m", "effdist.train", "--config", "c.yaml"]
    assert cmds[1][2:4] == ["--node_rank=1", "--nproc_per_node=4"] and "--master_addr=worker-1" in cmds[1]


@pytest.mark.parametrize("text, needle", [
    ("worker-1\n", "hostfile:1"),
    ("w1 slots=8\nw2 slots=zero\n", "hostfile:2"),
    ("w1 slots=0\n", "positive"),
    ("w1 slots=8\nw1 slots=8\n", "listed twice"),
    ("# nothing\n", "no hosts"),
])
def test_parse_hostfile_errors(text, needle):
    with pytest.raises(hostfile.HostfileError, match=needle):
        hostfile.parse_hostfile(text)


def test_hostfile_cli(tmp_path, capsys):
    hf = tmp_path / "hosts"
    hf.write_text("a slots=2\nb slots=2\n")
    assert hostfile.main([str(hf), "--config", "configs/x.yaml", "--set", "train.steps=5", "--ssh",
                          "--workdir", "/w d"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("ssh b 'cd '\"'\"'/w d'\"'\"' && ")
    assert "--node_rank=1" in lines[1] and "--set train.steps=5" in lines[1]
    assert hostfile.main([str(tmp_path / "missing"), "--config", "c"]) == 2


# ------------------------------------------------------------------------------------------ launch/run.sh
def _fake_command(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_run_sh_builds_the_torchrun_command(tmp_path):
    record = tmp_path / "args"
    fake = _fake_command(tmp_path / "faketorchrun", f'printf "%s\\n" "$@" > {record}\nexit 75\n')
    env = dict(os.environ, TORCHRUN=str(fake))
    proc = subprocess.run(["bash", str(RUN_SH), "2", "configs/tiny-cpu.yaml", "--set", "train.steps=3"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 75, proc.stderr  # the launcher's exit code comes through
    assert record.read_text().splitlines() == ["--standalone", "--nproc_per_node", "2", "-m", "effdist.train",
                                               "--config", "configs/tiny-cpu.yaml", "--set", "train.steps=3"]
    bad = subprocess.run(["bash", str(RUN_SH), "two", "configs/tiny-cpu.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "NPROC" in bad.stderr
    missing = subprocess.run(["bash", str(RUN_SH), "1", "nope.yaml"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    # A preset's name is passed on for effdist to resolve, as `effdist train --config llama-1b` does.
    preset = subprocess.run(["bash", str(RUN_SH), "1", "tiny-cpu"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert preset.returncode == 75 and "tiny-cpu" in record.read_text().splitlines(), preset.stderr


# ------------------------------------------------------------------------------------------ launch/torchrun.py
def test_all_preempted_rule():
    assert torchrun_wrapper.all_preempted([75, 75], 75)
    assert torchrun_wrapper.all_preempted([75, -15], 75)  # the second was stopped by torchrun
    assert not torchrun_wrapper.all_preempted([75, 1], 75)
    assert not torchrun_wrapper.all_preempted([-9, -15], 75)
    assert not torchrun_wrapper.all_preempted([], 75)


def _wrapper_cmd(script: Path, nproc: int = 2) -> list[str]:
    return [sys.executable, str(ROOT / "launch" / "torchrun.py"), "--standalone", f"--nproc_per_node={nproc}",
            "--monitor-interval=0.1", str(script)]


def _worker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_",
                                                                      "SLURM_", "TORCHELASTIC", "GROUP_"))}


def test_torchrun_wrapper_passes_75_through_and_maps_other_failures_to_1(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys, time\nrank = os.environ['RANK']\n"
                      "time.sleep(float(os.environ.get('DELAY_OF_RANK_' + rank, '0')))\n"
                      "sys.exit(int(os.environ['CODE_OF_RANK_' + rank]))\n")
    env = dict(_worker_env(), CODE_OF_RANK_0="75", CODE_OF_RANK_1="75")
    proc = subprocess.run(_wrapper_cmd(worker), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-2000:]
    # A crash seen first is a crash (torchrun then stops the other workers before they exit on their own).
    env.update(CODE_OF_RANK_1="3", DELAY_OF_RANK_0="3")
    proc = subprocess.run(_wrapper_cmd(worker), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    # The one closing line names each worker, the crash first (rank 0, killed by torchrun, after it), and
    # torchrun's own lines about the same exits are not repeated.
    assert "workers failed: rank 1 (local rank 1" in proc.stderr and "exited with 3; rank 0" in proc.stderr, \
        proc.stderr[-2000:]
    assert "failed (exitcode" not in proc.stderr and "closing signal" not in proc.stderr, proc.stderr[-2000:]
    # Workers that refuse to start (a config error: effdist train exits 2) give the launch exit code 2 as well.
    env.update(CODE_OF_RANK_0="2", CODE_OF_RANK_1="2", DELAY_OF_RANK_0="0")
    proc = subprocess.run(_wrapper_cmd(worker), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "workers refused to start" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("nproc", ["0", "-1", "abc"])
def test_torchrun_wrapper_names_a_bad_nproc_per_node_in_one_line(nproc, tmp_path):
    # torchrun itself fails with an AssertionError or ValueError traceback and exit 1
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "torchrun.py"), "--standalone",
                           f"--nproc_per_node={nproc}", str(tmp_path / "never_started.py")],
                          env=_worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[launch/torchrun] --nproc_per_node {nproc}: give a positive"), \
        proc.stderr[-2000:]


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_torchrun_wrapper_stopped_while_importing_torch_says_so_and_exits(tmp_path):
    """SIGTERM in the launcher's first second, while it still imports torch: one line and exit 143 (the default
    action killed it silently; an exception raised from a handler there can vanish inside torch's import)."""
    script = tmp_path / "worker.py"
    script.write_text("open(__file__ + '.ran', 'w').close()\n")
    # The launcher imports torch in a second or two; on a loaded machine the signal could come after that and the
    # test would check another path. An import hook holds the launcher inside torch's imports (at
    # torch.distributed.run, whose import follows torch's) until the signal ends it, whatever the load.
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(
        "import sys, time\n"
        "class Hold:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch.distributed.run':\n"
        "            time.sleep(120)\n"
        "sys.meta_path.insert(0, Hold())\n")
    env = _worker_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hold), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "torchrun.py"), "--standalone",
                             "--nproc_per_node=1", str(script)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not _catches(proc.pid, signal.SIGTERM):  # the launcher's handler is in place: torch's import follows
        assert time.time() < deadline and proc.poll() is None, "the launcher never installed its SIGTERM handler"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines() == ["[launch/torchrun] SIGTERM before the workers started: exit code 143"], err
    assert not Path(str(script) + ".ran").exists()


def test_the_launchers_early_signal_handler_imports_nothing(tmp_path):
    """The handler runs inside whatever the main thread is importing; an import of its own can then meet a
    partially initialised module, and torch's optional imports swallow the ImportError with the signal in it (a
    SIGTERM lost once under load). Here every import fails while the signal is handled: still one line, 143."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'launch')!r})\n"
        "import torchrun\n"
        "torchrun.Forwarder().install()\n"
        "class NoImports:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        raise ImportError(f'{name} is partially initialised (simulated)')\n"
        "sys.meta_path.insert(0, NoImports())\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('signal lost', flush=True)\n")
    proc = subprocess.run([sys.executable, str(probe)], env=_worker_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:] + proc.stdout
    assert proc.stderr.strip() == "[launch/torchrun] SIGTERM before the workers started: exit code 143"


def test_a_rendezvous_lost_during_a_preemption_says_the_workers_were_saving():
    """Slurm signals every node; the first node's launcher exits once its own workers saved, and the others lose
    the rendezvous while theirs still save: the line says a signal came first, not just that the store is gone."""
    lost = RuntimeError("store gone")
    plain = torchrun_wrapper.rendezvous_lost(lost, "n1:29500")
    assert plain.startswith("lost the rendezvous at n1:29500: the process hosting its store") and "SIGTERM" not in plain
    during = torchrun_wrapper.rendezvous_lost(lost, "n1:29500", "SIGTERM")
    assert during.startswith("lost the rendezvous at n1:29500 after SIGTERM had reached this node (")
    assert "this node's workers were saving and are stopped now" in during and during.endswith("exit code 1")


def test_first_failure_first_within_one_second():
    """torchrun's failure timestamps are whole seconds: a worker it SIGTERMed after another failed is listed
    after that one, even with a lower rank."""
    from types import SimpleNamespace as Failure

    failures = {0: Failure(timestamp=100, exitcode=-signal.SIGTERM, local_rank=0, pid=10),
                1: Failure(timestamp=100, exitcode=-signal.SIGKILL, local_rank=1, pid=11)}
    assert torchrun_wrapper.describe_failures(failures) == [
        "rank 1 (local rank 1, pid 11) killed by SIGKILL", "rank 0 (local rank 0, pid 10) killed by SIGTERM"]
    assert torchrun_wrapper.all_refused([2, -15]) and not torchrun_wrapper.all_refused([2, 1])


def test_torchrun_wrapper_forwards_sigusr1_to_workers(tmp_path):
    worker = tmp_path / "worker.py"
    ready = tmp_path / "ready"
    worker.write_text(
        "import os, signal, sys, time\n"
        "got = []\n"
        "signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))\n"
        f"open(r'{ready}' + os.environ['RANK'], 'w').close()\n"
        "deadline = time.time() + 60\n"
        "while not got and time.time() < deadline:\n"
        "    time.sleep(0.02)\n"
        "sys.exit(75 if got else 4)\n")
    proc = subprocess.Popen(_wrapper_cmd(worker), env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 60
        while not all(Path(f"{ready}{r}").exists() for r in (0, 1)) and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "forwarding to 2 worker(s)" in err


@pytest.mark.parametrize("when", ["while the workers run", "in the exit barrier"])
def test_torchrun_wrapper_that_loses_the_rendezvous_says_so_in_one_line(tmp_path, when):
    """Two nodes' launchers (agents) on this machine with a c10d rendezvous whose store the first one hosts. That
    one SIGKILLed while the workers run: the other launcher's next poll of the store fails; it stops its worker
    and exits 1 with one line (stock torchrun: a RendezvousConnectionError traceback and C++ stack dumps).
    SIGKILLed once the other node's worker has finished, while that launcher waits for the others at the end:
    exit 0 as its worker, and one line for torch's logged traceback."""
    import psutil

    barrier = when == "in the exit barrier"
    worker = tmp_path / "worker.py"
    worker.write_text("import os, sys, time\n"
                      f"open(r'{tmp_path}/ready' + os.environ['RANK'], 'w').close()\n"
                      f"if os.environ['NODE_ROLE'] == 'other' and {barrier}:\n"
                      "    time.sleep(0.5)\n"
                      "    sys.exit(0)\n"
                      "time.sleep(120)\n")  # bounded: a worker this test failed to stop ends by itself
    port = free_port()
    env = _worker_env()
    env.pop("TORCH_CPP_LOG_LEVEL", None)  # the launcher's own default is under test

    def agent(is_host: bool, out) -> subprocess.Popen:
        # is_host explicit: both agents run on the endpoint's host, and either could otherwise host the store.
        return subprocess.Popen([sys.executable, str(ROOT / "launch" / "torchrun.py"), "--nnodes=2",
                                 "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                 "--rdzv-id=lost", f"--rdzv-conf=is_host={int(is_host)}", "--monitor-interval=0.1",
                                 str(worker)], env={**env, "NODE_ROLE": "head" if is_host else "other"}, cwd=ROOT,
                                stdout=out, stderr=out, text=True)

    # The head's output goes nowhere: its worker, orphaned by the SIGKILL, would hold a pipe open.
    head = agent(True, subprocess.DEVNULL)
    other = agent(False, subprocess.PIPE)
    started = [head, other]
    try:
        deadline = time.time() + 90
        while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
            assert time.time() < deadline and head.poll() is None and other.poll() is None, \
                "the two workers never both started"
            time.sleep(0.05)
        head_workers = psutil.Process(head.pid).children(recursive=True)
        other_workers = psutil.Process(other.pid).children(recursive=True)
        started += head_workers + other_workers
        assert len(head_workers) == 1 and len(other_workers) == 1, (head_workers, other_workers)
        if barrier:  # the other node's worker has finished: its launcher waits for the head's at the end
            other_workers[0].wait(timeout=60)
            time.sleep(1)
        head.kill()
        head.wait(timeout=30)
        head_workers[0].kill()  # orphaned: it would sleep on
        out, err = other.communicate(timeout=90)
        # torchrun stopped the surviving launcher's worker before it exited (is_running rules out a reused pid).
        left = [p for p in other_workers if p.is_running()]
    finally:
        for proc in started:  # only what this test started, by pid
            try:
                proc.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
    assert "Traceback" not in out + err and not out.strip(), (out + err)[-3000:]
    lines = err.strip().splitlines()
    if barrier:
        assert other.returncode == 0, err[-3000:]
        assert lines == ["[launch/torchrun] this node's workers finished; the launchers of the other nodes could not "
                         f"be awaited: the rendezvous store at 127.0.0.1:{port} is gone (the first node's launcher "
                         "exited or died first)"], err[-3000:]
        return
    assert other.returncode == 1, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"[launch/torchrun] lost the rendezvous at 127.0.0.1:{port}: ") \
        and lines[0].endswith("(--resume auto): exit code 1"), err[-3000:]
    assert not left, left
