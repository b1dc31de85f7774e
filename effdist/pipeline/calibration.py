"""Measured costs and the time model built on them: `effdist calibrate` (effdist.train.calibrate) writes a
calibration, `effdist plan` and `effdist simulate --calibration` turn it into seconds.

    effdist calibrate --config configs/llama-1b.yaml --micro-batches 1,2,4,8 --variants dense,epas,moc --out cal.json

What is measured (one GPU, one process, the model's real layers built by effdist.model.gpt.build_gpt):
  per decoder layer, per micro-batch size and per variant (dense, EPAS sharing layer, each FFN kind):
  the forward time and the backward time of one microbatch. A model of L1 and of L2 layers is timed
  (forward; forward + backward), the two back to back in each repetition, and the median of the paired
  differences divided by L2 - L1 is one layer; what is left of the L1 model is the embedding, final norm, LM
  head and loss ("head"). A layer time at or below zero (noise larger than L2 - L1 layers' work) is measured
  again with more repetitions, then refused (effdist.train.calibrate).
  How a call is timed ("timing"): "wall" (the default, and every table before "timing" existed) is wall clock
  around a call synchronized on both sides, which also counts the host's launch time where that exceeds the
  GPU's work (llama-1b at micro-batch 1 on an H100: a layer's forward 1.82 ms against 0.41 ms of GPU work).
  "gpu" is the span between CUDA events around the call while the GPU is held busy until the host has queued
  all of its kernels: the GPU's work alone, linear in the micro-batch. Measured steps follow neither alone:
  llama-1b at pp=1 runs 10-21% slower than the gpu table predicts (the bare layers calibrate times leave out
  work the trainer's step does) and within 5% of two wall tables from micro-batch 4 up (at micro-batch 2 the
  host's share differs between runs: 0.92 and 0.66); docs/benchmarks.md, "Timing the layers", compares both
  against every measured run.
  The backward is split into input-gradient (B) and weight-gradient (W) parts by FLOPs: W is the weight GEMMs
  of the linear layers, B their input GEMMs plus the attention backward (`weight_grad_fraction`). The
  pipeline executor's deferred W runs exactly those GEMMs, so the split is the GEMM share, not a guess.
  The optimizer step: seconds per parameter of AdamW over fp32 masters (a 64M-parameter model, timed).
Links (p2p, tensor-parallel and data-parallel collectives) can only be measured with several GPUs; on one GPU
the file keeps `links` from the defaults below and says so in `links.source`.

The file (JSON, "format": "effdist-calibration/1"):
  {"format", "device", "date", "command", "timing" ("gpu" or "wall"; absent in files before it: "wall"),
   "model": {"hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size",
             "seq_length", "dtype"},
   "layers": [{"variant", "micro_batch", "forward_s", "backward_s", "weight_grad_fraction"}, ...],
   "head":   [{"micro_batch", "forward_s", "backward_s"}, ...],
   "optimizer_s_per_param": float,
   "links": {"p2p_gbps", "tp_gbps", "dp_gbps", "latency_s", "source"}}
Bandwidths are bus bandwidths in GB/s (1e9 bytes/s) as nccl-tests report them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "effdist-calibration/1"
CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "configs" / "calibrations"  # shipped tables
TIMINGS = ("gpu", "wall")  # how a measured call is timed (module docstring)
VARIANTS = ("dense", "epas", "swiglu", "relu2", "topk", "moc", "elas")  # FFN kinds by their ffn.kind name
# Link speeds used when a calibration has no multi-GPU measurement: NVLink 4 (H100/H200 SXM) bus bandwidth
# as nccl-tests reach it within one node, and 400 Gb/s InfiniBand per GPU across nodes (effective ~45 GB/s).
DEFAULT_LINKS = {"p2p_gbps": 150.0, "tp_gbps": 360.0, "dp_gbps": 360.0, "inter_node_gbps": 45.0,
                 "latency_s": 2e-5, "source": "defaults (NVLink 4 within a node, 400 Gb/s InfiniBand between nodes); "
                                              "not measured"}


class CalibrationError(ValueError):
    """A calibration file that cannot be used for this model."""


@dataclass(frozen=True)
class LayerCost:
    variant: str
    micro_batch: int
    forward_s: float
    backward_s: float
    weight_grad_fraction: float


@dataclass(frozen=True)
class HeadCost:
    micro_batch: int
    forward_s: float
    backward_s: float


@dataclass
class Calibration:
    device: str
    model: dict[str, Any]
    layers: list[LayerCost]
    head: list[HeadCost]
    optimizer_s_per_param: float
    links: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LINKS))
    date: str = ""
    command: str = ""
    path: str = ""
    timing: str = "wall"  # see the module docstring; TIMINGS

    # ---------------------------------------------------------------- file

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "device": self.device, "date": self.date, "command": self.command,
                "timing": self.timing, "model": self.model,
                "layers": [vars(c) for c in self.layers], "head": [vars(c) for c in self.head],
                "optimizer_s_per_param": self.optimizer_s_per_param, "links": self.links}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "calibration") -> "Calibration":
        if data.get("format") != FORMAT:
            raise CalibrationError(f"{where}: format = {data.get('format')!r}; expected {FORMAT!r} "
                                   "(write one with `effdist calibrate`)")
        try:
            layers = [LayerCost(**c) for c in data["layers"]]
            head = [HeadCost(**c) for c in data["head"]]
            links = {**DEFAULT_LINKS, **data.get("links", {})}
            cal = cls(device=data["device"], model=data["model"], layers=layers, head=head,
                      optimizer_s_per_param=float(data["optimizer_s_per_param"]), links=links,
                      date=data.get("date", ""), command=data.get("command", ""), path=where,
                      timing=data.get("timing", "wall"))
        except (KeyError, TypeError) as e:
            raise CalibrationError(f"{where}: not a calibration file ({e}); write one with `effdist calibrate`") from None
        for c in cal.layers:
            if c.variant not in VARIANTS:
                raise CalibrationError(f"{where}: layer variant {c.variant!r}; valid: {', '.join(VARIANTS)}")
            for name in ("forward_s", "backward_s"):
                v = getattr(c, name)
                if not (math.isfinite(v) and v > 0):
                    raise CalibrationError(f"{where}: {c.variant} micro-batch {c.micro_batch}: {name} = {v}; must be > 0")
        if cal.timing not in TIMINGS:
            raise CalibrationError(f"{where}: timing = {cal.timing!r}; valid: {', '.join(TIMINGS)}")
        if not cal.layers or not cal.head:
            raise CalibrationError(f"{where}: no layer or head measurements")
        return cal

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise CalibrationError(f"--calibration {path}: no such file (shipped ones: "
                                   f"{', '.join(shipped_names()) or 'none'})") from None
        except json.JSONDecodeError as e:
            raise CalibrationError(f"--calibration {path}: not JSON ({e})") from None
        return cls.from_dict(data, str(path))

    # ---------------------------------------------------------------- lookups

    def variants(self) -> set[str]:
        return {c.variant for c in self.layers}

    def layer(self, variant: str, micro_batch: int) -> LayerCost:
        """Cost of one layer of `variant` at `micro_batch`: measured, or linear in the micro-batch between the
        two nearest measured sizes (beyond them: proportional to the nearest, the time per token held)."""
        rows = sorted((c for c in self.layers if c.variant == variant), key=lambda c: c.micro_batch)
        if not rows:
            raise CalibrationError(f"{self.path}: no measurement of layer variant {variant!r} "
                                   f"(measured: {', '.join(sorted(self.variants()))}); run `effdist calibrate "
                                   f"--variants {variant}`")
        f, b = _interpolate([(c.micro_batch, (c.forward_s, c.backward_s)) for c in rows], micro_batch)
        frac = min(rows, key=lambda c: abs(c.micro_batch - micro_batch)).weight_grad_fraction
        return LayerCost(variant, micro_batch, f, b, frac)

    def head_cost(self, micro_batch: int) -> HeadCost:
        rows = sorted(self.head, key=lambda c: c.micro_batch)
        f, b = _interpolate([(c.micro_batch, (c.forward_s, c.backward_s)) for c in rows], micro_batch)
        return HeadCost(micro_batch, f, b)

    def check_shape(self, cfg) -> list[str]:
        """Model fields where the config differs from the calibrated shape (the planner scales by FLOPs then)."""
        want = model_shape(cfg)
        return [k for k in ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                            "vocab_size", "seq_length") if self.model.get(k) != want[k]]

    def shape_difference(self, cfg) -> str:
        """The fields of `check_shape`, readable: `hidden_size 2048 measured, 4096 here; ...`."""
        want = model_shape(cfg)
        return "; ".join(f"{k} {self.model.get(k)} measured, {want[k]} here" for k in self.check_shape(cfg))


def _interpolate(points: list[tuple[int, tuple[float, float]]], x: int) -> tuple[float, float]:
    xs = [p[0] for p in points]
    if x in xs:
        return points[xs.index(x)][1]
    if x < xs[0] or x > xs[-1] or len(points) == 1:
        near = points[0] if x < xs[0] else points[-1]
        scale = x / near[0]
        return near[1][0] * scale, near[1][1] * scale
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 < x < x1:
            t = (x - x0) / (x1 - x0)
            return y0[0] + t * (y1[0] - y0[0]), y0[1] + t * (y1[1] - y0[1])
    raise AssertionError("unreachable")


def model_shape(cfg) -> dict[str, Any]:
    """The shape a calibration was measured at ("dense" layers have FFN kind `ffn_kind`)."""
    m = cfg.model
    return {"hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups or m.num_attention_heads, "ffn_hidden_size": m.ffn_hidden_size,
            "vocab_size": m.vocab_size, "seq_length": cfg.data.seq_length, "ffn_kind": cfg.ffn.kind,
            "dtype": cfg.train.dtype}


def shipped_names() -> list[str]:
    return sorted(p.stem for p in CALIBRATION_DIR.glob("*.json"))


def resolve(name_or_path: str) -> Calibration:
    """A calibration file path, or the name of a shipped one (e.g. h100-llama-1b)."""
    shipped = CALIBRATION_DIR / f"{name_or_path}.json"
    return Calibration.load(shipped if shipped.exists() and not Path(name_or_path).exists() else name_or_path)


# ---------------------------------------------------------------------------- FLOPs of one layer

def layer_matmul_flops(cfg, variant: str, tokens: int) -> tuple[float, float]:
    """(linear-layer GEMM FLOPs, attention FLOPs) of one layer's forward for `tokens` tokens (one sequence
    length); see effdist.train.metrics for the conventions. EPAS sharing layers skip the Q and K projections."""
    from effdist.config import ffn_width

    m = cfg.model
    h, heads = m.hidden_size, m.num_attention_heads
    kv = h // heads * (m.num_query_groups or heads)
    q_k = h * h + h * kv
    attn_params = 2 * h * h + 2 * h * kv
    if variant == "epas":
        attn_params -= q_k
    kind = cfg.ffn.kind if variant in ("dense", "epas") else variant
    width = ffn_width(cfg) if kind == cfg.ffn.kind else m.ffn_hidden_size
    gated = kind in ("swiglu", "moc")
    ffn_params = (3 if gated else 2) * h * width
    linear = 2.0 * tokens * (attn_params + ffn_params)
    attention = 2.0 * tokens * cfg.data.seq_length * h  # causal: half of 2 x 2 x S x h per token
    return linear, attention


def weight_grad_fraction(cfg, variant: str) -> float:
    """Share of a layer's backward FLOPs that are weight-gradient GEMMs (the W of a B/W split)."""
    linear, attention = layer_matmul_flops(cfg, variant, 1)
    return linear / (2 * linear + 2 * attention)




# ---------------------------------------------------------------------------- the time model

def _with_shape(cfg, shape: dict[str, Any]):
    """A copy of `cfg` with the calibrated model shape (to count the FLOPs the calibration measured)."""
    import copy

    c = copy.deepcopy(cfg)
    for key in ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
        if key in shape:
            setattr(c.model, key, shape[key])
    c.data.seq_length = shape.get("seq_length", c.data.seq_length)
    c.ffn.kind = shape.get("ffn_kind", c.ffn.kind)
    return c


def _scaled(cal: Calibration, cfg, variant: str, micro_batch: int) -> tuple[float, float, float]:
    """(forward, backward, weight-grad fraction) of one layer of `variant` at tp=1 for `cfg`'s shape: the measured
    cost, times the FLOP ratio where the config's shape differs from the calibrated one."""
    row = cal.layer(variant, micro_batch)
    if not cal.check_shape(cfg):
        return row.forward_s, row.backward_s, row.weight_grad_fraction
    ref = _with_shape(cfg, cal.model)
    mine = sum(layer_matmul_flops(cfg, variant, micro_batch * cfg.data.seq_length))
    theirs = sum(layer_matmul_flops(ref, variant, micro_batch * ref.data.seq_length))
    scale = mine / theirs
    return row.forward_s * scale, row.backward_s * scale, weight_grad_fraction(cfg, variant)


def layer_cost(cal: Calibration, cfg, ffn_kind: str, sharing: bool, micro_batch: int) -> tuple[float, float, float]:
    """(forward, input-gradient B, weight-gradient W) seconds of one decoder layer on one tensor-parallel rank,
    compute only (collectives: `tp_comm_seconds`). An EPAS sharing layer with another FFN kind costs that kind's
    layer minus what sharing saves on the calibrated dense layer."""
    dense_kind = cal.model.get("ffn_kind", "swiglu")
    variant = "dense" if ffn_kind == dense_kind else ffn_kind
    f, b, frac = _scaled(cal, cfg, variant, micro_batch)
    if sharing:
        if "epas" not in cal.variants():
            raise CalibrationError(f"{cal.path}: EPAS sharing layers were not measured; run `effdist calibrate "
                                   "--variants dense,epas`")
        df, db, _ = _scaled(cal, cfg, "dense", micro_batch)
        ef, eb, efrac = _scaled(cal, cfg, "epas", micro_batch)
        f, b = f - (df - ef), b - (db - eb)
        frac = efrac if variant == "dense" else frac
    tp = cfg.parallel.tp
    return f / tp, b * (1 - frac) / tp, b * frac / tp


def ring_seconds(nbytes: float, ranks: int, gbps: float, latency_s: float, all_reduce: bool) -> float:
    """A ring all-reduce (2(n-1)/n of the bytes) or all-gather / reduce-scatter ((n-1)/n) at bus bandwidth `gbps`."""
    if ranks <= 1:
        return 0.0
    factor = (2.0 if all_reduce else 1.0) * (ranks - 1) / ranks
    return factor * nbytes / (gbps * 1e9) + (ranks - 1) * latency_s


def activation_bytes(cfg, micro_batch: int) -> float:
    """Bytes of one layer's input/output for one microbatch (bf16), whole hidden size."""
    return 2.0 * micro_batch * cfg.data.seq_length * cfg.model.hidden_size


def tp_comm_seconds(cfg, cal: Calibration, micro_batch: int) -> float:
    """Tensor-parallel collectives of one layer, forward or backward (each does the same volume): after the
    attention and after the FFN one all-reduce, or with sequence parallelism an all-gather plus a
    reduce-scatter (the same bytes on the wire)."""
    t = cfg.parallel.tp
    links = cal.links
    return 2 * ring_seconds(activation_bytes(cfg, micro_batch), t, links["tp_gbps"], links["latency_s"], all_reduce=True)


@dataclass(frozen=True)
class ChunkSeconds:
    forward: float
    backward_input: float
    backward_weight: float


def chunk_seconds(cal: Calibration, cfg, layers: range, micro_batch: int, sharing: frozenset[int]) -> ChunkSeconds:
    """One microbatch through the layers of one pipeline chunk, plus the embedding / LM head and loss where the
    chunk holds the first / last layer; train.recompute adds a forward to the backward."""
    from effdist.config import ffn_kind_of_layer

    f = b = w = 0.0
    for i in layers:
        lf, lb, lw = layer_cost(cal, cfg, ffn_kind_of_layer(cfg, i), i in sharing, micro_batch)
        f, b, w = f + lf, b + lb, w + lw
    if cfg.train.recompute:
        b += f
    comm = tp_comm_seconds(cfg, cal, micro_batch) * len(layers)
    if layers.stop == cfg.model.num_layers:  # head time measured with the embedding: both on one rank at pp=1
        head = cal.head_cost(micro_batch)
        scale = (cfg.model.vocab_size * cfg.data.seq_length) / (cal.model["vocab_size"] * cal.model["seq_length"]) \
            * cfg.model.hidden_size / cal.model["hidden_size"]
        f += head.forward_s * scale / cfg.parallel.tp
        b += head.backward_s * scale / cfg.parallel.tp
    return ChunkSeconds(f + comm, b + comm, w)


def final_region_layers(cfg) -> frozenset[int]:
    """The layers that share Q/K once EPAS reaches its final region (the deepest ones); none without EPAS."""
    if not cfg.epas.enabled:
        return frozenset()
    from effdist.config import epas_final_region

    n = epas_final_region(cfg)
    return frozenset(range(cfg.model.num_layers - n, cfg.model.num_layers))


def p2p_seconds(cfg, cal: Calibration, micro_batch: int, inter_node: bool = False) -> float:
    """Sending one microbatch's activation (or its gradient) to the next pipeline stage."""
    nbytes = activation_bytes(cfg, micro_batch) / (cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
    gbps = cal.links["inter_node_gbps"] if inter_node else cal.links["p2p_gbps"]
    return nbytes / (gbps * 1e9) + cal.links["latency_s"]


def pipeline_chunk_costs(cal: Calibration, cfg, num_chunks: int, micro_batch: int, sharing: frozenset[int],
                         inter_node: bool = False):
    """One simulate.Costs per chunk of a schedule of `num_chunks` chunks (chunk c holds the layers
    `layer_partition(num_layers, num_chunks)[c]`), in seconds of one microbatch through that chunk as a whole:
    `chunk_seconds`, so only the chunk with the last layer carries the LM head and loss. Each has comm = the p2p
    send. Give them to `simulate(..., chunk_costs=...)`."""
    from effdist.pipeline.memory_model import layer_partition
    from effdist.pipeline.simulate import Costs

    comm = p2p_seconds(cfg, cal, micro_batch, inter_node)
    parts = [chunk_seconds(cal, cfg, r, micro_batch, sharing) for r in layer_partition(cfg.model.num_layers, num_chunks)]
    # Costs wants positive times; a chunk without weight GEMMs would have W = 0.
    return [Costs(forward=p.forward, backward_input=p.backward_input, backward_weight=max(p.backward_weight, 1e-12),
                  comm=comm) for p in parts]


def pipeline_costs(cal: Calibration, cfg, num_chunks: int, micro_batch: int, sharing: frozenset[int],
                   inter_node: bool = False):
    """simulate.Costs in seconds per 1F1B stage (num_chunks / pp chunks) with every chunk charged as the slowest
    one: the summary `effdist simulate --calibration` prints and hands the schedule generators. Step times use
    each chunk's own cost (`pipeline_chunk_costs`), since the head and loss sit on one chunk only."""
    from effdist.pipeline.simulate import Costs

    parts = pipeline_chunk_costs(cal, cfg, num_chunks, micro_batch, sharing, inter_node)
    per_stage = num_chunks / cfg.parallel.pp
    return Costs(forward=max(p.forward for p in parts) * per_stage,
                 backward_input=max(p.backward_input for p in parts) * per_stage,
                 backward_weight=max(max(p.backward_weight for p in parts) * per_stage, 1e-12),
                 comm=parts[0].comm)
