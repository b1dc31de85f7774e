"""Typed configuration tree for effdist.

A run is described by one `Config`: dataclass sections loaded from YAML, overridden with dotted
``--set a.b=c`` strings, and validated *before* any process group starts, so that a bad value is
reported once, with the field name, the value and what would be valid, instead of as a stack trace
from eight ranks.

Key names are a contract (scripts outside the package read them): see ../shared/DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value is invalid. The message names the field, the value and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    # GQA: number of key/value heads; None means multi-head attention (= num_attention_heads).
    num_query_groups: int | None = 2
    ffn_hidden_size: int = 176
    vocab_size: int = 512
    # Longest sequence the model supports (RoPE tables are built for it).
    max_position_embeddings: int = 256
    rotary_base: float = 10000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Round the embedding table up to a multiple of this (times tp) so it shards evenly.
    make_vocab_size_divisible_by: int = 64

    def padded_vocab_size(self, tp: int) -> int:
        """The embedding table's rows: the vocab rounded up so it shards evenly over `tp` ranks (as Megatron-LM
        does)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return ((self.vocab_size + multiple - 1) // multiple) * multiple


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    # "auto" picks cuda+nccl when a GPU is visible, else cpu+gloo.
    device: str = "auto"
    backend: str = "auto"
    # Process-group timeout: a dead peer turns into an error on every rank after this long.
    timeout_s: float = 600.0


@dataclass
class DataConfig:
    # "sample": generate the built-in sample corpus, train a tokenizer on it and index it (no downloads).
    # "indexed": read megatron .bin/.idx datasets listed in `paths` (optionally blended by `weights`).
    # "mock": megatron's MockGPTDataset (random tokens; for throughput benchmarks).
    kind: str = "sample"
    paths: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    tokenizer: str | None = None  # path to a tokenizer.json (HF tokenizers)
    seq_length: int = 128
    split: str = "98,2,0"
    # Where index caches, sample corpus and its tokenizer go; default: <run_dir>/data
    cache_dir: str | None = None
    sample_documents: int = 2000


@dataclass
class TrainConfig:
    steps: int = 60
    global_batch: int = 16
    micro_batch: int = 4
    seed: int = 1234
    # "auto": bf16 on GPU, fp32 on CPU.
    dtype: str = "auto"
    engine: str = "megatron"
    # Full activation recompute of every layer (trades compute for memory).
    recompute: bool = False
    # Every eval_interval steps (0: never), the mean loss over eval_steps global batches of the
    # validation split is logged as val_loss.
    eval_interval: int = 0
    eval_steps: int = 4
    # A non-finite loss or gradient norm skips the update; this many in a row stop the run.
    max_consecutive_nonfinite: int = 5
    # Triton kernels for RMSNorm, RoPE, SwiGLU and the LM-head loss on GPU (torch references on CPU), and
    # "wgrad": weight gradients accumulated straight into DDP's fp32 main_grad (GPU, megatron engine):
    # true = all, false = megatron's code paths exactly, or a list such as [rmsnorm, rope] (one lever at a time).
    fused_kernels: bool | list[str] = True
    # The fused loss keeps the LM head's logits for backward unless this is set: then it recomputes them
    # this many tokens at a time (least memory, one more LM-head GEMM).
    fused_loss_chunk_tokens: int | None = None
    # GEMM precision of the decoder's linear layers (QKV, attention output, FFN up/gate/down; not the
    # embedding or LM head): "bf16" = train.dtype, "fp8" = torchao's float8 training (GPU of compute
    # capability >= 8.9, torchao installed; docs/fp8.md). fp8_recipe: tensorwise | rowwise | rowwise_with_gw_hp.
    # fp8_compile: torch.compile each linear's casts + GEMM (CUDA). fp8_emulate: FP8 rounding with
    # high-precision matmuls, on any device (tests, numerics checks; not faster).
    precision: str = "bf16"
    fp8_recipe: str = "tensorwise"
    fp8_compile: bool = True
    fp8_emulate: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 10
    # "cosine" | "linear" | "constant"
    decay: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    # ZeRO-1: shard the fp32 master weights and Adam state over data-parallel ranks (each rank updates the
    # weights it owns and broadcasts them); saves (dp-1)/dp of optimizer memory. Checkpoints reshard.
    distributed_optimizer: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 0  # 0: only at the end of the run
    dir: str | None = None  # default <run_dir>/checkpoints
    async_save: bool = False
    keep_last: int = 3
    keep_every: int = 0  # also keep every k-th step's checkpoint (0: none)
    # On resume, check each file's CRC32 as well as its size (reads the whole checkpoint once).
    verify_crc: bool = True
    # Start a fresh run from these model weights (a dist checkpoint directory: a training checkpoint, or
    # `effdist convert hf-to-effdist --format dist` output), e.g. for continual pretraining. Ignored when
    # the run resumes from its own checkpoint.
    init_from: str | None = None
    save_at_end: bool = True


@dataclass
class LoggingConfig:
    interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class PipelineConfig:
    # 1f1b | interleaved | zb-h1 | v-min | v-half | v-zb
    schedule: str = "1f1b"
    # Microbatches per optimizer step on each pipeline; None = global_batch / (micro_batch * dp).
    microbatches: int | None = None
    # Model chunks per rank for the interleaved schedule.
    chunks_per_rank: int = 2
    # Measure each rank's activation memory every step (the pipeline_peak_* metrics): saved-tensor hooks
    # plus an all-gather per step, which cost step time, so off unless asked for.
    measure_memory: bool = False


@dataclass
class EpasConfig:
    enabled: bool = False
    # "progressive": grow the region by group_size layers every `interval` steps from start_step.
    # "fixed": the final region from step 0 (ablation). "adaptive": at the steps where progressive would grow,
    # measure the cosine similarity of the next group's Q/K with the Q/K they would share, and grow only if
    # it reaches similarity_threshold (final_region is then the maximum; deep_to_shallow only).
    mode: str = "progressive"
    start_step: int = 0
    interval: int = 100
    group_size: int = 1
    # Final number of sharing layers (int) or a fraction of num_layers (float in (0, 1)).
    final_region: float = 0.5
    # "deep_to_shallow" (default, as in the paper) or "shallow_to_deep" (ablation).
    direction: str = "deep_to_shallow"
    # effdist extension (0 = the paper's hard switch): over the `transition_steps` steps before a layer
    # joins the region it uses (1 - a) * own Q/K + a * the previous layer's, a rising to 1, so the layers
    # deeper than it move to the new anchor's Q/K gradually instead of all at once.
    transition_steps: int = 0
    # mode adaptive: a candidate group joins iff each layer's post-RoPE Q/K have a cosine similarity >= this
    # with its future anchor's (measured over the probe step's global batch); a number in (-1, 1].
    similarity_threshold: float = 0.5
    # effdist extension. The weight gradient of a layer whose Q/K other layers share is the sum over every
    # layer that uses them ("sum", the exact gradient). "mean" divides the Wq/Wk rows of that gradient by
    # their number of uses (1 + the layers sharing them; a layer in transition counts its weight a), so a
    # growing region does not inflate the global gradient norm that clipping scales every parameter by,
    # nor jump the anchor's gradient scale under Adam's slowly moving second moment.
    anchor_grad: str = "sum"
    # Region used at inference when none is given on the command line (None: the trained final region).
    inference_region: int | None = None


@dataclass
class FFNConfig:
    # swiglu | relu2 | topk | moc | elas
    kind: str = "swiglu"
    # Layers (0-based) that use `kind`; None = all layers. Others keep swiglu.
    layers: list[int] | None = None
    # top-k ReLU: k as a count (>=1) or a fraction of ffn_hidden_size (<1).
    topk_k: float = 0.1
    topk_activation: str = "relu"  # relu | relu2
    # Mixture-of-Channels: top-K gate channels per token, count or fraction.
    moc_k: float = 0.1875
    moc_structured: bool = False  # "2:8": top-2 of every 8 channels
    # How the fused GPU kernel finds MoC's / top-k's K largest channels per token: "bisect" (16 rounds of a count
    # for bf16), "bisect4" (8 rounds of three counts summed in one reduction) or "radix" (two 8-bit histograms,
    # one row per program; bf16 only, bisection for other dtypes). Same channels whichever; a speed choice
    # (effdist.kernels.topk_select): on an H100 radix ran 1.4-1.8x slower; bisect4 is not yet timed.
    select_method: str = "bisect"
    # How a plain top-K selection (MoC and top-k on one tensor-parallel rank) is kept for backward: "mask", a bit
    # mask of the row (W/8 bytes a token), or "indices", int16 channel indices (2K bytes: 704 B against 2,112 B for
    # MoC at llama-1b). Same gradients either way; the mask saves memory, each has its own backward kernels
    # (effdist.kernels.channel_select). 2:8 and tensor parallelism always keep indices.
    save_selection: str = "mask"
    # Non-gated FFNs (elas, and relu2 as ELAS's dense reference) are elas_expand x ffn_hidden_size wide:
    # 1.5 keeps the SwiGLU parameter count (2 matrices of 1.5x instead of 3).
    elas_expand: float = 1.5
    elas_warmup_steps: int = 0
    elas_rank: int | None = None  # low-rank factorised up/down projections; None = full rank
    # cuSPARSELt 2:4 GEMM for fc2's forward on GPU, only where this GPU's measured table
    # (configs/kernel_tables/sparse24-*.json) has it faster than dense at that shape; dense elsewhere.
    elas_sparse_kernels: bool = True
    # Straight-through gradient of the 2:4 selection: "identity" (dL/dh passes unmasked, as in the ELAS
    # draft) or "masked" (only the kept entries get gradient).
    elas_ste: str = "identity"

    def kind_of_layer(self, layer_idx: int) -> str:
        """The FFN kind of global layer `layer_idx`: `kind` on the listed layers (all by default), else swiglu."""
        if self.layers is None or layer_idx in self.layers:
            return self.kind
        return "swiglu"

    def width(self, model: ModelConfig) -> int:
        """Intermediate width of the FFN of kind `kind` (non-gated FFNs are elas_expand wider)."""
        if self.kind in ("elas", "relu2"):
            return int(round(self.elas_expand * model.ffn_hidden_size))
        return model.ffn_hidden_size

    def width_of_layer(self, model: ModelConfig, layer_idx: int) -> int:
        """Intermediate width of the FFN of global layer `layer_idx` (all TP ranks together)."""
        return self.width(model) if self.kind_of_layer(layer_idx) == self.kind else model.ffn_hidden_size


@dataclass
class DeepSpeedConfig:
    """Settings of train.engine = deepspeed (ignored by the default megatron engine)."""

    # 0: DeepSpeed's plain data parallelism; 1: Adam state and fp32 master weights sharded over
    # data-parallel ranks; 2: gradients sharded too; 3: parameters sharded too (gathered per layer).
    zero_stage: int = 1
    # Keep the optimizer state (and its step) in CPU memory (ZeRO 1-3; on GPUs it uses DeepSpeedCPUAdam).
    offload_optimizer: bool = False
    # Keep parameters in CPU memory between uses (ZeRO-3 only).
    offload_params: bool = False
    # A DeepSpeed JSON config whose keys are merged over the ones effdist derives (e.g. reduce_bucket_size);
    # keys effdist owns (batch sizes, clipping, optimizer, scheduler) must not conflict with the effdist config.
    config_file: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    epas: EpasConfig = field(default_factory=EpasConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # Free-form name; defaults to the YAML file's stem. The run directory defaults to runs/<name>.
    name: str = "run"

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def model_parallel_size(self) -> int:
        return self.parallel.tp * self.parallel.pp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def microbatches_per_step(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.train.global_batch // (self.train.micro_batch * dp)


# ---------------------------------------------------------------------- loading

def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise ConfigError."""
    origin = get_origin(tp)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in get_args(tp):
                return None
        last: Exception | None = None
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last if last else ConfigError(f"{where}: cannot interpret {value!r}")
    if origin is list:
        (elem,) = get_args(tp) or (Any,)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                try:
                    value = yaml.safe_load(s)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{where} = {s!r}: not a valid list ({str(getattr(e, 'problem', '') or e).strip()})"
                                      "; e.g. [1, 2] or 1,2") from None
            else:
                value = [v for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list, e.g. [1, 2] or 1,2")
        return [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return str(value)
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _apply(obj: Any, data: dict[str, Any], prefix: str) -> None:
    hints = _section_types(type(obj))
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ConfigError(f"unknown config key '{where}'. Valid keys here: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section; give it as a mapping, e.g. {where}: {{...}}")
            _apply(current, value, f"{where}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _set_dotted(cfg: Config, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.steps=100")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    try:
        value: Any = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        problem = str(getattr(e, "problem", "") or e).strip()
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({problem}); quote it for the shell, "
                          "e.g. --set 'data.paths=[a.jsonl, b.jsonl]'") from None
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    _apply(cfg, nested, "")


# The shipped configs (configs/*.yaml beside the package): every command that takes a config file also takes a
# preset's name (`--config llama-1b`), as `effdist presets` lists them.
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    return sorted(f.stem for f in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []


def preset_or_path(name_or_path: str | os.PathLike) -> Path:
    """The file itself where it exists, else configs/<name>.yaml where `name_or_path` is a preset's name."""
    p = Path(name_or_path)
    preset = PRESET_DIR / f"{p}.yaml"
    if not p.is_file() and p.name == str(p) and preset.is_file():
        return preset
    return p


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: `line L, column C: problem (while context at line L, column C)`."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if not problem:
        return " ".join(str(error).split())
    text = f"{at(mark)}: {problem}" if mark is not None else problem
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at {at(context_mark)})" if context_mark is not None else ")")
    return text


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                check: bool = True) -> Config:
    """Load a YAML config (or the defaults), apply --set overrides, and validate the result (unless not `check`)."""
    cfg = Config()
    if path is not None:
        p = preset_or_path(path)
        if p.is_dir():
            raise ConfigError(f"config '{p}' is a directory: give a YAML file in it (or a preset's name)")
        if not p.is_file():
            names = ", ".join(preset_names())
            raise ConfigError(f"config file '{p}' does not exist. Shipped configs live in configs/, e.g. configs/tiny-cpu.yaml"
                              + (f"; a preset's name works too ({names})" if names else ""))
        with open(p) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file '{p}' is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (model:, train:, ...)")
        data = dict(data)
        cfg.name = str(data.pop("name", p.stem))
        _apply(cfg, data, "")
    for a in overrides or []:
        _set_dotted(cfg, a)
    if check:
        validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    data = dict(data)
    if "name" in data:
        cfg.name = str(data.pop("name"))
    _apply(cfg, data, "")
    return cfg


# ---------------------------------------------------------------------- validation

SCHEDULES = ("1f1b", "interleaved", "zb-h1", "v-min", "v-half", "v-zb")
FFN_KINDS = ("swiglu", "relu2", "topk", "moc", "elas")


def _fail(field_name: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{field_name} = {value!r}: {fix}")


# ---------------------------------------------------------------------- numeric ranges

# Integers end up in torch/numpy int64 tensors and counters: anything larger overflows there.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric config field (each element of a list field).

    Floats must also be finite. `hint` says what the value means or gives a typical value; it ends the
    error message, after a "; ". `positive_sum` (lists): the elements must not all be zero.
    """

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    hint: str = ""
    positive_sum: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return self.high is None or value < self.high or (value == self.high and self.high_inclusive)

    def describe(self, integer: bool) -> str:
        """What a valid value is, in words: "a positive integer", "a number in [0, 1)"."""
        kind = "an integer" if integer else "a finite number"

        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.high is None and self.low == 0 and not self.low_inclusive:
            return "a positive number"
        if self.high is None and integer and self.low == 1:
            return "a positive integer"
        if self.high is None and self.low is not None:
            return f"{kind} {'>=' if self.low_inclusive else '>'} {num(self.low)}"
        if self.low is None and self.high is not None:
            return f"{kind} {'<=' if self.high_inclusive else '<'} {num(self.high)}"
        if self.low is None:
            return kind
        return (f"{kind} in {'[' if self.low_inclusive else '('}{num(self.low)}, {num(self.high)}"
                f"{']' if self.high_inclusive else ')'}")


def _at_least(low: float, hint: str = "") -> Range:
    return Range(low=low, hint=hint)


def _above(low: float, hint: str = "") -> Range:
    return Range(low=low, low_inclusive=False, hint=hint)


# Every int/float field of the config tree (and every list of them) has a row here; the values are checked
# before anything else, so a NaN or a negative size never reaches a cross-field check, a process group or a
# kernel. tests/test_config.py walks the dataclasses and fails for a numeric field without a row: add one
# when you add a field. Checks that depend on other fields (divisibility, min_lr <= lr, ...) live in
# validate().
NUMERIC_RANGES: dict[str, Range] = {
    "model.num_layers": _at_least(1),
    "model.hidden_size": _at_least(1),
    "model.num_attention_heads": _at_least(1),
    "model.num_query_groups": _at_least(1, "the number of key/value heads, or null for one per attention head"),
    "model.ffn_hidden_size": _at_least(1),
    "model.vocab_size": _at_least(1),
    "model.max_position_embeddings": _at_least(1),
    "model.rotary_base": _above(0, "the RoPE base theta, e.g. 10000 as in LLaMA-2, 500000 as in LLaMA-3"),
    "model.norm_eps": Range(low=0, high=1, low_inclusive=False, high_inclusive=False,
                            hint="the epsilon RMSNorm adds to the mean square, e.g. 1e-5"),
    "model.init_std": _above(0, "the standard deviation of the initial weights, e.g. 0.02"),
    "model.make_vocab_size_divisible_by": _at_least(1, "the embedding table is padded to a multiple of this "
                                                       "times parallel.tp: 64 as in Megatron-LM, 1 for no padding"),
    "parallel.tp": _at_least(1),
    "parallel.pp": _at_least(1),
    "parallel.timeout_s": Range(low=0, high=365 * 86400, low_inclusive=False,
                                hint="seconds a collective may wait for a peer before every rank stops, e.g. 600"),
    "data.weights": Range(low=0, positive_sum=True,
                          hint="relative shares of the datasets in data.paths, e.g. [0.7, 0.3]"),
    "data.seq_length": _at_least(1),
    "data.sample_documents": _at_least(1, "documents in the generated sample corpus, e.g. 2000"),
    "train.steps": _at_least(1),
    "train.global_batch": _at_least(1),
    "train.micro_batch": _at_least(1),
    # numpy's RandomState, which megatron's dataset shuffles use, takes seeds in [0, 2^32).
    "train.seed": Range(low=0, high=2**32 - 1, hint="numpy and megatron's data shuffles take seeds in [0, 2^32)"),
    "train.eval_interval": _at_least(0, "0: no evaluation"),
    "train.eval_steps": _at_least(1),
    "train.max_consecutive_nonfinite": _at_least(1),
    "train.fused_loss_chunk_tokens": _at_least(1, "a token count, or null to keep the logits"),
    "optim.lr": _above(0, "the peak learning rate, e.g. 3e-4"),
    "optim.min_lr": _at_least(0),
    "optim.warmup_steps": _at_least(0),
    "optim.weight_decay": _at_least(0, "e.g. 0.1, or 0 for none"),
    "optim.beta1": Range(low=0, high=1, high_inclusive=False, hint="e.g. 0.9"),
    "optim.beta2": Range(low=0, high=1, high_inclusive=False, hint="e.g. 0.95"),
    "optim.eps": _above(0, "Adam's denominator epsilon, e.g. 1e-8"),
    "optim.clip_grad": _at_least(0, "0 disables clipping"),
    "checkpoint.interval": _at_least(0, "0: save only at the end"),
    "checkpoint.keep_last": _at_least(1, "so the newest checkpoint is never deleted"),
    "checkpoint.keep_every": _at_least(0, "0: keep no extra checkpoints"),
    "logging.interval": _at_least(1),
    "pipeline.microbatches": _at_least(1, "or null: global_batch / (micro_batch * dp)"),
    "pipeline.chunks_per_rank": _at_least(1),
    "epas.start_step": _at_least(0),
    "epas.interval": _at_least(1, "steps between growths of the region"),
    "epas.group_size": _at_least(1, "layers added per growth"),
    "epas.final_region": _above(0, "a layer count >= 1 or a fraction of model.num_layers in (0, 1)"),
    "epas.transition_steps": _at_least(0, "0 switches each layer at once, as in the paper"),
    "epas.similarity_threshold": Range(low=-1, high=1, low_inclusive=False,
                                       hint="the cosine similarity at or above which a group joins, e.g. 0.5"),
    "epas.inference_region": _at_least(0),
    "ffn.layers": _at_least(0, "0-based layer indices"),
    "ffn.topk_k": _above(0, "a count >= 1 or a fraction of the FFN width in (0, 1)"),
    "ffn.moc_k": _above(0, "a count >= 1 or a fraction of the FFN width in (0, 1)"),
    "ffn.elas_expand": _above(0, "1.5 keeps the SwiGLU parameter count"),
    "ffn.elas_warmup_steps": _at_least(0),
    "ffn.elas_rank": _at_least(1, "or null for full rank"),
    "deepspeed.zero_stage": Range(low=0, high=3, hint="valid: 0, 1, 2, 3"),
}


def _numeric_kind(tp: Any) -> tuple[type, bool] | None:
    """(int or float, is_list) when annotation `tp` holds numbers (optionally None or a list); else None.

    `bool | list[str]` and other non-numeric annotations give None; bool is not a number here.
    """
    origin = get_origin(tp)
    if origin is Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        kinds = [k for k in (_numeric_kind(a) for a in get_args(tp) if a is not type(None)) if k is not None]
        return kinds[0] if len(kinds) == 1 and len(get_args(tp)) - (type(None) in get_args(tp)) == 1 else None
    if origin is list:
        (elem,) = get_args(tp) or (Any,)
        inner = _numeric_kind(elem)
        return (inner[0], True) if inner is not None and not inner[1] else None
    if tp in (int, float):
        return tp, False
    return None


def numeric_fields(cls: type | None = None, prefix: str = "") -> dict[str, tuple[type, bool]]:
    """Dotted name -> (int or float, is_list) of every numeric field in the config tree under `cls`."""
    cls = Config if cls is None else cls
    out: dict[str, tuple[type, bool]] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update(numeric_fields(tp, f"{prefix}{f.name}."))
            continue
        kind = _numeric_kind(tp)
        if kind is not None:
            out[f"{prefix}{f.name}"] = kind
    return out


def _value_at(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_number(name: str, value: Any, kind: type, rule: Range | None) -> None:
    integer = kind is int
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "expected an integer" if integer else "expected a number")
    if integer and not isinstance(value, int):
        _fail(name, value, "expected an integer")
    if not math.isfinite(value):
        _fail(name, value, "must be a finite number" + (f"; {rule.hint}" if rule and rule.hint else ""))
    if integer and not -INT64_MAX - 1 <= value <= INT64_MAX:
        _fail(name, value, "does not fit in a 64-bit integer")
    if rule is not None and not rule.contains(value):
        _fail(name, value, f"must be {rule.describe(integer)}" + (f"; {rule.hint}" if rule.hint else ""))


def validate_numbers(cfg: Config) -> None:
    """Every numeric field finite and within its NUMERIC_RANGES row (the first offender raises)."""
    for name, (kind, is_list) in numeric_fields().items():
        value = _value_at(cfg, name)
        if value is None:
            continue
        rule = NUMERIC_RANGES.get(name)
        if not is_list:
            _check_number(name, value, kind, rule)
            continue
        for element in value:
            try:
                _check_number(name, element, kind, rule)
            except ConfigError as e:
                raise ConfigError(f"{name} = {value!r}: element {element!r} " + str(e).split(": ", 1)[1]) from None
        if rule is not None and rule.positive_sum and value and not sum(value) > 0:
            _fail(name, value, "must not be all zero" + (f"; {rule.hint}" if rule.hint else ""))


def resolve_count(value: float, total: int) -> int:
    """A count given either as an integer >= 1 or as a fraction of `total` in (0, 1)."""
    if value >= 1:
        return int(value)
    return max(1, int(round(value * total)))


EPAS_MODES = ("progressive", "fixed", "adaptive")


def check_epas(epas: EpasConfig, num_layers: int) -> None:
    """Raise ConfigError naming the field if this EPAS schedule cannot run on `num_layers` layers.

    The epas section's own checks (and its one reference to model.num_layers); EPAS code calls them as
    effdist.epas.schedule.check_schedule."""
    if epas.mode not in EPAS_MODES:
        raise ConfigError(f"epas.mode = {epas.mode!r}: valid: progressive, fixed, adaptive")
    threshold = epas.similarity_threshold
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
            or not -1.0 < threshold <= 1.0):
        raise ConfigError(f"epas.similarity_threshold = {threshold!r}: must be a number in (-1, 1], the cosine "
                          "similarity of a candidate layer's Q/K with its future anchor's at or above which "
                          "epas.mode = adaptive lets it join (e.g. 0.5)")
    if epas.direction not in ("deep_to_shallow", "shallow_to_deep"):
        raise ConfigError(f"epas.direction = {epas.direction!r}: valid: deep_to_shallow, shallow_to_deep")
    if epas.interval <= 0:
        raise ConfigError(f"epas.interval = {epas.interval!r}: must be a positive number of steps between growths")
    if epas.group_size <= 0:
        raise ConfigError(f"epas.group_size = {epas.group_size!r}: must be a positive number of layers")
    if not isinstance(epas.transition_steps, int) or epas.transition_steps < 0:
        raise ConfigError(f"epas.transition_steps = {epas.transition_steps!r}: must be a whole number of steps >= 0 "
                          "(0 switches each layer at once, as in the paper)")
    if epas.start_step < 0:
        raise ConfigError(f"epas.start_step = {epas.start_step!r}: must be >= 0")
    if epas.mode == "adaptive":
        if epas.direction != "deep_to_shallow":
            raise ConfigError(f"epas.direction = {epas.direction!r}: epas.mode = adaptive grows the region from the "
                              "deep end only; use deep_to_shallow (or mode progressive for the ablation)")
        if epas.transition_steps >= epas.interval:
            raise ConfigError(f"epas.transition_steps = {epas.transition_steps!r}: with epas.mode = adaptive it must "
                              f"be below epas.interval = {epas.interval} (a group joins before the next probe "
                              "measures the layers above it); lower it or raise epas.interval")
    if epas.final_region <= 0:
        raise ConfigError(f"epas.final_region = {epas.final_region!r}: must be a layer count >= 1 or a fraction "
                          "in (0, 1)")
    if epas.final_region >= 1 and not float(epas.final_region).is_integer():
        raise ConfigError(f"epas.final_region = {epas.final_region!r}: a count must be a whole number of layers "
                          "(or give a fraction in (0, 1))")
    final = final_region_count(epas, num_layers)
    if final == 0:
        raise ConfigError(f"epas.final_region = {epas.final_region!r} of {num_layers} layers rounds down to 0 "
                          "sharing layers; raise the fraction or give a count")
    if final > num_layers - 1:
        raise ConfigError(f"epas.final_region = {epas.final_region!r} = {final} sharing layers; at most "
                          f"num_layers-1 = {num_layers - 1} (layer 0 has no previous layer to share Q/K with)")


def final_region_count(epas: EpasConfig, num_layers: int) -> int:
    """epas.final_region as a layer count (it may be given as a fraction of num_layers)."""
    if epas.final_region >= 1:
        return resolve_count(epas.final_region, num_layers)
    return int(math.floor(epas.final_region * num_layers))


def epas_final_region(cfg: Config) -> int:
    """epas.final_region as a layer count (it may be given as a fraction of model.num_layers)."""
    return final_region_count(cfg.epas, cfg.model.num_layers)


def ffn_width(cfg: Config) -> int:
    """Intermediate width of the FFN of the configured kind (non-gated FFNs are elas_expand wider)."""
    return cfg.ffn.width(cfg.model)


def ffn_kind_of_layer(cfg: Config, layer_idx: int) -> str:
    return cfg.ffn.kind_of_layer(layer_idx)


def ffn_width_of_layer(cfg: Config, layer_idx: int) -> int:
    """Intermediate width of the FFN of global layer `layer_idx` (all TP ranks together)."""
    return cfg.ffn.width_of_layer(cfg.model, layer_idx)


def padded_vocab_size(cfg: Config) -> int:
    """The embedding table's rows: the vocab rounded up so it shards evenly over TP (as Megatron-LM does)."""
    return cfg.model.padded_vocab_size(cfg.parallel.tp)


FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao's Float8LinearRecipeName values


def _validate_precision(cfg: Config) -> None:
    tr = cfg.train
    if tr.precision not in ("bf16", "fp8"):
        _fail("train.precision", tr.precision, "valid: bf16, fp8")
    if tr.fp8_recipe not in FP8_RECIPES:
        _fail("train.fp8_recipe", tr.fp8_recipe, f"valid: {', '.join(FP8_RECIPES)}")
    if tr.precision != "fp8":
        return
    if tr.dtype not in ("auto", "bf16") and not tr.fp8_emulate:
        _fail("train.dtype", tr.dtype, "train.precision=fp8 casts bf16 weights and activations; use train.dtype=bf16 "
              "(or auto on a GPU)")
    if tr.engine != "megatron":
        _fail("train.engine", tr.engine, "train.precision=fp8 runs under the megatron engine; use train.engine=megatron")


DEEPSPEED_INSTALL_HINT = ('pip install -e ".[deepspeed]" (on a machine without CUDA: '
                          'DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)')


def _validate_deepspeed(cfg: Config) -> None:
    ds, par = cfg.deepspeed, cfg.parallel
    if cfg.train.engine != "deepspeed":
        return
    if par.pp > 1:
        if ds.zero_stage >= 2:
            _fail("parallel.pp", par.pp, f"DeepSpeed ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism "
                  f"(deepspeed.zero_stage={ds.zero_stage}); use parallel.pp=1, or train.engine=megatron")
        _fail("parallel.pp", par.pp, "train.engine=deepspeed runs without pipeline parallelism; use parallel.pp=1, or "
              "train.engine=megatron for effdist's pipeline schedules")
    if par.sequence_parallel:
        _fail("parallel.sequence_parallel", True, "DeepSpeed does not sum the partial gradients of weights replicated "
              "over tensor-parallel ranks; set it to false, or use train.engine=megatron")
    if ds.offload_params and ds.zero_stage != 3:
        _fail("deepspeed.offload_params", True,
              f"parameter offload needs deepspeed.zero_stage=3 (it is {ds.zero_stage})")
    if ds.offload_optimizer and ds.zero_stage == 0:
        _fail("deepspeed.offload_optimizer", True, "optimizer offload needs deepspeed.zero_stage >= 1")
    if cfg.epas.enabled and ds.zero_stage not in (1, 2):
        _fail("epas.enabled", True, "under train.engine=deepspeed EPAS keeps the Wq/Wk rows of the fp32 master "
              f"weights of ZeRO-1/2 (deepspeed.zero_stage={ds.zero_stage}); use deepspeed.zero_stage 1 or 2")
    if cfg.checkpoint.async_save:
        _fail("checkpoint.async_save", True, "DeepSpeed writes its own checkpoints synchronously; set it to false")
    if cfg.optim.distributed_optimizer:
        _fail("optim.distributed_optimizer", True, "the megatron engine's option; with train.engine=deepspeed "
              "choose the sharding with deepspeed.zero_stage")
    if ds.config_file is not None and not Path(ds.config_file).is_file():
        _fail("deepspeed.config_file", ds.config_file, "no such file")
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        _fail("train.engine", "deepspeed",
              f"DeepSpeed is not installed ({e}); install it with {DEEPSPEED_INSTALL_HINT}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check every field (and the checks between fields that need nothing but the config); raise
    ConfigError naming the first invalid field.

    `world_size` adds the checks that need it (data-parallel divisibility); they run again once the
    launcher's WORLD_SIZE is known, still before any process group is created. The checks that need a
    package's knowledge (pipeline chunk counts, fused-kernel names) live in that package;
    effdist.train.preflight.validate_run runs this and them, in that order.
    """
    validate_numbers(cfg)
    m, par, tr, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    if m.hidden_size % m.num_attention_heads:
        _fail("model.hidden_size", m.hidden_size, f"must be divisible by model.num_attention_heads={m.num_attention_heads}")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % groups:
        _fail("model.num_query_groups", m.num_query_groups, f"must divide model.num_attention_heads={m.num_attention_heads}")
    if (m.hidden_size // m.num_attention_heads) % 2:
        _fail("model.hidden_size", m.hidden_size, "head dim (hidden_size / num_attention_heads) must be even for RoPE")

    if m.num_attention_heads % par.tp:
        _fail("parallel.tp", par.tp, f"must divide model.num_attention_heads={m.num_attention_heads}")
    if groups % par.tp:
        _fail("parallel.tp", par.tp, f"must divide the number of key/value heads model.num_query_groups={groups}")
    if ffn_width(cfg) < 1:
        _fail("ffn.elas_expand", cfg.ffn.elas_expand, f"gives ffn.kind={cfg.ffn.kind} an FFN width of 0 (elas_expand x "
              f"model.ffn_hidden_size={m.ffn_hidden_size}, rounded); raise it (1.5 keeps the SwiGLU parameter count)")
    if ffn_width(cfg) % par.tp:
        _fail("parallel.tp", par.tp, f"must divide the FFN width {ffn_width(cfg)}")
    if m.ffn_hidden_size % par.tp and any(cfg.ffn.kind_of_layer(i) != cfg.ffn.kind for i in range(m.num_layers)):
        _fail("parallel.tp", par.tp, f"must divide model.ffn_hidden_size={m.ffn_hidden_size}, the width of the layers "
              f"outside ffn.layers={cfg.ffn.layers} (they keep swiglu)")
    if par.device not in ("auto", "cuda", "cpu"):
        _fail("parallel.device", par.device, "valid: auto, cuda, cpu")
    if par.backend not in ("auto", "nccl", "gloo"):
        _fail("parallel.backend", par.backend, "valid: auto, nccl, gloo")
    if par.device == "cpu" and par.backend == "nccl":
        _fail("parallel.backend", par.backend, "nccl needs GPUs; use gloo (or auto) with parallel.device=cpu")
    if par.sequence_parallel and par.tp == 1:
        _fail("parallel.sequence_parallel", True, "needs parallel.tp > 1")
    if par.sequence_parallel and cfg.data.seq_length % par.tp:
        _fail("data.seq_length", cfg.data.seq_length, f"must be a multiple of parallel.tp={par.tp} with "
              "parallel.sequence_parallel=true (each tensor-parallel rank holds 1/tp of the sequence); change "
              "data.seq_length or set parallel.sequence_parallel=false")

    if d.seq_length > m.max_position_embeddings:
        _fail("data.seq_length", d.seq_length, f"is longer than model.max_position_embeddings={m.max_position_embeddings}; "
              "shorten it or raise the model's maximum")
    if d.kind not in ("sample", "indexed", "mock"):
        _fail("data.kind", d.kind, "valid: sample, indexed, mock")
    if d.kind == "indexed" and not d.paths:
        _fail("data.paths", d.paths, "data.kind=indexed needs at least one dataset prefix (path without .bin/.idx)")
    if d.weights is not None and len(d.weights) != len(d.paths):
        _fail("data.weights", d.weights, f"needs one weight per entry of data.paths ({len(d.paths)})")
    try:
        parts = [float(x) for x in d.split.split(",")]
        assert len(parts) == 3 and sum(parts) > 0 and parts[0] > 0
    except (ValueError, AssertionError):
        _fail("data.split", d.split, "give three comma-separated train,valid,test weights, e.g. 98,2,0")

    if tr.global_batch % tr.micro_batch:
        _fail("train.global_batch", tr.global_batch, f"must be a multiple of train.micro_batch={tr.micro_batch}")
    if tr.dtype not in ("auto", "fp32", "bf16", "fp16"):
        _fail("train.dtype", tr.dtype, "valid: auto, fp32, bf16, fp16")
    if tr.eval_interval and par.pp > 1:
        _fail("train.eval_interval", tr.eval_interval, "evaluation runs without pipeline parallelism only; set "
              "train.eval_interval=0 with parallel.pp > 1")
    if tr.engine not in ("megatron", "deepspeed"):
        _fail("train.engine", tr.engine, "valid: megatron, deepspeed")
    _validate_deepspeed(cfg)
    _validate_precision(cfg)

    o = cfg.optim
    if o.min_lr > o.lr:
        _fail("optim.min_lr", o.min_lr, f"must lie in [0, optim.lr={o.lr}]; e.g. --set optim.min_lr={o.lr / 10:g} "
              "(a tenth of optim.lr, as in the presets)")
    if o.decay not in ("cosine", "linear", "constant"):
        _fail("optim.decay", o.decay, "valid: cosine, linear, constant")

    pl = cfg.pipeline
    if pl.schedule not in SCHEDULES:
        _fail("pipeline.schedule", pl.schedule, "valid: " + ", ".join(SCHEDULES))
    if par.pp > 1 and pl.schedule.startswith("v-") and pl.chunks_per_rank != 2:
        _fail("pipeline.chunks_per_rank", pl.chunks_per_rank, f"pipeline.schedule={pl.schedule} places exactly 2 chunks "
              "on each rank (the V shape); leave it at 2, or use pipeline.schedule=interleaved for another count")

    e = cfg.epas
    if e.mode not in ("progressive", "fixed", "adaptive"):
        _fail("epas.mode", e.mode, "valid: progressive, fixed, adaptive")
    if e.enabled:
        check_epas(e, m.num_layers)
        if e.inference_region is not None and not (0 <= e.inference_region <= m.num_layers - 1):
            _fail("epas.inference_region", e.inference_region, f"must lie in [0, {m.num_layers - 1}]")
        if e.anchor_grad not in ("sum", "mean"):
            _fail("epas.anchor_grad", e.anchor_grad, "valid: sum (the exact gradient), mean (divided by the uses)")
        if e.anchor_grad == "mean" and cfg.train.engine == "deepspeed":
            _fail("epas.anchor_grad", e.anchor_grad, "train.engine=deepspeed clips and steps inside DeepSpeed, before "
                  "effdist could rescale the shared Q/K gradients; use epas.anchor_grad=sum, or train.engine=megatron")

    f = cfg.ffn
    if f.kind not in FFN_KINDS:
        _fail("ffn.kind", f.kind, "valid: " + ", ".join(FFN_KINDS))
    if f.layers is not None:
        bad = [i for i in f.layers if not 0 <= i < m.num_layers]
        if bad:
            _fail("ffn.layers", f.layers, f"layer indices must lie in [0, {m.num_layers - 1}]")
    width = ffn_width(cfg)
    for name, k in (("topk_k", f.topk_k), ("moc_k", f.moc_k)):
        if f.kind == name[:-2] and k >= 1 and not float(k).is_integer():
            _fail(f"ffn.{name}", k, f"a count must be a whole number of channels (or give a fraction of the FFN "
                                    f"width in (0, 1)); it would be cut to {int(k)}")
    if f.kind == "topk":
        if resolve_count(f.topk_k, width) > width:
            _fail("ffn.topk_k", f.topk_k, f"must be a count in [1, {width}] or a fraction in (0, 1)")
        if f.topk_activation not in ("relu", "relu2"):
            _fail("ffn.topk_activation", f.topk_activation, "valid: relu, relu2")
    if f.select_method not in ("bisect", "bisect4", "radix"):
        _fail("ffn.select_method", f.select_method, "valid: bisect, bisect4, radix")
    if f.save_selection not in ("mask", "indices"):
        _fail("ffn.save_selection", f.save_selection, "valid: mask, indices")
    if f.kind == "moc":
        if resolve_count(f.moc_k, width) > width:
            _fail("ffn.moc_k", f.moc_k, f"must be a count in [1, ffn width {width}] or a fraction in (0, 1)")
        if f.moc_structured and (width // par.tp) % 8:
            _fail("ffn.moc_structured", True, f"2:8 selection needs the per-rank FFN width ({width // par.tp}) divisible by 8")
    if f.kind == "elas":
        if (width // par.tp) % 4:
            _fail("ffn.elas_expand", f.elas_expand, f"2:4 sparsity needs the per-rank FFN width ({width // par.tp}) divisible by 4")
        if f.elas_ste not in ("identity", "masked"):
            _fail("ffn.elas_ste", f.elas_ste, "valid: identity, masked")
        if f.elas_rank is not None and f.elas_rank > min(m.hidden_size, width):
            _fail("ffn.elas_rank", f.elas_rank, f"must lie in [1, min(hidden_size, ffn width) = {min(m.hidden_size, width)}]")

    if world_size is not None:
        validate_world_size(cfg, world_size)


def validate_world_size(cfg: Config, world_size: int) -> None:
    """The checks that need the number of processes (data-parallel divisibility)."""
    par, tr, pl = cfg.parallel, cfg.train, cfg.pipeline
    if world_size % cfg.model_parallel_size:
        # Named after the one the user set to more than 1 (both when both are): either may be the one to change.
        field = "parallel.tp" if par.pp == 1 else "parallel.pp" if par.tp == 1 else "parallel.tp*parallel.pp"
        value = par.tp if par.pp == 1 else par.pp if par.tp == 1 else f"{par.tp}*{par.pp}"
        raise ConfigError(f"{field} = {value}: tp*pp = {cfg.model_parallel_size} must divide the number of processes "
                          f"({world_size})")
    dp = cfg.data_parallel_size(world_size)
    if tr.global_batch % (tr.micro_batch * dp):
        _fail("train.global_batch", tr.global_batch, f"must be a multiple of micro_batch*data_parallel = {tr.micro_batch}*{dp}")
    if pl.microbatches is not None and pl.microbatches != cfg.microbatches_per_step(world_size):
        _fail("pipeline.microbatches", pl.microbatches, f"must equal global_batch/(micro_batch*dp) = "
              f"{cfg.microbatches_per_step(world_size)}, or be left unset")
