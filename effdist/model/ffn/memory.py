"""Bytes one FFN layer saves for backward, per token, by kind: the saved-tensor accounting of docs/sparse_ffn.md
("Memory per token"), which tests/test_ffn_modules.py measures with saved-tensor hooks.

Per token, with h the hidden size, w the FFN width of the kind on this rank, K (MoC) or k (top-k) the kept
channels and e bytes per 16-bit or fp32 element (the activation dtype):

    swiglu  x, [G | U], Z                        e·(h + 3w)    effdist's fused SwiGLU (train.fused_kernels)
            x, [G | U], SiLU(G), U (a copy), Z   e·(h + 5w)    megatron's own MLP
    relu2   x, H, relu(H)²                       e·(h + 2w)
    moc     x, G and U at K channels, indices    e·(h + 2K) + i·K
    topk    x, H at k channels, indices          e·(h + k) + i·k
    elas    x, H (identity straight-through)     e·(h + w)
            x, the 2:4-compressed activation     e·(h + w/2) + ⌈w/8⌉ (ste = masked)

i is the index width (2 bytes while w < 32768). MoC, top-k and ELAS hand fc2 a recipe instead of its dense input
Z (effdist.model.ffn.saved); `dense_fc2_input_bytes` is what that input would cost, e·w.
"""

from __future__ import annotations

import math

from effdist.config import FFNConfig, ModelConfig, resolve_count

COMPACT_KINDS = ("moc", "topk", "elas")  # the kinds whose fc2 input is a recipe, not a saved tensor


def _index_bytes(width: int) -> int:
    return 2 if width <= 32767 else 4  # effdist.model.ffn.selection.index_dtype


def ffn_width_on_rank(ffn: FFNConfig, model: ModelConfig, layer: int, tp: int = 1) -> int:
    return ffn.width_of_layer(model, layer) // tp


def saved_bytes_per_token(ffn: FFNConfig, model: ModelConfig, layer: int = 0, *, element_bytes: int = 2,
                          fused_swiglu: bool = True, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes the FFN of global layer `layer` saves for backward per token on one tensor-parallel rank.

    The fc1 input x is the full hidden vector on every rank, or 1/tp of it under sequence parallelism (megatron
    saves the shard and gathers it again in backward)."""
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
        return e * (h + 2 * k) + _index_bytes(w) * k
    if kind == "topk":
        k = min(resolve_count(ffn.topk_k, ffn.width_of_layer(model, layer)), w)
        return e * (h + k) + _index_bytes(w) * k
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
