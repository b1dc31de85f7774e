"""The trunk end to end in real processes: TP=2 and DP=2 follow a single-process run of the same
global batch, resume continues exactly, and a TP=1 checkpoint loads into TP=2 (resharding)."""

from __future__ import annotations

import shutil

import pytest

from tests.launching import NO_CHECKPOINTS, in_parallel, losses, run_train

pytestmark = pytest.mark.slow

STEPS = 6
COMMON = [f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "data.seq_length=64",
          "logging.tensorboard=false", "checkpoint.interval=3", "optim.warmup_steps=2", "train.eval_interval=3",
          "train.eval_steps=1"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _common(data_cache):
    return COMMON + [f"data.cache_dir={data_cache}"]


# The vocabulary-padding test's runs: 520 tokens (their own data), 2 steps at tp=1, then step 3 at tp=2.
def _vocab_common(vocab_data):
    return COMMON + [f"data.cache_dir={vocab_data}", "model.vocab_size=520", "train.steps=2", "train.eval_interval=0",
                     "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory, data_cache):
    """The one-process runs that others start from, side by side: the single-process run every layout is compared
    with, and the vocabulary-padding test's tp=1 run. Returns their root directory."""
    root = tmp_path_factory.mktemp("first")
    in_parallel({"single": lambda: run_train(root / "single", _common(data_cache)),
                 "vocab_tp1": lambda: run_train(root / "vocab_tp1", _vocab_common(root / "vocab_data"))})
    return root


@pytest.fixture(scope="module")
def single_run(first_runs):
    return first_runs / "single"


@pytest.fixture(scope="module")
def runs(first_runs, single_run, tmp_path_factory, data_cache):
    """Every run the tests below compare with `single_run` (and the vocabulary-padding test's tp=2 run), two at
    a time: {name: (run dir, process)}. Runs whose checkpoints nothing reads skip saving (NO_CHECKPOINTS)."""
    root = tmp_path_factory.mktemp("runs")
    common = _common(data_cache)
    # The run as it was after step 3 (its metrics and its step-3 checkpoint), to resume.
    resumed = root / "resumed"
    shutil.copytree(single_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_0000006")
    (resumed / "checkpoints" / "latest").write_text("iter_0000003")
    step3 = str(single_run / "checkpoints" / "iter_0000003")
    layouts = {  # (overrides, processes, resume); one-process runs paired with two-process ones
        "tp2": (common + ["parallel.tp=2", *NO_CHECKPOINTS], 2, "auto"),
        "resumed": (common + NO_CHECKPOINTS, 1, "auto"),
        "tp2_sp": (common + ["parallel.tp=2", "parallel.sequence_parallel=true", *NO_CHECKPOINTS], 2, "auto"),
        "dp2": (common + NO_CHECKPOINTS, 2, "auto"),
        "resharded": (common + ["parallel.tp=2", *NO_CHECKPOINTS], 2, step3),
    }
    layouts["vocab_tp2"] = (_vocab_common(first_runs / "vocab_data") + ["parallel.tp=2", "train.steps=3",
                                                                         *NO_CHECKPOINTS],
                            2, str(first_runs / "vocab_tp1" / "checkpoints" / "iter_0000002"))
    jobs = {name: (lambda name=name, o=o, n=n, r=r: run_train(root / name, o, nproc=n, resume=r))
            for name, (o, n, r) in layouts.items()}
    # Two processes refused by the run directory (it holds a run; --resume none without --fresh): ends at the claim.
    refused = root / "refused"
    shutil.copytree(single_run, refused)
    jobs["refused"] = lambda: run_train(refused, common, nproc=2, resume="none", check=False)
    # Two processes that find no loadable checkpoint (rank 0 decides, every rank raises): both lost effdist.json.
    unloadable = root / "unloadable"
    shutil.copytree(single_run, unloadable)
    for name in ("iter_0000003", "iter_0000006"):
        (unloadable / "checkpoints" / name / "effdist.json").unlink()
    jobs["unloadable"] = lambda: run_train(unloadable, common, nproc=2, check=False)

    def zero1_then_back_to_one_process():
        zero1 = run_train(root / "zero1", common + ["optim.distributed_optimizer=true"], nproc=2)
        return zero1, run_train(root / "zero1_to_single", common + NO_CHECKPOINTS,
                                resume=str(root / "zero1" / "checkpoints" / "iter_0000003"))

    jobs = {"zero1": zero1_then_back_to_one_process, **jobs}
    out = {name: (root / name, proc) for name, proc in in_parallel(jobs).items()}
    zero1, back = out["zero1"][1]
    out["zero1"], out["zero1_to_single"] = (root / "zero1", zero1), (root / "zero1_to_single", back)
    return out


def test_a_refusal_every_rank_shares_is_said_once(runs):
    """Rank 0 finds the run directory holds a run, or no loadable checkpoint, and every rank stops on it: one line,
    not one per rank (the launch's two processes are one node)."""
    _, proc = runs["refused"]
    # Plain torchrun ends with its own ChildFailedError traceback for a worker's exit 2; none comes from effdist.
    assert proc.returncode != 0 and 'effdist/train' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("already holds a run") == 1, proc.stderr[-3000:]
    assert "effdist: error (rank 0): --resume none: run directory" in proc.stderr, proc.stderr[-3000:]
    _, proc = runs["unloadable"]
    assert proc.returncode != 0 and 'effdist/train' not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("none loadable") == 1, proc.stderr[-3000:]
    assert "effdist: error (rank 0): --resume auto: 2 checkpoint(s)" in proc.stderr, proc.stderr[-3000:]


def _assert_same(a: dict[int, float], b: dict[int, float], steps, rel=2e-5):
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=rel), f"step {s}: {a[s]} vs {b[s]}"


def test_single_process_trains_and_checkpoints(single_run):
    ls = losses(single_run)
    assert sorted(ls) == list(range(1, STEPS + 1))
    assert ls[STEPS] < ls[1], "loss did not fall"
    assert (single_run / "config.yaml").is_file()
    names = sorted(p.name for p in (single_run / "checkpoints").iterdir())
    assert "iter_0000003" in names and "iter_0000006" in names and "latest" in names
    assert not any(n.endswith(".tmp") for n in names)


def test_resume_continues_exactly(single_run, runs):
    run, _ = runs["resumed"]
    _assert_same(losses(run), losses(single_run), range(1, STEPS + 1), rel=1e-6)


def test_tp2_and_dp2_match_single_process(single_run, runs):
    _assert_same(losses(runs["tp2"][0]), losses(single_run), range(1, STEPS + 1))
    # Sequence parallelism: norm-weight gradients are partial per rank and must be summed over TP.
    _assert_same(losses(runs["tp2_sp"][0]), losses(single_run), range(1, STEPS + 1))
    dp2, _ = runs["dp2"]
    _assert_same(losses(dp2), losses(single_run), range(1, STEPS + 1))
    # Validation loss (every 3 steps) is the same mean over the same held-out batches however split.
    _assert_same(losses(dp2, "val_loss"), losses(single_run, "val_loss"), (3, 6))


def test_tp1_checkpoint_loads_into_tp2(single_run, runs):
    run, proc = runs["resharded"]
    assert "resharded from tp=1" in proc.stderr
    ls = losses(run)
    _assert_same(ls, losses(single_run), range(4, STEPS + 1))


def test_distributed_optimizer_dp2_matches_and_reshards_to_dp1(single_run, runs):
    """ZeRO-1 (optimizer state sharded over DP=2) follows the single process, and its checkpoint,
    whose optimizer state each rank saved only for the weights it owns, resumes in one process."""
    zero, _ = runs["zero1"]
    _assert_same(losses(zero), losses(single_run), range(1, STEPS + 1))

    back, proc = runs["zero1_to_single"]
    assert "resharded from tp=1 pp=1 dp=2" in proc.stderr
    _assert_same(losses(back), losses(single_run), range(4, STEPS + 1))


def test_resharding_that_changes_the_vocabulary_padding_says_the_loss_moves(runs):
    """520 tokens pad to 576 rows at tp=1 and to 640 at tp=2: megatron's padded logits are not masked, so the loss
    of the resharded run jumps (by about ln(584/520) here). It used to do so without a word."""
    run, proc = runs["vocab_tp2"]
    warned = [line for line in proc.stderr.splitlines() if "was trained with parallel.tp=1, which pads" in line]
    assert len(warned) == 1, proc.stderr[-3000:]
    assert "model.vocab_size=520 to 576 output rows; parallel.tp=2 pads it to 640" in warned[0], warned
    assert sorted(losses(run)) == [3], proc.stderr[-3000:]
