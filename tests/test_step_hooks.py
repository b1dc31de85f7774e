"""A StepHook (effdist.protocols) plugged into the real trainer through its `hooks` argument, beside EPAS: the
trainer calls it at every point of every step in order, logs its begin_step value, and its state goes into each
checkpoint under its name and comes back on resume."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.launching import ROOT, TINY, clean_env

# One process, CPU, EPAS on (layer 3 shares from step 1): 3 steps saved at steps 2 and 3, then resumed to 4.
OVERRIDES = ["train.global_batch=4", "train.micro_batch=2", "data.seq_length=32", "data.sample_documents=200",
             "logging.tensorboard=false", "logging.progress_bar=false", "optim.warmup_steps=1",
             "checkpoint.interval=2", "epas.enabled=true", "epas.start_step=1", "epas.interval=1",
             "epas.final_region=1"]

SCRIPT = """
import json, sys
from pathlib import Path

from effdist.config import load_config
from effdist.runtime.distributed import teardown
from effdist.train.trainer import Trainer

run_dir, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
events = []


class Recorder:
    name = "recorder"  # its checkpoint key
    begin_step_metric = "recorder_steps_seen"

    def __init__(self, trainer):
        self.trainer, self.seen = trainer, 0

    def begin_step(self, step):
        assert step == self.trainer.step
        epas = self.trainer.hooks[0]
        assert epas.name == "epas" and epas.step == step, "EPAS is called first, for the same step"
        events.append(["begin_step", step])
        self.seen += 1
        return self.seen

    def after_backward(self):
        events.append(["after_backward", self.trainer.step])

    def after_optimizer_step(self, optimizer):
        assert optimizer is self.trainer.optimizer
        events.append(["after_optimizer_step", self.trainer.step])

    def state_dict(self):
        events.append(["state_dict", self.trainer.step])
        return {"seen": self.seen, "saved_at": self.trainer.step}

    def load_state_dict(self, state):
        events.append(["load_state_dict", state])
        self.seen = state["seen"]

    def boundary_extras(self, chunk_layers):
        return None


for steps in (3, 4):
    trainer = Trainer(load_config(sys.argv[3], overrides + [f"train.steps={steps}"]), run_dir, hooks=[Recorder])
    trainer.setup()
    assert trainer.fit() == 0
    events.append(["finished", trainer.step])
    trainer.lock.release()
    teardown()
print("EVENTS " + json.dumps(events))
"""


def _step(step: int) -> list[list]:
    return [["begin_step", step], ["after_backward", step], ["after_optimizer_step", step]]


@pytest.fixture(scope="module")
def hooked_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hooked")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(run_dir), json.dumps(OVERRIDES),
                           str(TINY)], env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-6000:]
    events = json.loads(proc.stdout.split("EVENTS ", 1)[1])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return events, records, proc.stderr


def test_hook_is_called_at_every_point_in_order_and_its_state_round_trips(hooked_run):
    events, _, _ = hooked_run
    saved_at_3 = {"seen": 3, "saved_at": 3}
    assert events == [
        *_step(0), *_step(1), ["state_dict", 2], *_step(2), ["state_dict", 3], ["finished", 3],
        # Resumed from the step-3 checkpoint: the state saved there comes back before the next step.
        ["load_state_dict", saved_at_3], *_step(3), ["state_dict", 4], ["finished", 4],
    ]


def test_hook_value_is_logged_beside_epas_region(hooked_run):
    _, records, console = hooked_run
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # Counted on from the restored state after the resume at step 3.
    assert [r["recorder_steps_seen"] for r in steps] == [1, 2, 3, 4]
    assert [r["epas_region"] for r in steps] == [0, 1, 1, 1]
    assert "resumed from" in console


def test_hook_names_must_not_collide():
    from effdist.config import load_config
    from effdist.train.trainer import Trainer

    class Named:
        begin_step_metric = None

        def __init__(self, name):
            self.name = name

    for names in (["probe", "probe"], ["data"]):
        trainer = Trainer(load_config(TINY, []), ROOT / "unused-run-dir",
                          hooks=[lambda t, n=n: Named(n) for n in names])
        trainer.runtime, trainer.pipeline = None, None
        with pytest.raises(ValueError, match=f"StepHook name.*{names[0]}"):
            trainer._build_features()
