"""Activation bytes per microbatch, per layer and per pipeline chunk, from a model config.

Formula: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", for one
transformer layer, 16-bit activations, no recompute (s = sequence, b = micro-batch, h = hidden, a = heads,
t = tensor-parallel size):

    no tensor parallel:        s*b*h * (34 + 5*a*s/h)                 bytes
    tensor parallel:           s*b*h * (10 + 24/t + 5*a*s/(h*t))
    tensor + sequence parallel: s*b*h * (34 + 5*a*s/h) / t

The 5*a*s/h term is the attention score matrix, its softmax, dropout mask and dropout output. With flash/SDPA
attention (what effdist uses) none of those are stored, so `flash_attention=True` (the default) drops the term.
The 34 counts GeLU-MLP (4h) tensors and dropout masks as in GPT; for a LLaMA layer it is an approximation that
keeps the comparison between schedules exact (every schedule uses the same per-layer number). fp32 activations
double everything. Embedding, final norm, logits and loss are not counted.

Hooks: every function that sums layers takes `layer_bytes(layer_index) -> bytes`, so variants can count their own
layers, e.g. EPAS sharing layers that keep no Q/K projections, or sparse FFNs that store a compressed activation:

    base = megatron_layer_bytes(shape)
    chunk_activation_bytes(shape.num_layers, num_chunks, lambda i: base - saved if i in region else base)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from effdist.config import FFNConfig, ModelConfig, resolve_count

LayerBytes = Callable[[int], float]


@dataclass(frozen=True)
class ActivationShape:
    seq_length: int
    micro_batch: int
    hidden_size: int
    num_attention_heads: int
    num_layers: int
    tp: int = 1
    sequence_parallel: bool = False
    bytes_per_element: int = 2
    flash_attention: bool = True

    def __post_init__(self) -> None:
        for name in ("seq_length", "micro_batch", "hidden_size", "num_attention_heads", "num_layers", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ActivationShape.{name} = {value!r}: must be a positive integer")
        if self.bytes_per_element not in (2, 4):
            raise ValueError(f"ActivationShape.bytes_per_element = {self.bytes_per_element}: use 2 (bf16/fp16) or 4 (fp32)")


def megatron_layer_bytes(shape: ActivationShape) -> float:
    """Bytes one transformer layer stores for one microbatch (see the module docstring)."""
    s, b, h, a, t = shape.seq_length, shape.micro_batch, shape.hidden_size, shape.num_attention_heads, shape.tp
    scores = 0.0 if shape.flash_attention else 5.0 * a * s / h
    if shape.sequence_parallel or t == 1:
        per_element = (34.0 + scores) / t
    else:
        per_element = 10.0 + 24.0 / t + scores / t
    return s * b * h * per_element * (shape.bytes_per_element / 2)


def layer_partition(num_layers: int, num_chunks: int) -> list[range]:
    """Contiguous layer ranges of each chunk, as even as possible; earlier chunks take the remainder."""
    if num_chunks < 1 or num_layers < num_chunks:
        raise ValueError(f"cannot split {num_layers} layers into {num_chunks} chunks: every chunk needs at least one layer "
                         "(use fewer pipeline ranks or chunks, or more layers)")
    base, extra = divmod(num_layers, num_chunks)
    out, start = [], 0
    for c in range(num_chunks):
        size = base + (1 if c < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def chunk_activation_bytes(num_layers: int, num_chunks: int, layer_bytes: LayerBytes) -> list[float]:
    """Bytes per microbatch that each chunk stores: the sum of its layers' `layer_bytes`."""
    return [float(sum(layer_bytes(i) for i in layers)) for layers in layer_partition(num_layers, num_chunks)]


def shape_from_config(cfg: Any, flash_attention: bool = True) -> ActivationShape:
    """ActivationShape of an effdist Config: model.hidden_size, data.seq_length, train.micro_batch,
    model.num_layers, parallel.tp/sequence_parallel; train.dtype fp32 -> 4 bytes, else (bf16, fp16, auto on GPU) 2."""
    return ActivationShape(
        seq_length=cfg.data.seq_length,
        micro_batch=cfg.train.micro_batch,
        hidden_size=cfg.model.hidden_size,
        num_attention_heads=cfg.model.num_attention_heads,
        num_layers=cfg.model.num_layers,
        tp=cfg.parallel.tp,
        sequence_parallel=cfg.parallel.sequence_parallel,
        bytes_per_element=4 if cfg.train.dtype == "fp32" else 2,
        flash_attention=flash_attention,
    )


# ---------------------------------------------------------------------------------------------- FFN kinds
#
# Bytes one FFN layer saves for backward, per token, by kind: the saved-tensor accounting of docs/sparse_ffn.md
# ("Memory per token"), which tests/test_ffn_modules.py measures with saved-tensor hooks.
#
# Per token, with h the hidden size, w the FFN width of the kind on this rank, K (MoC) or k (top-k) the kept
# channels and e bytes per 16-bit or fp32 element (the activation dtype):
#
#     swiglu  x, [G | U], Z                        e·(h + 3w)    effdist's fused SwiGLU (train.fused_kernels)
#             x, [G | U], SiLU(G), U (a copy), Z   e·(h + 5w)    megatron's own MLP
#     relu2   x, H, relu(H)²                       e·(h + 2w)
#     moc     x, G and U at K channels, selection  e·(h + 2K) + sel
#     topk    x, H at k channels, selection        e·(h + k) + sel
#     elas    x, H (identity straight-through)     e·(h + w)
#             x, the 2:4-compressed activation     e·(h + w/2) + ⌈w/8⌉ (ste = masked)
#
# sel is which channels: a bit mask of the row, 4·⌈w/32⌉ bytes, where the selection is a plain top-K on one rank
# (tp = 1, not MoC's 2:8); else K indices of i bytes (2 while w < 32768). MoC, top-k and ELAS hand fc2 a recipe
# instead of its dense input Z (effdist.model.ffn.saved); `dense_fc2_input_bytes` is what that input would cost, e·w.

COMPACT_FFN_KINDS = ("moc", "topk", "elas")  # the kinds whose fc2 input is a recipe, not a saved tensor


def _selection_bytes(width: int, k: int, plain_topk: bool) -> int:
    """Bytes a token's selection of k of `width` channels takes (effdist.model.ffn.channel): a bit mask for a plain
    top-K on one rank (ChannelSelectMLP.fused_topk), else the indices (effdist.model.ffn.selection.index_dtype)."""
    if plain_topk:
        return 4 * math.ceil(width / 32)
    return (2 if width <= 32767 else 4) * k


def ffn_width_on_rank(ffn: FFNConfig, model: ModelConfig, layer: int, tp: int = 1) -> int:
    return ffn.width_of_layer(model, layer) // tp


def ffn_saved_bytes_per_token(ffn: FFNConfig, model: ModelConfig, layer: int = 0, *, element_bytes: int = 2,
                              fused_swiglu: bool = True, tp: int = 1, sequence_parallel: bool = False,
                              selection_as_mask: bool | None = None) -> float:
    """Bytes the FFN of global layer `layer` saves for backward per token on one tensor-parallel rank.

    The fc1 input x is the full hidden vector on every rank, or 1/tp of it under sequence parallelism (megatron
    saves the shard and gathers it again in backward). A plain top-K's selection is a bit mask or indices as
    `ffn.save_selection` says; `selection_as_mask=False` counts indices whatever it says (for runs measured
    before 2026-12-07, when indices were all there was)."""
    if selection_as_mask is None:
        selection_as_mask = ffn.save_selection == "mask"
    kind = ffn.kind_of_layer(layer)
    e, h = element_bytes, model.hidden_size / (tp if sequence_parallel else 1)
    w = ffn_width_on_rank(ffn, model, layer, tp)
    if kind == "swiglu":
        return e * (h + (3 if fused_swiglu else 5) * w)
    if kind == "relu2":
        return e * (h + 2 * w)
    if kind == "moc":
        full = ffn.width_of_layer(model, layer)
        k = full // 4 if ffn.moc_structured else resolve_count(ffn.moc_k, full)
        k = min(k, w)  # a rank keeps at most its own channels (tensor parallelism)
        return e * (h + 2 * k) + _selection_bytes(w, k, selection_as_mask and tp == 1 and not ffn.moc_structured)
    if kind == "topk":
        k = min(resolve_count(ffn.topk_k, ffn.width_of_layer(model, layer)), w)
        return e * (h + k) + _selection_bytes(w, k, selection_as_mask and tp == 1)
    if kind == "elas":
        if ffn.elas_rank is not None:
            raise NotImplementedError("the saved bytes of low-rank ELAS (ffn.elas_rank) are not modelled")
        if ffn.elas_ste == "masked":
            return e * (h + w / 2) + math.ceil(w / 8)
        return e * (h + w)
    raise ValueError(f"ffn.kind = {kind!r}: no saved-bytes model")


def dense_fc2_input_bytes(ffn: FFNConfig, model: ModelConfig, layer: int = 0, *, element_bytes: int = 2,
                          tp: int = 1) -> float:
    """Bytes per token of fc2's dense input (what a compact kind replaces by a recipe)."""
    return element_bytes * ffn_width_on_rank(ffn, model, layer, tp)
