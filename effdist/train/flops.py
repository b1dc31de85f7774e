"""Training FLOPs per token: what the GPUs execute, and the dense model of the same shape.

MFU computed from dense FLOPs overstates the work of a model that skips some of it: an EPAS sharing
layer runs only the V part of its fused QKV GEMM, a low-rank ELAS FFN multiplies by two thin factors.
`flops_per_token` counts both, layer by layer (forward + backward, 2 FLOPs per multiply-add):

- ``dense``: every layer computes its own Q/K, every FFN at full rank (the FFN kind's width and
  gating kept). ``metrics.jsonl``'s ``tflops`` and ``mfu`` use this count (their meaning is a contract).
- ``executed``: what the matmuls of this step actually do:
  * EPAS sharing layer: the Q and K projections are not run (6·h·(h + kv_width) fewer per token); the
    attention itself (scores and weighted sum) still runs on the anchor's Q/K. Layers in transition
    (blending) or being probed compute their own Q/K: they count as dense.
  * ELAS with ``ffn.elas_rank = r``: fc1 and fc2 are x->r->width and width->r->h, 2·r·(h + width)
    parameters instead of 2·h·width.
  * ELAS 2:4 sparsity: the dense GEMMs multiply the zeros too, so nothing is saved, except in a layer
    whose fc2 forward ran through cuSPARSELt (``ElasMLP.used_sparse_gemm``): that one GEMM (fc2, or the
    low-rank fc2's first factor) does half its forward multiply-adds.
  * MoC and top-k: training runs fc1 and fc2 as dense GEMMs (the selection only zeroes the activation
    between them; the gathered-channel GEMV is an inference kernel), so they execute their dense count.
  * FP8 linears do the same multiply-adds in another number format: same count.
  Recomputation is not counted (model FLOPs, not hardware FLOPs); norms, RoPE, the activation and the
  EPAS gradient sums are elementwise and negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

from effdist.config import Config, ffn_kind_of_layer, ffn_width_of_layer

GATED_FFN_KINDS = ("swiglu", "moc")


@dataclass(frozen=True)
class FlopsPerToken:
    executed: float
    dense: float

    @property
    def executed_fraction(self) -> float:
        """executed / dense: 1 for a dense model, below 1 where layers skip work."""
        return self.executed / self.dense


def attention_matmul_params(hidden: int, num_heads: int, num_query_groups: int, *, sharing: bool = False) -> int:
    """Multiply-adds per token of one layer's Q, K, V and output projections (GQA: K, V are kv_width wide);
    a sharing layer runs only V and the output projection."""
    kv_width = hidden // num_heads * num_query_groups
    if sharing:
        return hidden * kv_width + hidden * hidden
    return 2 * hidden * hidden + 2 * hidden * kv_width


def ffn_matmul_params(hidden: int, width: int, *, gated: bool, rank: int | None = None) -> int:
    """Multiply-adds per token of one FFN: 3·h·width gated (gate, up, down), 2·h·width not, and
    2·rank·(h + width) when fc1 and fc2 are low-rank factorised."""
    if rank is not None:
        return 2 * rank * (hidden + width)
    return (3 if gated else 2) * hidden * width


def causal_attention_flops(hidden: int, seq: int) -> float:
    """Scores and weighted sum of one layer per token, forward + backward, causal half: 6·h·S."""
    return 6.0 * hidden * seq


def flops_per_token(cfg: Config, sharing_layers: int = 0, sparse_fc2_layers: int = 0) -> FlopsPerToken:
    """Executed and dense training FLOPs per token of the whole model (all ranks together).

    `sharing_layers`: the EPAS region size this step (the ``epas_region`` metric). `sparse_fc2_layers`:
    ELAS layers whose fc2 forward ran through cuSPARSELt this step."""
    m = cfg.model
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    if not 0 <= sharing_layers < max(m.num_layers, 1):
        raise ValueError(f"flops_per_token: sharing_layers={sharing_layers} must lie in [0, num_layers - 1 = "
                         f"{m.num_layers - 1}] (layer 0 always computes its own Q/K)")
    dense_params = executed_params = 0
    sparse_saving = 0.0
    elas_layers = 0
    for layer in range(m.num_layers):
        kind, width = ffn_kind_of_layer(cfg, layer), ffn_width_of_layer(cfg, layer)
        gated = kind in GATED_FFN_KINDS
        attention = attention_matmul_params(m.hidden_size, heads, groups)
        dense_params += attention + ffn_matmul_params(m.hidden_size, width, gated=gated)
        rank = cfg.ffn.elas_rank if kind == "elas" else None
        executed_params += attention + ffn_matmul_params(m.hidden_size, width, gated=gated, rank=rank)
        if kind == "elas":
            elas_layers += 1
            # Half the forward multiply-adds (2 FLOPs each) of the GEMM that takes the 2:4 operand.
            sparse_saving = 0.5 * 2 * width * (rank if rank is not None else m.hidden_size)
    if sparse_fc2_layers > elas_layers:
        raise ValueError(f"flops_per_token: sparse_fc2_layers={sparse_fc2_layers} exceeds the {elas_layers} ELAS layers")
    skipped_qk = sharing_layers * (attention_matmul_params(m.hidden_size, heads, groups)
                                   - attention_matmul_params(m.hidden_size, heads, groups, sharing=True))
    lm_head = m.hidden_size * m.vocab_size
    attention_core = m.num_layers * causal_attention_flops(m.hidden_size, cfg.data.seq_length)
    dense = 6.0 * (dense_params + lm_head) + attention_core
    executed = 6.0 * (executed_params - skipped_qk + lm_head) + attention_core - sparse_fc2_layers * sparse_saving
    return FlopsPerToken(executed=executed, dense=dense)
