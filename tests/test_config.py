"""Config loading, overrides and validation: every invalid value names its field and the fix."""

from pathlib import Path

import pytest

from effdist.config import Config, ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load_and_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml",
                      ["train.steps=7", "optim.lr=1e-3", "parallel.sequence_parallel=false", "ffn.layers=[1,2]",
                       "model.num_query_groups=null", "data.weights=[0.5]", "data.paths=[a]", "data.kind=indexed"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.ffn.layers == [1, 2]
    assert cfg.model.num_query_groups is None


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["train.steps=9"])
    p = tmp_path / "config.yaml"
    p.write_text(cfg.to_yaml())
    again = load_config(p)
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, field, hint", [
    ("model.num_attention_heads=3", "model.hidden_size", "divisible by model.num_attention_heads"),
    ("parallel.tp=3", "parallel.tp", "must divide model.num_attention_heads"),
    ("model.num_query_groups=3", "model.num_query_groups", "must divide"),
    ("data.seq_length=1024", "data.seq_length", "max_position_embeddings"),
    ("train.global_batch=10", "train.global_batch", "multiple of train.micro_batch"),
    ("train.steps=0", "train.steps", "positive"),
    ("optim.min_lr=1.0", "optim.min_lr", "[0, optim.lr"),
    ("optim.decay=exp", "optim.decay", "cosine, linear, constant"),
    ("pipeline.schedule=gpipe", "pipeline.schedule", "1f1b"),
    ("parallel.device=tpu", "parallel.device", "auto, cuda, cpu"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel", "tp > 1"),
    ("ffn.kind=moe", "ffn.kind", "swiglu"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last", "newest checkpoint"),
    ("data.kind=indexed", "data.paths", "at least one dataset prefix"),
    ("epas.enabled=true", None, None),  # valid: defaults give a valid EPAS setup
    ("epas.final_region=4", "epas.final_region", "num_layers-1"),
    ("epas.interval=0", "epas.interval", "positive"),
    ("ffn.layers=[9]", "ffn.layers", "[0, 3]"),
    ("train.dtype=fp8", "train.dtype", "auto, fp32, bf16"),
])
def test_invalid_values_name_field_and_fix(override, field, hint):
    overrides = [override]
    if override.startswith("epas.") and override != "epas.enabled=true":
        overrides = ["epas.enabled=true", override]
    if field is None:
        load_config(ROOT / "configs/tiny-cpu.yaml", overrides)
        return
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny-cpu.yaml", overrides)
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert hint in msg, msg


def test_world_size_checks():
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["parallel.tp=2"])
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        validate(cfg, world_size=3)
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["train.global_batch=12", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match="micro_batch\\*data_parallel"):
        validate(cfg, world_size=2)


def test_unknown_keys_and_bad_types_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="train.steps = 'many': expected an integer"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="'model' is a section"):
        load_config(bad)


def test_defaults_are_valid():
    validate(Config())
