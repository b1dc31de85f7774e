"""What a config will cost before anything starts: rank layout, parameters and memory per rank, size limits.

Used by `effdist train --dry-run` (printed) and by every `effdist train` start (`check_fits`: absurd sizes
become one named ConfigError, exit 2, before a process group, a dataset index or a model exists).

Memory per rank, the way Megatron-LM counts it (bytes per parameter of this rank's model chunks):
  weights     2 (bf16/fp16) or 4 (fp32)
  gradients   4 (megatron DDP accumulates into fp32 ``main_grad`` buffers)
  optimizer   Adam's two moments (8) + an fp32 master copy when the weights are not fp32 (4);
              divided by the data-parallel size with optim.distributed_optimizer (ZeRO-1)
  activations the peak over the step: the Korthikanti et al. per-layer formula (effdist.pipeline.memory_model)
              times the layers of the chunks in flight, as the pipeline simulator walks the schedule
              (pp > 1), or one microbatch through all layers (pp = 1: microbatches run one after another);
              plus the fp32 logits of one microbatch on the rank that computes the loss. With
              train.recompute each layer keeps only its input, and the one layer being recomputed holds its
              full activations; that happens after the logits are freed, so the peak counts the larger of the
              two on the loss's rank.
Not counted: the CUDA context, allocator fragmentation, communication buffers, the data loader. For the
llama-1b preset (micro-batch 8, bf16, one H100) the estimate is 34.9 GiB against a measured peak of 35.6 GiB
(docs/benchmarks.md). The activation formula is GPT's (Korthikanti et al.), though, and configurations it was
not checked against (sparse FFNs, EPAS, chunked fused loss) may keep less. So `check_fits` refuses a run only
when it cannot fit by a wide margin: weights, gradients and optimizer state (exact) alone exceed the memory,
or the whole estimate exceeds OVERESTIMATE_FACTOR x the memory. Between 1x and that factor the dry run warns.

Sizes checked before start (`check_fits`):
  - tokens of the run (train.steps x train.global_batch x data.seq_length) must fit in int64;
  - megatron's dataset builds a sample index for train.steps x train.global_batch samples in host memory
    (at least 12 bytes a sample: a shuffle entry and a (document, offset) pair); it must fit in the host's
    available memory;
  - the per-rank memory above must fit (as said above) in the GPU's memory, or on CPU, summed over the ranks
    of this host, in the host's available memory.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Iterable

from effdist.config import (INT64_MAX, Config, ConfigError, ffn_kind_of_layer, ffn_width_of_layer,
                            padded_vocab_size)
from effdist.pipeline.memory_model import (ActivationShape, chunk_activation_bytes, ffn_saved_bytes_per_token,
                                           layer_partition, megatron_layer_bytes)

GIB = 2**30
# Microbatches the dry run simulates at most: every schedule reaches its peak activation within its warm-up
# (at most a few times pp microbatches), so the peak of a 10^6-microbatch step is the peak of the first 256.
MAX_SIMULATED_MICROBATCHES = 256
# megatron's GPTDataset keeps, per training sample, a shuffle index entry (uint32) and a sample index row of
# two int32 (document, offset): a lower bound that ignores the document index.
INDEX_BYTES_PER_SAMPLE = 12
GATED_FFNS = ("swiglu", "moc")
# How far the estimate may exceed the memory before a start is refused (see the module docstring).
OVERESTIMATE_FACTOR = 2.0


# ---------------------------------------------------------------------- layout

@dataclass(frozen=True)
class RankCoordinates:
    rank: int
    tp: int
    pp: int
    dp: int


def rank_layout(cfg: Config, world_size: int) -> list[RankCoordinates]:
    """Each global rank's (tp, pp, dp) coordinates in megatron's default order "tp-cp-ep-dp-pp": tensor
    parallel ranks are adjacent (one node's NVLink), pipeline stages farthest apart."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world_size // (tp * pp)
    return [RankCoordinates(r, r % tp, r // (tp * dp), (r // tp) % dp) for r in range(world_size)]


def _microbatches(cfg: Config, world_size: int) -> int:
    return cfg.pipeline.microbatches or cfg.microbatches_per_step(world_size)


def build_plan_schedule(cfg: Config, world_size: int, max_microbatches: int = MAX_SIMULATED_MICROBATCHES):
    """The pipeline Schedule the executor would build (None for pp = 1), with at most `max_microbatches`
    microbatches."""
    if cfg.parallel.pp == 1:
        return None
    name = cfg.pipeline.schedule
    cpr = cfg.pipeline.chunks_per_rank if name == "interleaved" else 2
    m = min(_microbatches(cfg, world_size), max_microbatches)
    return validated_schedule(name, cfg.parallel.pp, m, cpr)


@functools.lru_cache(maxsize=256)
def validated_schedule(name: str, pp: int, microbatches: int, chunks_per_rank: int):
    """Schedules depend on these four numbers only; the planner asks for the same ones thousands of times."""
    from effdist.pipeline.schedules import build_schedule

    schedule = build_schedule(name, pp, microbatches, chunks_per_rank=chunks_per_rank)
    schedule.validate()
    return schedule


def stage_chunks(cfg: Config, schedule) -> list[list[range]]:
    """Per pipeline stage, the layer ranges of its chunks (in forward order)."""
    if schedule is None:
        return [[range(cfg.model.num_layers)]]
    parts = layer_partition(cfg.model.num_layers, schedule.num_chunks)
    return [[parts[c] for c in schedule.placement.chunks_of(r)] for r in range(cfg.parallel.pp)]


# ---------------------------------------------------------------------- parameters

def layer_parameters(cfg: Config, layer: int) -> tuple[int, int]:
    """(parameters sharded over tensor-parallel ranks, replicated ones) of one decoder layer, whole model."""
    m = cfg.model
    h, heads = m.hidden_size, m.num_attention_heads
    head_dim = h // heads
    groups = m.num_query_groups or heads
    sharded = h * (heads + 2 * groups) * head_dim + heads * head_dim * h  # QKV and output projection
    replicated = 2 * h  # the two RMSNorm weights
    width = ffn_width_of_layer(cfg, layer)
    kind = ffn_kind_of_layer(cfg, layer)
    if kind in GATED_FFNS:
        sharded += 3 * h * width
    elif kind == "elas" and cfg.ffn.elas_rank is not None:
        # Low-rank fc1 = A·B and fc2 = A·B: the factor next to the FFN width is sharded, the other replicated.
        r = cfg.ffn.elas_rank
        sharded += 2 * r * width
        replicated += 2 * r * h
    else:
        sharded += 2 * h * width
    return sharded, replicated


@dataclass(frozen=True)
class StageParameters:
    """Parameters one tensor-parallel rank of a pipeline stage holds."""

    layers: int
    embedding: bool
    head: bool
    count: int


def parameters_per_stage(cfg: Config, chunks_by_stage: list[list[range]]) -> list[StageParameters]:
    m, tp = cfg.model, cfg.parallel.tp
    vocab_rows = padded_vocab_size(cfg) * m.hidden_size
    # The stage holding layer 0 has the embedding; the one holding the last layer the final norm and the
    # output layer (rank 0 for both under the V schedules).
    order = sorted((c.start, s) for s, chunks in enumerate(chunks_by_stage) for c in chunks)
    first_stage, last_stage = order[0][1], order[-1][1]
    out = []
    for s, chunks in enumerate(chunks_by_stage):
        sharded = replicated = 0
        layers = 0
        for rng in chunks:
            for i in rng:
                a, b = layer_parameters(cfg, i)
                sharded, replicated, layers = sharded + a, replicated + b, layers + 1
        embedding, head = s == first_stage, s == last_stage
        if embedding:
            sharded += vocab_rows
        if head:
            replicated += m.hidden_size  # final norm
            if not m.tie_embeddings:
                sharded += vocab_rows
        out.append(StageParameters(layers, embedding, head, sharded // tp + replicated))
    return out


def total_parameters(cfg: Config) -> int:
    """Parameters of the whole model (all ranks together, the padded vocabulary included)."""
    flat = copy.deepcopy(cfg)
    flat.parallel.tp = flat.parallel.pp = 1
    return parameters_per_stage(flat, [[range(cfg.model.num_layers)]])[0].count


# ---------------------------------------------------------------------- memory

@dataclass(frozen=True)
class RankMemory:
    """Estimated bytes on one rank of a pipeline stage (every tp and dp rank of the stage is alike)."""

    stage: int
    parameters: int
    embedding: bool  # this stage holds the embedding
    head: bool  # ... and/or the final norm, output layer and loss
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def as_dict(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "logits": self.logits, "total": self.total}


@dataclass
class Estimate:
    world_size: int
    on_gpu: bool
    dp: int
    microbatches: int
    schedule: object | None
    chunks_by_stage: list[list[range]]
    stages: list[RankMemory] = field(default_factory=list)
    simulation: object | None = None

    @property
    def peak(self) -> RankMemory:
        return max(self.stages, key=lambda s: s.total)


def weight_bytes(cfg: Config, on_gpu: bool) -> int:
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else ("bf16" if on_gpu else "fp32")
    return 4 if dtype == "fp32" else 2


def _activation_shape(cfg: Config, on_gpu: bool) -> ActivationShape:
    return ActivationShape(seq_length=cfg.data.seq_length, micro_batch=cfg.train.micro_batch,
                           hidden_size=cfg.model.hidden_size, num_attention_heads=cfg.model.num_attention_heads,
                           num_layers=cfg.model.num_layers, tp=cfg.parallel.tp,
                           sequence_parallel=cfg.parallel.sequence_parallel,
                           bytes_per_element=weight_bytes(cfg, on_gpu))


def ffn_bytes_per_token_vs_swiglu(cfg: Config, layer: int) -> float:
    """Bytes per token that the FFN of `layer` keeps for backward on a GPU beyond the fused SwiGLU of the model's
    width, which the per-layer formula stands for (negative: less)."""
    kind = cfg.ffn.kind_of_layer(layer)
    if kind == "swiglu":
        return 0.0
    par, e = cfg.parallel, weight_bytes(cfg, on_gpu=True)
    kwargs = dict(element_bytes=e, tp=par.tp, sequence_parallel=par.sequence_parallel)
    swiglu = ffn_saved_bytes_per_token(dataclasses.replace(cfg.ffn, kind="swiglu", layers=None), cfg.model, layer,
                                       **kwargs)
    return ffn_saved_bytes_per_token(cfg.ffn, cfg.model, layer, **kwargs) - swiglu


def layer_activation_bytes(cfg: Config, on_gpu: bool, layer: int = 0) -> float:
    """Bytes layer `layer` keeps for backward per microbatch; with train.recompute only its input. On a GPU the
    layer's FFN kind counts (megatron's formula stands for a SwiGLU layer); on CPU the formula alone."""
    shape = _activation_shape(cfg, on_gpu)
    tokens = shape.seq_length * shape.micro_batch
    if cfg.train.recompute:
        return tokens * shape.hidden_size * shape.bytes_per_element / (shape.tp if shape.sequence_parallel else 1)
    ffn = ffn_bytes_per_token_vs_swiglu(cfg, layer) * tokens if on_gpu else 0.0
    return megatron_layer_bytes(shape) + ffn


def _zero_shards(cfg: Config) -> tuple[bool, bool, bool]:
    """(optimizer, gradients, weights) sharded over data-parallel ranks."""
    if cfg.train.engine == "deepspeed":
        z = cfg.deepspeed.zero_stage
        return z >= 1, z >= 2, z >= 3
    return cfg.optim.distributed_optimizer, False, False


def estimate(cfg: Config, world_size: int, on_gpu: bool, max_microbatches: int = MAX_SIMULATED_MICROBATCHES) -> Estimate:
    """Per-stage memory of one rank for `cfg` on `world_size` processes (the config must be valid for it).
    Simulating `max_microbatches` is enough when that covers the schedule's warm-up (a few times pp)."""
    from effdist.pipeline.simulate import simulate

    dp = cfg.data_parallel_size(world_size)
    schedule = build_plan_schedule(cfg, world_size, max_microbatches)
    chunks_by_stage = stage_chunks(cfg, schedule)
    params = parameters_per_stage(cfg, chunks_by_stage)
    per_layer = [layer_activation_bytes(cfg, on_gpu, i) for i in range(cfg.model.num_layers)]
    recompute_extra = megatron_layer_bytes(_activation_shape(cfg, on_gpu)) if cfg.train.recompute else 0.0
    simulation = None
    if schedule is None:
        activations = [sum(per_layer) + recompute_extra]
    else:
        chunk_bytes = chunk_activation_bytes(cfg.model.num_layers, schedule.num_chunks, per_layer.__getitem__)
        simulation = simulate(schedule, chunk_bytes=chunk_bytes, check=False)  # validated when built
        activations = [r.peak_activation_bytes + recompute_extra for r in simulation.ranks]
    wb = weight_bytes(cfg, on_gpu)
    shard_opt, shard_grad, shard_weights = _zero_shards(cfg)
    optimizer_per_param = 8 + (0 if wb == 4 else 4)
    offload = cfg.train.engine == "deepspeed"
    logits = cfg.data.seq_length * cfg.train.micro_batch * padded_vocab_size(cfg) / cfg.parallel.tp * 4
    stages = []
    for s, p in enumerate(params):
        n = p.count
        optimizer = 0.0 if offload and cfg.deepspeed.offload_optimizer else n * optimizer_per_param / (dp if shard_opt else 1)
        weights = 0.0 if offload and cfg.deepspeed.offload_params else n * wb / (dp if shard_weights else 1)
        acts = activations[s]
        if cfg.train.recompute and p.head:
            # The logits (and their gradient) are freed by the head's backward before the first layer is
            # recomputed, so the peak holds the larger of the two, not both (measured: llama-1b, micro-batch 8,
            # recompute on an H100, docs/benchmarks.md "Planner validation").
            acts = acts - recompute_extra + max(0.0, recompute_extra - logits)
        stages.append(RankMemory(stage=s, parameters=n, embedding=p.embedding, head=p.head, weights=weights, gradients=n * 4 / (dp if shard_grad else 1),
                                 optimizer=optimizer, activations=acts, logits=logits if p.head else 0.0))
    return Estimate(world_size=world_size, on_gpu=on_gpu, dp=dp, microbatches=_microbatches(cfg, world_size),
                    schedule=schedule, chunks_by_stage=chunks_by_stage, stages=stages, simulation=simulation)


# ---------------------------------------------------------------------- limits

@dataclass(frozen=True)
class MemoryLimit:
    bytes: float
    what: str  # e.g. "GPU memory (NVIDIA H100 80GB HBM3)" or "available host memory"
    ranks_sharing: int  # ranks that share `bytes` (1 per GPU; on CPU every rank of this host)


def host_available_bytes() -> float:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping); total RAM elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def uses_gpu(cfg: Config) -> bool:
    if cfg.parallel.device != "auto":
        return cfg.parallel.device == "cuda"
    import torch

    return torch.cuda.is_available()


def memory_limit(cfg: Config, world_size: int, on_gpu: bool) -> MemoryLimit | None:
    """What the ranks of this host may use; None when planning a GPU run where no GPU is visible."""
    if on_gpu:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return MemoryLimit(float(props.total_memory), f"GPU memory ({props.name})", 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return MemoryLimit(host_available_bytes(), "available host memory", max(1, min(local, world_size)))


# Fields whose size drives memory, with the fix to suggest. The one to name is the field whose reset to the
# built-in default shrinks the estimate most (the value that makes the config absurd).
SIZE_FIELDS: dict[str, str] = {
    "train.micro_batch": "lower train.micro_batch (train.global_batch stays: more microbatches per step), or "
                         "set train.recompute=true",
    "data.seq_length": "shorten data.seq_length, or raise parallel.tp with parallel.sequence_parallel=true",
    "model.hidden_size": "lower model.hidden_size, or spread the model with parallel.tp / parallel.pp",
    "model.num_layers": "lower model.num_layers, or spread the layers with parallel.pp",
    "model.ffn_hidden_size": "lower model.ffn_hidden_size, or spread the model with parallel.tp",
    "model.vocab_size": "lower model.vocab_size, or shard the embedding with parallel.tp",
}


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _culprit(cfg: Config, candidates: Iterable[str], cost) -> str:
    """The candidate field whose reset to the default lowers `cost(cfg)` most."""
    defaults = Config()
    best, best_cost = None, None
    for name in candidates:
        trial = copy.deepcopy(cfg)
        section, key = name.split(".")
        setattr(getattr(trial, section), key, min(_get(cfg, name), _get(defaults, name)))
        try:
            c = cost(trial)
        except (ValueError, ZeroDivisionError):
            continue
        if best_cost is None or c < best_cost:
            best, best_cost = name, c
    return best or next(iter(candidates))


def _gib(x: float) -> str:
    return f"{x / GIB:,.1f} GiB" if x < 1000 * GIB else f"{x / 2**40:,.0f} TiB"


def check_fits(cfg: Config, world_size: int, on_gpu: bool | None = None, limit: MemoryLimit | None = None) -> Estimate:
    """Raise ConfigError naming the field when the run cannot fit (see the module docstring); else the estimate.

    The config must already be validated for `world_size`. `limit` defaults to this machine's memory_limit;
    without one (a GPU run planned where no GPU is visible) only the sizes independent of it are checked."""
    tr = cfg.train
    tokens = tr.steps * tr.global_batch * cfg.data.seq_length
    if tokens > INT64_MAX:
        raise ConfigError(f"train.steps = {tr.steps}: train.steps x train.global_batch x data.seq_length = {tokens:.3g} "
                          "tokens overflow a 64-bit counter; lower train.steps")
    on_gpu = uses_gpu(cfg) if on_gpu is None else on_gpu
    limit = memory_limit(cfg, world_size, on_gpu) if limit is None else limit
    est = estimate(cfg, world_size, on_gpu)
    if limit is not None and not fits(est, limit):
        p = est.peak
        name = _culprit(cfg, SIZE_FIELDS, lambda c: estimate(c, world_size, on_gpu).peak.total)
        ranks = f" x {limit.ranks_sharing} ranks on this host" if limit.ranks_sharing > 1 else ""
        raise ConfigError(
            f"{name} = {_get(cfg, name)}: the estimated memory of pipeline stage {p.stage} is {_gib(p.total)} per rank"
            f"{ranks} (weights {_gib(p.weights)}, gradients {_gib(p.gradients)}, optimizer {_gib(p.optimizer)}, "
            f"activations {_gib(p.activations + p.logits)}), far more than the {_gib(limit.bytes)} of {limit.what}; "
            f"{SIZE_FIELDS[name]} (see `effdist train --dry-run`)")
    host = limit.bytes if limit is not None and not on_gpu else host_available_bytes()
    samples = tr.steps * tr.global_batch
    index_bytes = samples * INDEX_BYTES_PER_SAMPLE
    if index_bytes > host:
        name = "train.global_batch" if tr.global_batch > tr.steps else "train.steps"
        raise ConfigError(f"{name} = {_get(cfg, name)}: megatron's dataset index for train.steps x train.global_batch = "
                          f"{samples:.3g} samples needs at least {_gib(index_bytes)} of host memory "
                          f"({INDEX_BYTES_PER_SAMPLE} bytes a sample), more than the {_gib(host)} available; "
                          f"lower {name}")
    return est


def fits(est: Estimate, limit: MemoryLimit, factor: float = OVERESTIMATE_FACTOR) -> bool:
    """False when the peak rank cannot fit even if the activation estimate is `factor` times too high:
    its exact part (weights, gradients, optimizer state) alone, or the whole estimate / `factor`, exceeds
    its share of the memory."""
    p = est.peak
    share = limit.bytes / limit.ranks_sharing
    return p.weights + p.gradients + p.optimizer <= share and p.total <= factor * share
