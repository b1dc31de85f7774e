"""`effdist train --dry-run / --print-config`, `effdist presets`, and the size checks before start.

The dry run must plan without starting anything: the tests replace torch.distributed's and megatron's
initialisers with ones that fail, so a dry run that tried to start a process group would fail here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from effdist.config import Config, ConfigError, config_from_dict, load_config
from tests.launching import clean_env

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny-cpu.yaml")


@pytest.fixture
def nothing_may_start(monkeypatch):
    import torch.distributed as dist
    from megatron.core import parallel_state

    def refuse(*args, **kwargs):
        raise AssertionError("the dry run started a process group")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", refuse)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


def _train(argv, capsys):
    from effdist.train.trainer import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_dry_run_tiny_on_4_ranks_tp2_pp2(nothing_may_start, capsys):
    import torch.distributed as dist

    start = time.monotonic()
    rc, out, err = _train(["--config", TINY, "--set", "parallel.tp=2", "--set", "parallel.pp=2", "--dry-run",
                           "--world-size", "4"], capsys)
    assert rc == 0, err
    assert not dist.is_initialized()
    assert time.monotonic() - start < 30, "a dry run plans; it must not build or train anything"
    lines = out.splitlines()
    assert "4 process(es) on CPU, fp32" in lines[0]
    # What differs from the preset, and nothing else.
    assert "config: 2 key(s) differ from" in out
    assert "  parallel.tp: 1 -> 2" in lines and "  parallel.pp: 1 -> 2" in lines
    # Rank layout: megatron's order, tp fastest, then dp, then pp.
    table = lines[lines.index("  rank  tp  pp  dp") + 1:][:4]
    assert [row.split() for row in table] == [["0", "0", "0", "0"], ["1", "1", "0", "0"],
                                              ["2", "0", "1", "0"], ["3", "1", "1", "0"]]
    assert "pipeline: 1f1b, 2 stages, 2 chunks, 4 microbatches per step; bubble 20.0%" in out
    assert "  stage 0 (ranks 0,1): 1 chunk(s): layers 0-1 (2) + embedding" in lines
    assert "  stage 1 (ranks 2,3): 1 chunk(s): layers 2-3 (2) + output layer, loss" in lines
    assert "    stage 0: 0F0 0F1 0BW0 0F2 0BW1 0F3 0BW2 0BW3" in lines
    # Per-rank memory per stage; stage 0 holds more activations (1F1B keeps 2 microbatches in flight there).
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stage", "params"])
    rows = {int(r.split()[0]): r.split() for r in lines[header + 1:header + 3]}
    assert float(rows[0][5]) == pytest.approx(2 * float(rows[1][5]), rel=1e-6)
    assert rows[0][6] == "0" and float(rows[1][6]) > 0  # the logits live on the last stage
    assert "limit: " in out and "x 4 ranks on this host" in out
    assert lines[-1] == "dry run: the config is valid and fits; nothing was started"


def test_dry_run_without_world_size_plans_tp_times_pp(nothing_may_start, capsys):
    rc, out, err = _train(["--config", TINY, "--set", "parallel.tp=2", "--dry-run"], capsys)
    assert rc == 0, err
    assert "2 process(es)" in out and "layout: tp=2 pp=1 dp=1" in out and "pipeline: none" in out


def test_dry_run_interleaved_and_zero1(nothing_may_start, capsys):
    rc, out, err = _train(["--config", TINY, "--set", "parallel.pp=2", "--set", "pipeline.schedule=interleaved",
                           "--set", "optim.distributed_optimizer=true", "--dry-run", "--nproc", "4"], capsys)
    assert rc == 0, err
    assert "  stage 0 (ranks 0,1): 2 chunk(s): layers 0 (1), layers 2 (1) + embedding" in out.splitlines()
    assert "optimizer sharded over dp=2 (ZeRO-1)" in out


def test_dry_run_names_an_invalid_world_size(nothing_may_start, capsys):
    rc, out, err = _train(["--config", TINY, "--set", "parallel.tp=2", "--dry-run", "--world-size", "3"], capsys)
    assert rc == 2
    assert err.strip().splitlines() == [
        "effdist: config error: parallel.tp = 2: tp*pp = 2 must divide the number of processes (3)"]


@pytest.mark.parametrize("n", ["0", "-2"])
def test_dry_run_names_a_world_size_below_one(n, nothing_may_start, capsys):
    # --world-size 0 used to plan for the default (tp x pp processes) and say the config was valid
    rc, out, err = _train(["--config", TINY, "--dry-run", "--world-size", n], capsys)
    assert rc == 2, err
    assert err.strip() == f"effdist: config error: --world-size {n}: must be a positive number of processes", err


def test_world_size_without_dry_run_is_refused_not_ignored(nothing_may_start, capsys):
    """--nproc 2 used to train one process silently: the flag only sizes a dry run."""
    from effdist.train.trainer import main

    with pytest.raises(SystemExit) as stop:
        main(["--config", TINY, "--nproc", "2"])
    assert stop.value.code == 2
    assert "--world-size/--nproc 2 only sizes a --dry-run; to train with 2 processes start them with launch/run.sh 2" \
        in capsys.readouterr().err


def test_print_config_round_trips(nothing_may_start, capsys, tmp_path):
    rc, out, err = _train(["--config", TINY, "--set", "train.steps=9", "--set", "ffn.kind=elas",
                           "--print-config"], capsys)
    assert rc == 0, err
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    again = load_config(path)
    expected = load_config(TINY, ["train.steps=9", "ffn.kind=elas"])
    assert again.to_dict() == expected.to_dict()
    assert again.train.steps == 9 and again.ffn.kind == "elas"


def test_presets_lists_every_config_with_its_size_and_purpose(capsys):
    from effdist.train.estimate import total_parameters
    from effdist.train.presets import main

    assert main([]) == 0
    out = capsys.readouterr().out
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        line = next((x for x in out.splitlines() if x.split()[:1] == [path.stem]), None)
        assert line is not None, f"{path.stem} missing from:\n{out}"
        assert len(line.split(None, 4)[4]) > 20, f"no purpose for {path.stem}: {line}"
    tiny = next(x for x in out.splitlines() if x.startswith("tiny-cpu"))
    assert tiny.split()[1] == f"{total_parameters(load_config(TINY)) / 1e3:.0f}K" == "250K"


def test_presets_from_another_directory_name_where_they_are_and_how_to_use_them(capsys, tmp_path, monkeypatch):
    """Run outside the checkout, the closing line said '5 presets in ../../work/x/configs; ... --config
    ../../work/x/configs/NAME.yaml'; it names the directory absolute, and a shipped preset by its name."""
    from effdist.train.presets import main

    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"presets in {(ROOT / 'configs').resolve()}; see one's plan with `effdist train --config NAME "
                         "--dry-run`"), last
    own = tmp_path / "mine"
    own.mkdir()
    (own / "a.yaml").write_text((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    assert main(["--dir", str(own)]) == 0
    assert capsys.readouterr().out.strip().endswith("1 preset in mine; see one's plan with `effdist train --config "
                                                     "mine/NAME.yaml --dry-run`")


@pytest.mark.parametrize("overrides", [
    [],
    ["ffn.kind=elas", "ffn.elas_rank=16"],
    ["ffn.kind=topk", "ffn.layers=[1,2]"],
    ["ffn.kind=moc", "model.num_query_groups=null", "model.tie_embeddings=true"],
    ["model.vocab_size=500", "model.make_vocab_size_divisible_by=128"],
])
def test_parameter_count_matches_the_built_model(megatron_one_process, overrides):
    import torch

    from effdist.model.gpt import build_gpt, count_parameters
    from effdist.train.estimate import total_parameters

    cfg = load_config(TINY, overrides + ["train.fused_kernels=false"])
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    assert total_parameters(cfg) == count_parameters(model)


@pytest.mark.parametrize("tp, pp, dp", [(2, 2, 1), (2, 1, 3), (1, 4, 2), (2, 2, 2)])
def test_rank_layout_is_megatrons(tp, pp, dp):
    from megatron.core.parallel_state import RankGenerator

    from effdist.train.estimate import rank_layout

    cfg = Config()
    cfg.parallel.tp, cfg.parallel.pp = tp, pp
    layout = rank_layout(cfg, tp * pp * dp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for kind in ("tp", "pp", "dp"):
        for group in gen.get_ranks(kind):
            assert [getattr(layout[r], kind) for r in group] == list(range(len(group))), (kind, group)


# ---------------------------------------------------------------------- sizes refused before start

def test_memory_between_the_estimate_and_its_margin_warns_beyond_it_refuses():
    from effdist.train.dry_run import report
    from effdist.train.estimate import GIB, MemoryLimit, check_fits, estimate, fits

    cfg = load_config(TINY)
    est = estimate(cfg, 1, on_gpu=False)
    total = est.peak.total
    roomy = MemoryLimit(2 * total, "test memory", 1)
    tight = MemoryLimit(0.75 * total, "test memory", 1)  # exceeded, but within the 2x margin
    tiny = MemoryLimit(0.4 * total, "test memory", 1)
    assert fits(est, roomy) and fits(est, tight) and not fits(est, tiny)
    assert "warning: the estimate exceeds the memory" in report(cfg, 1, est, tight, "tiny", [])
    assert "warning" not in report(cfg, 1, est, roomy, "tiny", [])
    check_fits(cfg, 1, on_gpu=False, limit=tight)
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, 1, on_gpu=False, limit=tiny)
    assert f"far more than the {0.4 * total / GIB:.1f} GiB of test memory" in str(e.value)
    # Four ranks of one host share its memory.
    with pytest.raises(ConfigError, match="x 4 ranks on this host"):
        check_fits(cfg, 4, on_gpu=False, limit=MemoryLimit(1.5 * total, "test memory", 4))


def test_token_count_beyond_int64_is_named():
    from effdist.train.estimate import check_fits

    cfg = config_from_dict(yaml.safe_load(Path(TINY).read_text()))
    cfg.train.steps = 2**60
    with pytest.raises(ConfigError, match=r"^train\.steps = 1152921504606846976: .* overflow a 64-bit counter"):
        check_fits(cfg, 1, on_gpu=False)


ABSURD = {
    "train.global_batch=train.micro_batch=10^8": (["train.global_batch=100000000", "train.micro_batch=100000000"],
                                                  "train.micro_batch = 100000000: the estimated memory"),
    "train.steps=10^12": (["train.steps=1000000000000"],
                          "train.steps = 1000000000000: megatron's dataset index for train.steps x train.global_batch"),
    "model.hidden_size=2^20": (["model.hidden_size=1048576"], "model.hidden_size = 1048576: the estimated memory"),
    "data.seq_length=10^8": (["data.seq_length=100000000", "model.max_position_embeddings=100000000"],
                             "data.seq_length = 100000000: the estimated memory"),
}

_START_EACH = """
import sys, time
from effdist.train.trainer import main
for name, overrides in {cases!r}:
    t = time.monotonic()
    rc = main(["--config", {tiny!r}, "--run-dir", {run_dir!r}] + [a for o in overrides for a in ("--set", o)])
    print(f"CASE {{name}} rc={{rc}} s={{time.monotonic() - t:.1f}}", file=sys.stderr, flush=True)
"""


def test_absurd_sizes_are_named_before_start(tmp_path):
    """Real starts (one interpreter for all cases): exit 2, one named line each, nothing created, in seconds."""
    run_dir = tmp_path / "run"
    script = _START_EACH.format(cases=[(k, v[0]) for k, v in ABSURD.items()], tiny=TINY, run_dir=str(run_dir))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=240)
    lines = [x for x in proc.stderr.splitlines() if x.startswith(("effdist:", "CASE", "[effdist]"))]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (_, message) in ABSURD.items():
        case = next(i for i, x in enumerate(lines) if x.startswith(f"CASE {name} "))
        assert "rc=2" in lines[case], lines
        assert lines[case - 1].startswith(f"effdist: config error: {message}"), lines
        assert float(lines[case].rsplit(" s=", 1)[1]) < 60
    assert len(lines) == 2 * len(ABSURD), lines
    assert not run_dir.exists()


def test_dry_run_of_an_absurd_size_prints_the_plan_and_exits_2(nothing_may_start, capsys):
    rc, out, err = _train(["--config", TINY, "--set", "train.micro_batch=100000000",
                           "--set", "train.global_batch=100000000", "--dry-run"], capsys)
    assert rc == 2
    assert "memory per rank, estimated in GiB" in out
    assert err.strip().splitlines()[-1].startswith("effdist: config error: train.micro_batch = 100000000: ")


def test_gpu_limit_is_one_gpus_memory_per_rank(monkeypatch):
    """On a GPU (faked here) each rank has the device's memory: llama-1b fits an 80 GiB GPU, llama-7b's weights,
    gradients and Adam state alone do not (without tp/pp or ZeRO)."""
    import torch

    from effdist.train.estimate import GIB, check_fits, memory_limit

    class Props:
        name, total_memory = "Fake 80GB", 80 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    one_b = load_config(ROOT / "configs/llama-1b.yaml", ["parallel.device=cuda"])
    limit = memory_limit(one_b, 8, on_gpu=True)
    assert (limit.bytes, limit.ranks_sharing, limit.what) == (80 * GIB, 1, "GPU memory (Fake 80GB)")
    est = check_fits(one_b, 8)
    assert 30 * GIB < est.peak.total < 40 * GIB  # measured: 35.6 GiB (docs/benchmarks.md)
    seven_b = load_config(ROOT / "configs/llama-7b.yaml", ["parallel.device=cuda"])
    with pytest.raises(ConfigError, match=r"^model\.hidden_size = 4096: .* of GPU memory \(Fake 80GB\); lower "
                                          r"model\.hidden_size, or spread the model with parallel\.tp / parallel\.pp"):
        check_fits(seven_b, 8)
    # ... which pipeline parallelism with ZeRO-1 fixes.
    check_fits(load_config(ROOT / "configs/llama-7b.yaml", ["parallel.device=cuda", "parallel.pp=4",
                                                            "optim.distributed_optimizer=true"]), 32)
