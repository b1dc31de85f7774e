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
    # a lower optim.lr alone (continual pretraining) left the preset's min_lr above it: the fix is named
    ("optim.lr=1e-4", "optim.min_lr", "--set optim.min_lr=1e-05"),
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
    ("parallel.pp=2;pipeline.schedule=v-half;pipeline.chunks_per_rank=3", "pipeline.chunks_per_rank",
     "exactly 2 chunks"),  # the V schedules used to ignore it silently
])
def test_invalid_values_name_field_and_fix(override, field, hint):
    overrides = override.split(";")
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


def test_sequence_parallel_needs_a_sequence_that_tp_divides():
    # megatron's scatter to the sequence-parallel region asserts deep inside the first forward otherwise
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny-cpu.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                      "data.seq_length=127"])
    assert str(e.value).startswith("data.seq_length = 127: must be a multiple of parallel.tp=2"), str(e.value)
    load_config(ROOT / "configs/tiny-cpu.yaml", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                                 "data.seq_length=126"])


@pytest.mark.parametrize("kind", ["elas", "relu2"])
def test_an_elas_expand_that_rounds_the_ffn_width_to_zero_is_named(kind):
    # it used to pass validation and fail in the first forward with a reshape RuntimeError traceback
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny-cpu.yaml", [f"ffn.kind={kind}", "ffn.elas_expand=0.001"])
    assert str(e.value).startswith(f"ffn.elas_expand = 0.001: gives ffn.kind={kind} an FFN width of 0"), str(e.value)


def test_tp_must_divide_the_width_of_the_layers_outside_ffn_layers():
    # layers 0 and 3 keep swiglu at width 171; megatron asserted in ColumnParallelLinear on every rank otherwise
    overrides = ["ffn.kind=elas", "ffn.layers=[1,2]", "model.ffn_hidden_size=171", "parallel.tp=2"]
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny-cpu.yaml", overrides)
    assert str(e.value).startswith("parallel.tp = 2: must divide model.ffn_hidden_size=171"), str(e.value)
    load_config(ROOT / "configs/tiny-cpu.yaml", overrides[:1] + ["ffn.layers=[0,1,2,3]"] + overrides[2:])


@pytest.mark.parametrize("kind", ["topk", "moc"])
def test_a_k_above_one_must_be_a_whole_count(kind):
    # 2.5 was cut to 2 channels without a word (epas.final_region refuses the same)
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny-cpu.yaml", [f"ffn.kind={kind}", f"ffn.{kind}_k=2.5"])
    assert str(e.value).startswith(f"ffn.{kind}_k = 2.5: a count must be a whole number"), str(e.value)
    load_config(ROOT / "configs/tiny-cpu.yaml", [f"ffn.kind={kind}", f"ffn.{kind}_k=2"])
    load_config(ROOT / "configs/tiny-cpu.yaml", [f"ffn.kind={kind}", f"ffn.{kind}_k=0.25"])


def test_world_size_checks():
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["parallel.tp=2"])
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        validate(cfg, world_size=3)
    # The message names the setting that is more than 1 (it named parallel.tp = 1 for a pp=2 layout).
    for sets, world, named in ((["parallel.pp=2"], 3, "parallel.pp = 2:"),
                               (["parallel.tp=2", "parallel.pp=2"], 6, "parallel.tp*parallel.pp = 2*2:")):
        with pytest.raises(ConfigError) as e:
            validate(load_config(ROOT / "configs/tiny-cpu.yaml", sets), world_size=world)
        assert str(e.value).startswith(named), str(e.value)
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", ["train.global_batch=12", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match="micro_batch\\*data_parallel"):
        validate(cfg, world_size=2)


def test_a_config_directory_is_named_as_one():
    with pytest.raises(ConfigError, match="is a directory: give a YAML file in it"):
        load_config(ROOT / "configs")


def test_a_presets_name_loads_it_from_any_directory(tmp_path, monkeypatch):
    """`--config llama-1b` (every command that loads a config) means configs/llama-1b.yaml; a file of that name
    in the working directory still wins, and a wrong name lists the presets."""
    monkeypatch.chdir(tmp_path)
    by_name, by_path = load_config("llama-125m"), load_config(Path(__file__).parents[1] / "configs" / "llama-125m.yaml")
    assert by_name == by_path and by_name.model.num_layers == 12
    (tmp_path / "llama-125m").write_text("model:\n  num_layers: 3\n")
    assert load_config("llama-125m").model.num_layers == 3
    with pytest.raises(ConfigError, match=r"'llama-9b' does not exist.*a preset's name works too \(.*llama-1b.*tiny-cpu"):
        load_config("llama-9b")
    with pytest.raises(ConfigError, match="does not exist"):  # a path is never read as a preset's name
        load_config("sub/llama-125m")


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


# ---------------------------------------------------------------------- every numeric field has a range

def test_every_numeric_field_has_a_range_row():
    """A new int/float field (or list of them) must get a NUMERIC_RANGES row, or this fails."""
    from effdist.config import NUMERIC_RANGES, numeric_fields

    fields = numeric_fields()
    missing = sorted(set(fields) - set(NUMERIC_RANGES))
    assert not missing, f"numeric config fields without a NUMERIC_RANGES row in effdist/config.py: {missing}"
    stale = sorted(set(NUMERIC_RANGES) - set(fields))
    assert not stale, f"NUMERIC_RANGES rows for fields that do not exist: {stale}"
    # The walk reaches every section and sees Optional and list annotations.
    assert fields["model.num_query_groups"] == (int, False)
    assert fields["data.weights"] == (float, True)
    assert fields["ffn.layers"] == (int, True)
    assert fields["optim.lr"] == (float, False)
    assert "train.fused_kernels" not in fields and "optim.distributed_optimizer" not in fields


def test_the_walk_finds_numbers_in_a_new_section():
    from dataclasses import dataclass, field

    from effdist.config import numeric_fields

    @dataclass
    class Inner:
        width: int = 1
        flag: bool = False
        rate: float | None = None
        sizes: list[int] = field(default_factory=list)
        names: list[str] = field(default_factory=list)
        mixed: bool | list[str] = True

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        label: str = "x"

    assert numeric_fields(Outer) == {"inner.width": (int, False), "inner.rate": (float, False),
                                     "inner.sizes": (int, True)}


def _values_outside(rule, kind):
    """Values the rule must reject: just past each bound, non-finite floats, int64 overflow."""
    out = []
    step = 1
    if rule.low is not None:
        out.append(rule.low if not rule.low_inclusive else rule.low - step)
    if rule.high is not None:
        out.append(rule.high if not rule.high_inclusive else rule.high + step)
    elif kind is int:
        out.append(2**63)
    if kind is float:
        out += [float("nan"), float("inf"), float("-inf")]
    return out


def _yaml(value):
    if isinstance(value, float) and value != value:
        return ".nan"
    if value in (float("inf"), float("-inf")):
        return "-.inf" if value < 0 else ".inf"
    return repr(value)


def _range_cases():
    from effdist.config import NUMERIC_RANGES, numeric_fields

    fields = numeric_fields()
    for name, rule in NUMERIC_RANGES.items():
        kind, is_list = fields[name]
        for bad in _values_outside(rule, kind):
            text = f"[{_yaml(bad)}]" if is_list else _yaml(bad)
            yield pytest.param(name, text, id=f"{name}={text}")
        if rule.positive_sum:
            yield pytest.param(name, "[0, 0]", id=f"{name}=[0,0]")


@pytest.mark.parametrize("name, text", list(_range_cases()))
def test_every_range_rejects_values_outside_it(name, text):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny-cpu.yaml", [f"{name}={text}"])
    msg = str(e.value)
    assert msg.startswith(f"{name} = "), msg
    assert "\n" not in msg


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", "optim.lr = nan: must be a finite number; the peak learning rate"),
    ("optim.lr=.inf", "optim.lr = inf: must be a finite number"),
    ("optim.eps=-1", "optim.eps = -1.0: must be a positive number; Adam's denominator epsilon"),
    ("model.norm_eps=-1", "model.norm_eps = -1.0: must be a finite number in (0, 1)"),
    ("model.rotary_base=0", "model.rotary_base = 0.0: must be a positive number; the RoPE base"),
    ("model.init_std=-1", "model.init_std = -1.0: must be a positive number"),
    ("model.make_vocab_size_divisible_by=0", "model.make_vocab_size_divisible_by = 0: must be a positive integer"),
    ("train.seed=-1", "train.seed = -1: must be an integer in [0, 4294967295]"),
    ("parallel.timeout_s=.nan", "parallel.timeout_s = nan: must be a finite number"),
    ("data.sample_documents=0", "data.sample_documents = 0: must be a positive integer"),
    ("data.weights=[0,0]", "data.weights = [0.0, 0.0]: must not be all zero"),
    ("data.weights=[1,-1]", "data.weights = [1.0, -1.0]: element -1.0 must be a finite number >= 0"),
    ("train.steps=1.0e+30", "train.steps = 1000000000000000019884624838656: does not fit in a 64-bit integer"),
    # An unclosed bracket (the shell ate the quotes) was a yaml.ScannerError traceback.
    ("data.paths=[a,b", "--set 'data.paths=[a,b': the value is not valid YAML (expected ',' or ']'"),
])
def test_issue_21_examples_give_one_named_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/tiny-cpu.yaml", [override])
    assert str(e.value).startswith(message), str(e.value)


def test_a_config_file_that_is_not_valid_yaml_is_one_line(tmp_path):
    """PyYAML's message spans four lines (the context, the problem, each with its `in "file", line L, column C`);
    the error is one line naming the file, where, and what."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: [1, 2\ntrain:\n  steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    message = str(e.value)
    assert "\n" not in message, message
    assert message.startswith(f"config file '{bad}' is not valid YAML: line 3, column 6: expected ',' or ']', "
                              "but got ':'"), message
    assert "(while parsing a flow sequence at line 2, column 15)" in message, message
