"""What a user sees on the console of the tiny run: the effdist lines, one line per logged step, the
EPAS plan and region changes, and no third-party warnings (Python's default warning filters, as a user has)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.launching import ROOT, TINY, clean_env


def test_tiny_run_stderr_is_effdist_lines_only(tmp_path):
    steps = 4
    cmd = [sys.executable, "-m", "effdist.train", "--config", str(TINY), "--run-dir", str(tmp_path / "run"),
           "--set", f"train.steps={steps}", "--set", "epas.enabled=true", "--set", "epas.interval=2",
           "--set", "logging.tensorboard=false"]
    env = clean_env()
    env.pop("PYTHONWARNINGS")  # the other tests' launcher hides every warning; a user's shell does not
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stderr.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    other = [line for line in lines if not line.startswith(("step ", "[effdist] "))]
    assert other == [], "\n".join(other)
    assert len(step_lines) == steps and "peak mem" in step_lines[0]
    assert any("EPAS: sharing Q/K starts at step 1" in line for line in lines)
    assert any("EPAS: from step 3 layers 2\u20133 share Q/K: region 2 of 2 (final)" in line for line in lines)
    assert len(lines) <= steps + 8, "\n".join(lines)


def test_a_tensor_parallel_run_through_the_launcher_prints_effdist_lines_only(tmp_path):
    """tp=2 with sequence parallelism under launch/torchrun.py: no megatron CUDA_DEVICE_MAX_CONNECTIONS advice (the
    launcher sets it, as launch/run.sh does), no torch FutureWarning per rank for the collectives megatron calls by
    their old names, no torchrun OMP_NUM_THREADS notice."""
    cmd = [sys.executable, "launch/torchrun.py", "--standalone", "--nproc_per_node", "2", "-m", "effdist.train",
           "--config", str(TINY), "--run-dir", str(tmp_path / "run"), "--set", "parallel.tp=2",
           "--set", "parallel.sequence_parallel=true", "--set", "train.steps=2", "--set", "logging.tensorboard=false",
           "--set", f"data.cache_dir={tmp_path / 'data'}"]
    env = clean_env()
    env.pop("PYTHONWARNINGS")
    for name in ("CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS"):
        env.pop(name, None)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    other = [line for line in proc.stderr.splitlines() if not line.startswith(("step ", "[effdist] "))]
    assert other == [], "\n".join(other)


def test_outputs_that_cannot_be_written_are_one_line(tmp_path):
    """Any command: a file it cannot write (a missing or read-only parent, a directory in the way) is one line
    naming it, exit 1, not a traceback."""
    cmd = [sys.executable, "-m", "effdist.cli", "simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4",
           "--json", "/proc/effdist/plan.json"]
    done = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("effdist simulate: No such file or directory: /proc/effdist "
                                                    "(EFFDIST_TRACEBACK=1 shows where)")
    # A file where the output's directory would be: mkdir said "File exists", which reads as if the output were there
    (tmp_path / "plans").write_text("")
    cmd[-1] = str(tmp_path / "plans" / "plan.json")
    done = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"effdist simulate: a file is in the way of a directory to create: "
                                                    f"{tmp_path / 'plans'} (EFFDIST_TRACEBACK=1 shows where)")


def test_a_listing_piped_into_head_ends_quietly():
    """`effdist presets | head -1`: once the reader of stdout is gone, the command stops without a line of its own
    (it said `effdist presets: Broken pipe (EFFDIST_TRACEBACK=1 shows where)` and exit 1, as if something failed),
    with 141, the code of a tool that SIGPIPE ended; a real write error is still named (test above)."""
    for args in (["presets"], ["simulate", "--compare", "1f1b,v-half", "--pp", "2", "--microbatches", "4"]):
        r, w = os.pipe()
        os.close(r)  # the reader (head) is gone before the first line
        done = subprocess.run([sys.executable, "-m", "effdist.cli", *args], env=clean_env(), cwd=ROOT, stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120)
        os.close(w)
        assert done.stderr == "" and done.returncode == 141, (args, done.returncode, done.stderr)


def test_an_output_file_given_as_a_directory_is_one_line_before_the_work(tmp_path):
    """`--json DIR` / `--svg DIR` failed only after the work, with `effdist simulate: Is a directory: DIR
    (EFFDIST_TRACEBACK=1 shows where)` and exit 1; now the flag and the value are named before anything runs, with
    the fix (a file path), exit 2, and nothing is written into the directory."""
    out = tmp_path / "out"
    out.mkdir()
    simulate = ["simulate", "--schedule", "v-half", "--pp", "4", "--microbatches", "16"]
    cases = [
        (simulate + ["--svg", str(out)], "effdist simulate: error: --svg", "timeline.svg"),
        (simulate + ["--json", str(out)], "effdist simulate: error: --json", "simulate.json"),
        (["plan", "--config", "llama-1b", "--gpus", "8", "--gpu-memory", "80", "--json", str(out)],
         "effdist plan: error: --json", "plans.json"),
        # no checkpoint there: the output is checked before the model loads (minutes for a large one)
        (["eval", "--checkpoint", str(tmp_path / "no-run"), "--windows", "2", "--json", str(out)],
         "effdist eval: error: --json", "eval.json"),
    ]
    for args, start, example in cases:
        done = subprocess.run([sys.executable, "-m", "effdist.cli", *args], env=clean_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (args, done.returncode, done.stderr)
        assert lines[0] == f"{start} {out} is a directory: give a file path, e.g. {out / example}", lines
        assert done.stdout == "", (args, done.stdout)
        assert list(out.iterdir()) == []
