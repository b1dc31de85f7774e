"""train.engine = deepspeed.

Without DeepSpeed installed (CI): the install hint, the config errors and the derived DeepSpeed config.
With it: 2 gloo ranks on the tiny model with EPAS and the ELAS sparse FFN, where ZeRO-1 and ZeRO-2
follow the default engine (losses, gradient norms and validation losses within a relative 1e-5; measured
differences are about 1e-7, from DeepSpeed's fp32 gradient norm), EPAS's frozen Wq/Wk rows stay
frozen in DeepSpeed's fp32 masters, and a ZeRO-2 run resumed from its step-3 checkpoint repeats the
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch

from effdist.config import ConfigError, load_config, validate
from tests.launching import TINY, in_parallel, losses, run_train

STEPS = 6
COMMON = [f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "data.seq_length=64",
          "logging.tensorboard=false", "logging.progress_bar=false", "checkpoint.interval=3", "optim.warmup_steps=2",
          # EPAS grows its region at steps 1, 3, 5; ELAS switches to 2:4 sparsity after step 2.
          "epas.enabled=true", "epas.start_step=1", "epas.interval=2", "epas.final_region=3",
          "ffn.kind=elas", "ffn.elas_warmup_steps=2", "train.eval_interval=3", "train.eval_steps=1"]
REL = 1e-5


# ---------------------------------------------------------------------- no DeepSpeed needed

def test_missing_deepspeed_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now fails as if not installed
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.engine=deepspeed"])
    message = str(err.value)
    assert message.startswith("train.engine = 'deepspeed'")
    assert 'pip install -e ".[deepspeed]"' in message
    assert "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed" in message
    # The default engine never needs it.
    load_config(TINY, ["deepspeed.zero_stage=3"])


@pytest.mark.parametrize("overrides, field, words", [
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage", "valid: 0, 1, 2, 3"),
    (["parallel.pp=2", "deepspeed.zero_stage=2"], "parallel.pp", "ZeRO-2 and ZeRO-3 are incompatible with pipeline"),
    (["parallel.pp=2", "deepspeed.zero_stage=3"], "parallel.pp", "ZeRO-2 and ZeRO-3 are incompatible with pipeline"),
    (["parallel.pp=2", "deepspeed.zero_stage=1"], "parallel.pp", "use parallel.pp=1"),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel", "partial gradients"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_params=true"], "deepspeed.offload_params", "zero_stage=3"),
    (["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer", ">= 1"),
    (["deepspeed.zero_stage=3", "epas.enabled=true"], "epas.enabled", "zero_stage 1 or 2"),
    (["deepspeed.zero_stage=0", "epas.enabled=true"], "epas.enabled", "zero_stage 1 or 2"),
    (["checkpoint.async_save=true"], "checkpoint.async_save", "synchronously"),
    (["optim.distributed_optimizer=true"], "optim.distributed_optimizer", "deepspeed.zero_stage"),
    (["deepspeed.config_file=/nonexistent/ds.json"], "deepspeed.config_file", "no such file"),
])
def test_config_errors_name_the_field(monkeypatch, overrides, field, words):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # these are reported before the installation check
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.engine=deepspeed", *overrides])
    assert str(err.value).startswith(field) and words in str(err.value), str(err.value)


def _cfg(*overrides):
    cfg = load_config(TINY, ["train.global_batch=8", "train.micro_batch=2", *overrides])
    validate(cfg, world_size=2)
    return cfg


def test_deepspeed_config_follows_the_effdist_config():
    from effdist.train.deepspeed_engine import deepspeed_config

    cfg = _cfg("optim.clip_grad=0.5", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
               "deepspeed.offload_params=true")
    ds = deepspeed_config(cfg, dp=2, dtype=torch.float32, is_cuda=False)
    batch_keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    assert tuple(ds[k] for k in batch_keys) == (8, 2, 2)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and "data_types" not in ds
    assert ds["zero_force_ds_cpu_optimizer"] is False  # nothing to offload to on a CPU machine

    gpu = deepspeed_config(_cfg("deepspeed.zero_stage=1"), dp=1, dtype=torch.bfloat16, is_cuda=True)
    assert gpu["bf16"]["enabled"] and gpu["data_types"] == {"grad_accum_dtype": "fp32"}
    assert gpu["gradient_accumulation_steps"] == 4 and "offload_optimizer" not in gpu["zero_optimization"]
    # fp32 accumulation of bf16 gradients: DeepSpeed refuses it without ZeRO and ignores it at stages 2-3.
    for stage in (0, 2):
        bf16 = deepspeed_config(_cfg(f"deepspeed.zero_stage={stage}"), dp=1, dtype=torch.bfloat16, is_cuda=True)
        assert "data_types" not in bf16


def test_config_file_merges_but_may_not_contradict(tmp_path):
    from effdist.train.deepspeed_engine import deepspeed_config

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "train_batch_size": 8}))
    ds = deepspeed_config(_cfg("deepspeed.zero_stage=2", f"deepspeed.config_file={extra}"), dp=2,
                          dtype=torch.float32, is_cuda=False)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 12345}

    for body, words in [({"train_batch_size": 64}, "train.global_batch"),
                        ({"gradient_clipping": 5.0}, "optim.clip_grad"),
                        ({"optimizer": {"type": "Adam"}}, "AdamW"),
                        ({"zero_optimization": {"stage": 3}}, "deepspeed.zero_stage")]:
        extra.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=words):
            deepspeed_config(_cfg(f"deepspeed.config_file={extra}"), dp=2, dtype=torch.float32, is_cuda=False)


def test_config_file_contradictions_are_refused_before_start(tmp_path):
    """The file is checked with the config, before any process group starts (and by --dry-run): a contradiction is
    not found only once the trainer has started and written config.yaml and the data into the run directory."""
    from effdist.train.deepspeed_engine import check_config_file

    extra = tmp_path / "ds.json"
    cfg = lambda: load_config(TINY, ["train.engine=deepspeed", "train.global_batch=8", "train.micro_batch=2",  # noqa: E731
                                     f"deepspeed.config_file={extra}"])
    for body, words in [({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3, but deepspeed.zero_stage=1"),
                        ({"optimizer": {"type": "Adam"}}, "optimizer"), ("{oops", "cannot read it as JSON")]:
        extra.write_text(body if isinstance(body, str) else json.dumps(body))
        with pytest.raises(ConfigError, match=words):
            check_config_file(cfg())
    extra.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    check_config_file(cfg())  # the accumulation steps need the world size: 8 / (2 x 1) = 4 ...
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4"):
        check_config_file(cfg(), world_size=2)  # ... and 8 / (2 x 2) = 2
    pytest.importorskip("deepspeed")
    from effdist.train.preflight import validate_run
    from effdist.train.trainer import main as train_main

    extra.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        validate_run(cfg())
    assert train_main(["--config", str(TINY), "--set", "train.engine=deepspeed", "--set",
                       f"deepspeed.config_file={extra}", "--dry-run"]) == 2


def test_init_from_a_deepspeed_checkpoint_names_the_engine(tmp_path):
    """checkpoint.init_from at a DeepSpeed-engine checkpoint: said so, with the way that works (resume it under
    train.engine=deepspeed), not "convert HF weights with effdist convert"."""
    from effdist.train import checkpoint as ckpt

    path = tmp_path / "run" / "checkpoints" / "iter_0000003"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"")
    (path / ckpt.MARKER).write_text(json.dumps({"engine": "deepspeed", "zero_stage": 1, "step": 3, "files": {}}))
    with pytest.raises(ckpt.CheckpointError, match="is a checkpoint of the deepspeed engine.*train.engine=deepspeed "
                                                   "and --resume"):
        ckpt.load_model_only(tmp_path / "run", [], {})


def test_generate_and_convert_refuse_a_deepspeed_checkpoint_in_one_line(tmp_path, capsys):
    """DeepSpeed's shards are no megatron dist checkpoint: both commands say which engine wrote it (exit 2)
    instead of megatron's traceback "is not a distributed checkpoint"."""
    from effdist.infer.generate import GenerationError, read_checkpoint_info
    from effdist.infer.generate import main as generate
    from effdist.train import checkpoint as ckpt
    from effdist.train.convert import main as convert

    path = tmp_path / "run" / "checkpoints" / "iter_0000003"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"")
    config = load_config(TINY, ["train.engine=deepspeed"]).to_dict()
    (path / ckpt.MARKER).write_text(json.dumps({"engine": "deepspeed", "step": 3, "config": config, "files": {}}))
    with pytest.raises(GenerationError, match="is a checkpoint of the deepspeed engine"):
        read_checkpoint_info(tmp_path / "run")
    assert generate(["--checkpoint", str(tmp_path / "run"), "--prompt-ids", "1,2"]) == 2
    assert convert(["to-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("is a checkpoint of the deepspeed engine") == 2 and "Traceback" not in err, err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------- with DeepSpeed, 2 gloo ranks

def test_hostfile_reader_agrees_with_deepspeed():
    pytest.importorskip("deepspeed")
    from deepspeed.launcher.runner import _parse_hostfile

    from launch.hostfile import parse_hostfile

    text = "# two nodes\nworker-1 slots=8\n\n  worker-2 slots=4   # the small one\n10.0.0.7 slots=2\n"
    ours = [(h.name, h.slots) for h in parse_hostfile(text)]
    assert ours == list(_parse_hostfile(text.splitlines()).items())


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _run(run_dir, data_cache, *extra, **kw):
    return run_train(run_dir, COMMON + [f"data.cache_dir={data_cache}", *extra], nproc=2, **kw)


def _metric(run_dir, key):
    with open(run_dir / "metrics.jsonl") as f:
        return {rec["step"]: rec.get(key) for rec in map(json.loads, f)}


def _assert_close(a: dict, b: dict, rel=REL):
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=rel), f"step {s}: {a[s]} vs {b[s]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """Every DeepSpeed-engine run, two at a time: {name: (run dir, process)}. The default engine's and ZeRO-2's
    runs come first; the resumed ZeRO-2 run and the engine switch start from copies of their checkpoints."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("engines")
    first = {
        # Its step-6 checkpoint is what the engine switch finds; nothing reads a step-3 one.
        "megatron": lambda: _run(root / "megatron", data_cache, "checkpoint.interval=0"),
        "zero2": lambda: _run(root / "zero2", data_cache, "train.engine=deepspeed", "deepspeed.zero_stage=2"),
    }
    out = {name: (root / name, proc) for name, proc in in_parallel(first).items()}
    resumed, switched = root / "resumed", root / "switched"
    shutil.copytree(root / "zero2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_0000006")
    (resumed / "checkpoints" / "latest").write_text("iter_0000003")
    shutil.copytree(root / "megatron", switched)
    second = {
        "zero1": lambda: _run(root / "zero1", data_cache, "train.engine=deepspeed", "deepspeed.zero_stage=1",
                              "checkpoint.interval=0", "checkpoint.save_at_end=false"),
        # Saves only its final checkpoint, which the test compares with the uninterrupted run's.
        "resumed": lambda: _run(resumed, data_cache, "train.engine=deepspeed", "deepspeed.zero_stage=2",
                                "checkpoint.interval=0"),
        "switched": lambda: _run(switched, data_cache, "train.engine=deepspeed", check=False),
    }
    out.update({name: (root / name, proc) for name, proc in in_parallel(second).items()})
    return out


@pytest.fixture(scope="module")
def default_engine_run(runs):
    return runs["megatron"][0]


@pytest.fixture(scope="module")
def zero2_run(runs):
    return runs["zero2"][0]


@pytest.mark.slow
def test_zero1_follows_the_default_engine(default_engine_run, runs):
    run, proc = runs["zero1"]
    assert "under DeepSpeed ZeRO-1" in proc.stderr
    _assert_close(losses(run), losses(default_engine_run))
    _assert_close(_metric(run, "grad_norm"), _metric(default_engine_run, "grad_norm"))
    assert _metric(run, "epas_region") == _metric(default_engine_run, "epas_region")
    validation = {s: v for s, v in _metric(run, "val_loss").items() if v is not None}
    assert sorted(validation) == [3, 6]
    for s, v in validation.items():
        assert v == pytest.approx(_metric(default_engine_run, "val_loss")[s], rel=REL)


@pytest.mark.slow
def test_zero2_follows_the_default_engine_and_keeps_epas_rows(zero2_run, default_engine_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from effdist.model.shared_qk import qkv_row_blocks

    _assert_close(losses(zero2_run), losses(default_engine_run))
    _assert_close(_metric(zero2_run, "grad_norm"), _metric(default_engine_run, "grad_norm"))
    ckpts = zero2_run / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_0000006"
    marker = json.loads((ckpts / "iter_0000006" / "effdist.json").read_text())
    assert (marker["engine"], marker["zero_stage"], marker["dp"]) == ("deepspeed", 2, 2)
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())

    # Layer 3 shares Q/K from step 1 on: its Wq/Wk rows in the fp32 masters (reassembled from the ZeRO
    # shards) are the same at step 3 and step 6, while its V rows and other layers trained.
    masters = {t: get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag=t) for t in ("iter_0000003", "iter_0000006")}
    key = "decoder.layers.{}.self_attention.linear_qkv.weight"
    groups, heads_per_group, head_dim = 2, 2, 16  # configs/tiny-cpu.yaml: 4 heads, 2 query groups, hidden 64
    before, after = (qkv_row_blocks(masters[t][key.format(3)], groups, heads_per_group, head_dim)
                     for t in ("iter_0000003", "iter_0000006"))
    assert torch.equal(before[:, :heads_per_group + 1], after[:, :heads_per_group + 1])
    assert not torch.equal(before[:, heads_per_group + 1:], after[:, heads_per_group + 1:])
    assert not torch.equal(masters["iter_0000003"][key.format(0)], masters["iter_0000006"][key.format(0)])


@pytest.mark.slow
def test_zero2_resume_continues_exactly(zero2_run, runs):
    run, proc = runs["resumed"]
    assert "resumed from" in proc.stderr and "at step 3" in proc.stderr
    assert losses(run) == losses(zero2_run)
    assert _metric(run, "grad_norm") == _metric(zero2_run, "grad_norm")
    # The fp32 masters at step 6 depend on the Adam state carried over at step 3.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    resumed, uninterrupted = (get_fp32_state_dict_from_zero_checkpoint(str(r / "checkpoints"), tag="iter_0000006")
                              for r in (run, zero2_run))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.slow
def test_checkpoints_of_the_other_engine_are_refused_clearly(runs):
    _, proc = runs["switched"]
    # A worker exits 2, a usage error as for a checkpoint of another model shape (the command is to fix); stock
    # torchrun, which started them here, exits 1 for any failure, reports the workers' codes and SIGTERMs the
    # ones still running after the first exit: no worker failed otherwise.
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert proc.returncode == 1 and "2" in codes and all(c in ("2", "-15") for c in codes), proc.stderr[-3000:]
    assert "was written by the megatron engine" in proc.stderr and "checkpoint.init_from=" in proc.stderr
