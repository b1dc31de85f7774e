"""effdist.train.preflight.validate_run: the checks that need the pipeline's or the model's knowledge run
there (config.py imports nothing from effdist), with the same one-line messages and exit code 2 as when
config.validate ran them."""

from __future__ import annotations

from pathlib import Path

import pytest

from effdist.config import ConfigError, load_config
from effdist.train.preflight import validate_run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny-cpu.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["train.fused_kernels=[rope,ropes]"],
     "train.fused_kernels = ['rope', 'ropes']: unknown ropes; expected true, false or a list of rmsnorm, rope, "
     "swiglu, loss, wgrad"),
    (["parallel.pp=2", "model.tie_embeddings=true"],
     "model.tie_embeddings = True: with parallel.pp > 1 the embedding and the output layer live in different model "
     "chunks, which effdist's pipeline does not synchronise; set model.tie_embeddings=false or parallel.pp=1"),
    (["parallel.pp=2", "pipeline.schedule=v-zb", "model.num_layers=3"],
     "model.num_layers = 3: pipeline.schedule=v-zb with parallel.pp=2 splits the model into 4 chunks; it needs at "
     "least that many layers"),
    (["parallel.pp=2", "pipeline.schedule=interleaved", "pipeline.chunks_per_rank=3", "model.num_layers=5"],
     "model.num_layers = 5: pipeline.schedule=interleaved with parallel.pp=2 splits the model into 6 chunks"),
])
def test_run_checks_name_the_field(overrides, message):
    cfg = load_config(TINY, overrides)  # the config's own checks pass: these need the pipeline or the model
    with pytest.raises(ConfigError) as e:
        validate_run(cfg)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_enough_layers_for_every_chunk_passes():
    validate_run(load_config(TINY, ["parallel.pp=2", "pipeline.schedule=v-zb", "model.num_layers=4",
                                    "model.tie_embeddings=false"]), world_size=2)
    validate_run(load_config(TINY, ["train.fused_kernels=[rope,loss]"]), world_size=1)


def test_missing_executor_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "effdist.pipeline.executor" else real(name, *a))
    cfg = load_config(TINY, ["parallel.pp=2", "model.tie_embeddings=false"])
    with pytest.raises(ConfigError, match=r"^parallel\.pp = 2: pipeline parallelism is not available in this build"):
        validate_run(cfg)
    validate_run(load_config(TINY))  # pp=1 never needs it


def test_world_size_checks_still_run():
    cfg = load_config(TINY, ["parallel.tp=2"])
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        validate_run(cfg, world_size=3)


@pytest.mark.parametrize("flag", ["--dry-run", "--print-config"])
def test_train_and_dry_run_exit_2_on_a_run_check(flag, capsys, monkeypatch):
    from effdist.train.trainer import main

    for var in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    argv = ["--config", TINY, "--set", "parallel.pp=2", "--set", "model.tie_embeddings=true"]
    for extra in ([flag], []):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("effdist: config error: model.tie_embeddings = True: with parallel.pp > 1"), err


def test_preflight_imports_neither_torch_nor_megatron():
    """The dry run checks a config in a fraction of a second: the run checks import no heavy module."""
    import subprocess
    import sys

    from tests.launching import clean_env

    code = ("import sys, effdist.train.preflight, effdist.train.dry_run\n"
            "print(sorted(m for m in ('torch', 'megatron.core', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
