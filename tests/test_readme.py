"""The README's commands run as written, in order, in a fresh directory, so the README cannot rot.

The rule (also written as an HTML comment at the top of README.md):
- every line of every ```bash block is run (a line ending in `\\` continues on the next one; comment lines
  are dropped); other blocks (output examples) and the "Everyday commands" table are not run;
- the commands run with `bash -c`, in README order, from a fresh temporary directory that holds a copy of
  configs/ and launch/ (what a checkout has and the commands read) and nothing else; a training command may
  start while the training command just before it still runs (each trains into its own run directory, which
  test_every_training_example_has_its_own_run_dir checks), every other command waits for all before it;
- every train command (`effdist train`, `-m effdist.train`, `launch/run.sh`) gets STEP_OVERRIDE appended (before
  a `>` redirect or a trailing comment), and every one that trains (not --dry-run / --print-config) must print
  "done: 2 steps" and write that step's loss: a second example reusing a run directory would print "nothing to do"
  and fail here;
- the commands that cannot run here are matched by NOT_RUN_HERE and reported as skipped with the reason.

`effdist` and `torchrun` are this interpreter (`python -m effdist.cli`, `python -m torch.distributed.run`) with this
checkout on PYTHONPATH, so the tree under test is what runs whatever the environment's console scripts point at.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launching import ROOT, clean_env, losses

README = ROOT / "README.md"
STEPS = 2
STEP_OVERRIDE = f"--set train.steps={STEPS}"
COPIED_INPUTS = ("configs", "launch")
TRAIN_COMMAND = re.compile(r"(^|\s)(effdist train|-m effdist\.train|launch/run\.sh)(\s|$)")
PLANS_ONLY = ("--dry-run", "--print-config")

# (pattern searched in the command, reason, whether it applies on this machine)
NOT_RUN_HERE: list[tuple[str, str, bool]] = [
    (r"(^|\s)pip install", "installs packages from the network; the test runs in the installed environment", True),
    (r"(^|\s)python -m pytest", "runs the test suite this test is part of", True),
    (r"(^|\s)sbatch\s", "needs a Slurm cluster (tools/slurm_e2e.sh covers slurm/train.sbatch)", True),
    (r"train\.precision=fp8|--device cuda", "needs a CUDA GPU", not torch.cuda.is_available()),
]


@dataclass
class Command:
    index: int
    text: str  # as written in the README

    @property
    def trains(self) -> bool:
        return bool(TRAIN_COMMAND.search(self.text)) and not any(f in self.text for f in PLANS_ONLY)

    @property
    def skip_reason(self) -> str | None:
        for pattern, reason, applies in NOT_RUN_HERE:
            if applies and re.search(pattern, self.text):
                return reason
        return None

    @property
    def to_run(self) -> str:
        return with_step_override(self.text)

    def run_dir(self) -> str:
        """The run directory a train command writes: --run-dir, else the trainer's default runs/<config stem>."""
        args = shlex.split(strip_comment(self.text))
        if "--run-dir" in args:
            return args[args.index("--run-dir") + 1]
        config = args[args.index("--config") + 1] if "--config" in args else args[args.index("launch/run.sh") + 2]
        return f"runs/{Path(config).stem}"


def strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line)


def with_step_override(command: str) -> str:
    """The README command with STEP_OVERRIDE appended if it is a train command (before `>`, `|` or `#`)."""
    if not TRAIN_COMMAND.search(command):
        return command
    body = strip_comment(command)
    m = re.search(r"\s[>|]", body)
    cut = m.start() if m else len(body)
    return f"{body[:cut]} {STEP_OVERRIDE}{body[cut:]}"


def readme_commands(text: str) -> list[Command]:
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    commands: list[str] = []
    fence: str | None = None
    pending = ""
    for line in text.splitlines():
        if fence is None:
            m = re.match(r"^```(\S*)\s*$", line)
            if m:
                fence = m.group(1)
            continue
        if line.startswith("```"):
            fence = None
            continue
        if fence != "bash":
            continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    return [Command(i, c) for i, c in enumerate(commands)]


COMMANDS = readme_commands(README.read_text())


def test_rule_finds_the_readme_examples():
    """The marking rule picks up the README's examples (an empty or mis-fenced README would pass vacuously)."""
    texts = [c.text for c in COMMANDS]
    assert any(t.startswith("effdist train --config configs/tiny-cpu.yaml") for t in texts), texts
    multi = [c for c in COMMANDS if c.trains and re.search(r"nproc_per_node [2-9]|launch/run\.sh [2-9]", c.text)]
    layouts = " ".join(c.text for c in multi)
    for layout in ("parallel.tp=2", "parallel.pp=2", "optim.distributed_optimizer=true"):
        assert layout in layouts, f"no multi-process README example with {layout}"
    assert any("--set" not in c.text for c in multi), "no plain data-parallel README example"
    assert with_step_override("effdist train --config a.yaml --print-config > x.yaml  # c") == \
        f"effdist train --config a.yaml --print-config {STEP_OVERRIDE} > x.yaml"


def test_every_training_example_has_its_own_run_dir():
    """Two examples training into one run directory: the second finds the first one finished ("nothing to do")."""
    seen: dict[str, str] = {}
    for c in COMMANDS:
        if not c.trains or c.skip_reason:
            continue
        run_dir = c.run_dir()
        assert run_dir not in seen, f"README commands share run dir {run_dir}:\n  {seen[run_dir]}\n  {c.text}"
        seen[run_dir] = c.text


def _shim(bin_dir: Path, name: str, module: str) -> None:
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
    path.chmod(0o755)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, dict[int, tuple[subprocess.CompletedProcess, float]]]:
    """Every README command, run once in order in a fresh directory: (result, seconds) by command index."""
    work = tmp_path_factory.mktemp("readme")
    for name in COPIED_INPUTS:
        shutil.copytree(ROOT / name, work / name)
    bin_dir = tmp_path_factory.mktemp("bin")
    _shim(bin_dir, "effdist", "effdist.cli")
    _shim(bin_dir, "torchrun", "torch.distributed.run")
    env = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
                    PYTHON=sys.executable)
    results = {}
    running: list[tuple[Command, subprocess.Popen, float]] = []

    logs = tmp_path_factory.mktemp("readme_logs")

    def finish(entry: tuple[Command, subprocess.Popen, float]) -> None:
        c, proc, start = entry
        proc.wait(timeout=600)
        out, err = ((logs / f"{c.index}.{name}").read_text() for name in ("out", "err"))
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        results[c.index] = done, time.monotonic() - start
        print(f"{results[c.index][1]:6.1f}s rc={proc.returncode} $ {c.to_run}", flush=True)

    for c in COMMANDS:
        if c.skip_reason:
            continue
        # Two training runs side by side keep both cores busy; anything else sees every earlier command done.
        keep = 1 if c.trains and all(r[0].trains for r in running) else 0
        while len(running) > keep:
            finish(running.pop(0))
        # Output to files, not pipes: a run left unread while the other is waited for must never block.
        with open(logs / f"{c.index}.out", "w") as out, open(logs / f"{c.index}.err", "w") as err:
            proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", c.to_run], cwd=work, env=env, stdout=out,
                                    stderr=err, text=True)
        running.append((c, proc, time.monotonic()))
    while running:
        finish(running.pop(0))
    return work, results


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.index:02d}-{c.text[:60]}" for c in COMMANDS])
def test_readme_command_runs(request, command: Command):
    if command.skip_reason:
        pytest.skip(f"README command `{command.text}` not run here: {command.skip_reason}")
    work, results = request.getfixturevalue("readme_run")
    proc, seconds = results[command.index]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`{command.to_run}` exited {proc.returncode} after {seconds:.0f} s:\n{out[-6000:]}"
    if command.trains:
        assert "nothing to do" not in out, f"`{command.to_run}` did not train (its run dir was used before):\n{out}"
        assert f"done: {STEPS} steps" in out, f"`{command.to_run}` did not finish {STEPS} steps:\n{out[-6000:]}"
        run_dir = work / command.run_dir()
        assert STEPS in losses(run_dir), f"{run_dir}/metrics.jsonl has no loss for step {STEPS}"
