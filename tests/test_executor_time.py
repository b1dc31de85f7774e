"""effdist.pipeline.executor_time: the step time of a schedule as the executor posts its P2P batches on NCCL.

A case worked by hand, the model's batches against what StepTransfers really posts (a recording stand-in for
torch.distributed), and the measured p=4 runs (docs/results/pipeline_p4_*.json): fed each rank's measured busy
time, the model gives each rank's measured bubble, which `simulate` does not."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch

from effdist.config import SCHEDULES
from effdist.pipeline import p2p
from effdist.pipeline.executor_time import ExecutorModel, posted_batches
from effdist.pipeline.p2p import ACTIVATION, GRADIENT, CommPlan, Message, StepTransfers
from effdist.pipeline.schedules import build_schedule
from effdist.pipeline.simulate import Costs, simulate
from effdist.protocols import TensorSpec

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted((ROOT / "docs" / "results").glob("pipeline_p4_*.json"))


def test_1f1b_on_two_ranks_worked_by_hand():
    """pp = 2, 2 microbatches, F = B = W = 1 (BW = 2), transfers free.

    Rank 0 runs F0 F1 BW0 BW1, rank 1 F0 BW0 F1 BW1. Rank 1 posts both activation receives before its first action
    (one batch): its F0 waits for activation 1 too, which rank 0 sends after its F1 at t = 2, so F0 runs 2-3 (not
    1-2), BW0 3-5, F1 5-6, BW1 6-8. Rank 0 posts its last send and both gradient receives after F1 (one batch): its
    BW0 waits for gradient 1 as well, sent at t = 8, so BW0 runs 8-10 and BW1 10-12. `simulate` lets BW0 start at
    4, when gradient 0 arrives, and ends at 9."""
    schedule = build_schedule("1f1b", 2, 2)
    model = ExecutorModel(schedule)
    act = [Message(ACTIVATION, 0, m, 0, 1) for m in range(2)]
    grad = [Message(GRADIENT, 0, m, 1, 0) for m in range(2)]
    assert [(b.after, b.ops) for b in model.batches[0]] == [
        (0, (("send", act[0]),)), (1, (("send", act[1]), ("recv", grad[0]), ("recv", grad[1])))]
    assert [(b.after, b.ops) for b in model.batches[1]] == [
        (-1, (("recv", act[0]), ("recv", act[1]))), (1, (("send", grad[0]),)), (3, (("send", grad[1]),))]
    timing = model.run([Costs()] * 2)
    assert [timing.ends[a] for a in schedule.actions[1]] == [3.0, 5.0, 6.0, 8.0]
    assert [timing.ends[a] for a in schedule.actions[0]] == [1.0, 2.0, 10.0, 12.0]
    assert timing.makespan == 12.0 and simulate(schedule).makespan == 9.0
    assert timing.busy == [6.0, 6.0] and timing.bubble_rates == [0.5, 0.5]
    # A transfer time adds once per hop on the waiting chain: activation 1 (2 -> 2.5), gradient 1 (8.5 -> 9).
    assert model.run([Costs()] * 2, transfer_s=0.5).makespan == 13.0


class _Recorder:
    """torch.distributed as StepTransfers uses it, recording each batch_isend_irecv (NCCL-like: one work)."""

    def __init__(self):
        self.batches: list[tuple[int, tuple]] = []
        self.position = -1
        self.isend, self.irecv = "send", "recv"

    def P2POp(self, op, tensor, peer, group, tag):  # noqa: N802 - torch's name
        return op, peer, tag

    def batch_isend_irecv(self, ops):
        self.batches.append((self.position, tuple(ops)))
        return [types.SimpleNamespace(wait=lambda *a: None, is_completed=lambda: True)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_the_batches_are_the_ones_step_transfers_posts(name, monkeypatch):
    """Run StepTransfers as Pipeline.forward_backward drives it (advance, take before an action, ready for its
    outputs, advance after it) on every rank of a p=4 schedule: the batches it posts are the model's, op by op."""
    schedule = build_schedule(name, 4, 8)
    plans = CommPlan.build_all(schedule)
    spec = (TensorSpec((2,), torch.float32),)
    for rank in range(schedule.pp):
        plan = plans[rank]
        assert plan.posts == CommPlan.build(schedule, rank).posts
        fake = _Recorder()
        monkeypatch.setattr(p2p, "dist", fake)
        transfers = StepTransfers(plan, [spec] * (schedule.num_chunks - 1), None, range(schedule.pp),
                                  torch.device("cpu"), 5.0)
        transfers.advance()
        for k, action in enumerate(schedule.actions[rank]):
            if action in plan.recv_for:
                transfers.take(plan.recv_for[action])
            fake.position = k
            for msg in plan.sends_of.get(action, ()):
                transfers.ready(msg, (torch.zeros(2),))
            transfers.advance()
        transfers.finish()
        nb = schedule.num_chunks - 1
        expected = [(b.after, tuple((op, msg.dst if op == "send" else msg.src, msg.tag(nb, 0)) for op, msg in b.ops))
                    for b in posted_batches(plan, schedule.actions[rank])]
        assert fake.batches == expected, (name, rank)


def _measured_chunk_costs(run: dict, record: dict, schedule) -> list[Costs]:
    """Each chunk at its rank's measured cost per microbatch, F : B : W as the run's medians (fitted_costs_s, per
    1F1B stage). A rank's busy time is (1 - its bubble) x the recorded makespan; only the ratios between ranks
    matter below (bubbles do not change when every time is scaled), so the makespan is set by the middle ranks,
    taken to run m x the medians."""
    c = record["fitted_costs_s"]
    per = c["forward"] + c["backward_input"] + c["backward_weight"]
    busy = [1 - b for b in record["measured_bubble_rates"]]
    middle = (busy[1] + busy[2]) / 2
    frac = schedule.placement.chunk_fraction()
    return [Costs(*(c[k] * frac * busy[schedule.rank_of(ch)] / middle
                    for k in ("forward", "backward_input", "backward_weight"))) for ch in range(schedule.num_chunks)]


def test_with_the_measured_costs_the_model_gives_the_measured_bubbles():
    """All 18 effdist rows of the 4x H200 runs: every rank's bubble within 0.06 of the recorded one (simulate: the
    overall bubble below the measured one in every row, by 0.05-0.25)."""
    rows = 0
    for path in RUNS:
        run = json.loads(path.read_text())
        nbytes = 2 * run["micro_batch"] * run["seq_length"] * run["hidden_size"]
        transfer = nbytes / 150e9 + 2e-5  # calibration.DEFAULT_LINKS: the run's links were not measured
        for record in (r for r in run["results"] if r["engine"] == "effdist"):
            schedule = build_schedule(record["schedule"], run["pp"], run["microbatches"], chunks_per_rank=2)
            costs = _measured_chunk_costs(run, record, schedule)
            timing = ExecutorModel(schedule).run(costs, transfer)
            plain = simulate(schedule, Costs(comm=transfer), chunk_costs=costs)
            measured = record["measured_bubble_rates"]
            where = (path.name, record["schedule"])
            assert max(abs(a - b) for a, b in zip(timing.bubble_rates, measured)) < 0.06, where
            assert abs(timing.bubble_rate - record["measured_bubble_rate"]) < 0.045, where
            assert plain.bubble_rate < record["measured_bubble_rate"] - 0.02, where
            rows += 1
    assert rows == 18
