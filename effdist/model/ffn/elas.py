"""ELAS FFN: non-gated ReLU² with magnitude 2:4 activation sparsity, optionally low-rank.

    h = fc1(x);  r = relu(h)²;  y = S(r);  out = fc2(y)

S keeps, per token, the 2 largest of every 4 consecutive features of r (effdist.kernels.sparse24;
ties to the lower index, so exactly half the entries survive). The width is elas_expand (1.5) x
ffn_hidden_size, which keeps SwiGLU's parameter count. fc1/fc2 are the spec's linears or, with a
rank, low-rank factorisations (effdist.model.lowrank).

Backward (straight-through estimator, ELAS draft: "backward treats sparsify as identity w.r.t.
its input"):
  ste="identity" (default):  dL/dr = dL/dy            => dL/dh = dL/dy ⊙ 2·relu(h)
  ste="masked":              dL/dr = M ⊙ dL/dy       => dL/dh = M ⊙ dL/dy ⊙ 2·relu(h)
with M the 2:4 keep mask. What is saved for backward follows from the formula:
  identity: h (dense, d_ffn values per token); fc2's input y is rebuilt from h by the fused kernel;
  masked:   only the 2:4-compressed relu(h) (values + 4-bit positions: 0.5625 of d_ffn in bf16),
            from which both y = relu(h)² (for fc2's weight gradient) and 2·relu(h)⊙M come back exactly.
Dense ReLU² (megatron's MLP) saves relu(h) and y: 2·d_ffn.

Dense warm-up: for the first `warmup_steps` optimizer steps S is the identity (plain ReLU², saving
h only); the trainer calls `on_train_step(step)` (0-based, the same on every rank) before each step.

GPU (`sparse_gemm`): fc2's forward GEMM can take the 2:4 operand through cuSPARSELt
(``torch._cslt_compress`` + ``torch._cslt_sparse_mm``, algorithm chosen once per shape by
``torch._cslt_sparse_mm_search``); its backward GEMMs stay dense. "auto" (ffn.elas_sparse_kernels)
takes it, from `sparse_min_tokens` tokens on, where the measured table of this GPU says it is faster at
that shape (effdist.model.ffn.sparse_gemm_table; no timing at run time, so every rank and every run
chooses alike) and runs dense elsewhere; "always" forces it where the shapes allow, "never" disables it.
On an H100 in bf16 it does not pay: compressing the activation alone costs more than the dense GEMM
(tools/bench_ffn.py; docs/sparse_ffn.md; configs/kernel_tables/sparse24-h100.json). That path computes
fc2 with its own autograd function on fc2's (or its sharded factor's) weight, so a B/W-split linear
substituted for fc2 does not defer that weight gradient.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from megatron.core.activations import squared_relu
from megatron.core.tensor_parallel import (
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLP, MLPSubmodules

from effdist.kernels.sparse24 import DECOMPRESS_RELU2_GRAD, DECOMPRESS_SQUARE, decompress24, relu2_grad, sparsify24
from effdist.model.ffn import sparse_gemm_table
from effdist.model.ffn.dense import mlp_config
from effdist.model.ffn.saved import save_compactly
from effdist.model.lowrank import LowRankRowParallelLinear
from effdist.runtime.lifecycle import say

STE_MODES = ("identity", "masked")
SPARSE_GEMM_MODES = ("auto", "always", "never")

# Tokens per microbatch (sequence x batch, per rank) below which "auto" does not even try cuSPARSELt:
# the 2:4 GEMM gain, where there is one, shows only on large GEMMs (platform notes).
SPARSE_GEMM_MIN_TOKENS = 16384


def relu2_dense(h: torch.Tensor) -> torch.Tensor:
    return squared_relu(h)


class _Relu2Sparse24(torch.autograd.Function):
    """h [N, W] -> y = S(relu(h)²) (or relu(h)² when not sparse). See the module doc for backward."""

    @staticmethod
    def forward(ctx, h, sparse: bool, ste: str, sink: list):
        ctx.sparse, ctx.ste, ctx.width = sparse, ste, h.shape[-1]
        if not sparse:
            ctx.save_for_backward(h)
            return relu2_dense(h)
        if ste == "identity":
            y, _, _ = sparsify24(h, relu2=True, write_dense=True, write_compressed=False)
            ctx.save_for_backward(h)
        else:
            y, values, meta = sparsify24(h, relu2=True, write_dense=True, write_compressed=True)
            ctx.save_for_backward(values, meta)
            sink.extend([values, meta])
        return y

    @staticmethod
    def backward(ctx, dy):
        if not ctx.sparse or ctx.ste == "identity":
            (h,) = ctx.saved_tensors
            dh = relu2_grad(dy, h)
        else:
            values, meta = ctx.saved_tensors
            dh = decompress24(values, meta, ctx.width, DECOMPRESS_RELU2_GRAD, grad=dy.contiguous())
        return dh, None, None, None


_ALG_CACHE: dict[tuple, int] = {}


def _cslt_alg(packed: torch.Tensor, dense: torch.Tensor) -> int:
    key = (tuple(packed.shape), tuple(dense.shape), dense.stride(), dense.dtype, dense.device.index)
    if key not in _ALG_CACHE:
        found = torch._cslt_sparse_mm_search(packed, dense)
        _ALG_CACHE[key] = int(found[0] if isinstance(found, (tuple, list)) else found)
    return _ALG_CACHE[key]


def _cslt_matmul(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y Wᵀ with y 2:4-sparse along its rows, through cuSPARSELt."""
    packed = torch._cslt_compress(y)
    dense = weight.t()
    return torch._cslt_sparse_mm(packed, dense, alg_id=_cslt_alg(packed, dense))


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def sparse_gemm_pays(y: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this GPU's measured table (effdist.model.ffn.sparse_gemm_table) has compress + cuSPARSELt beat the
    dense GEMM at y's shape (looked up once per shape and process, which rank 0 says)."""
    return _table_choice(y.device.index, tuple(y.shape), tuple(weight.shape), y.dtype)


@functools.lru_cache(maxsize=None)
def _table_choice(device_index: int, y_shape: tuple[int, int], weight_shape: tuple[int, int], dtype) -> bool:
    choice = sparse_gemm_table.choose(torch.cuda.get_device_name(device_index), y_shape[0], weight_shape[1],
                                      weight_shape[0], _DTYPE_NAMES.get(dtype, str(dtype)))
    say(f"ELAS fc2 2:4 ({y_shape} x weight {weight_shape}): {choice.why}")
    return choice.sparse


class _Sparse24Linear(torch.autograd.Function):
    """out = y Wᵀ with y 2:4-sparse (cuSPARSELt forward, dense backward); y rebuilt from `parts`."""

    @staticmethod
    def forward(ctx, y, weight, rebuild, *parts):
        out = _cslt_matmul(y, weight)
        ctx.rebuild = rebuild
        ctx.save_for_backward(weight, *parts)
        return out

    @staticmethod
    def backward(ctx, dout):
        weight, *parts = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1])
        dy = dout2 @ weight
        dweight = dout2.t() @ ctx.rebuild(parts)
        return (dy, dweight, None) + (None,) * len(parts)


class ElasMLP(MLP):
    """ReLU² FFN with 2:4 activation sparsity (ELAS); fc1/fc2 may be low-rank (see registry)."""

    def __init__(self, config, submodules: MLPSubmodules, *, warmup_steps: int = 0, ste: str = "identity",
                 sparse_gemm: str = "auto", sparse_min_tokens: int = SPARSE_GEMM_MIN_TOKENS,
                 ffn_hidden_size: Optional[int] = None, tp_group=None, **kwargs):
        width = ffn_hidden_size or config.ffn_hidden_size
        if ste not in STE_MODES:
            raise ValueError(f"ELAS straight-through mode = {ste!r}; valid: {', '.join(STE_MODES)}")
        if warmup_steps < 0:
            raise ValueError(f"ELAS warm-up steps = {warmup_steps} must be >= 0")
        if sparse_gemm not in SPARSE_GEMM_MODES:
            raise ValueError(f"ELAS sparse_gemm = {sparse_gemm!r}; valid: {', '.join(SPARSE_GEMM_MODES)}")
        super().__init__(mlp_config(config, width=width, gated=False, activation=squared_relu), submodules,
                         ffn_hidden_size=width, tp_group=tp_group, **kwargs)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self.local_width = width // tp
        if self.local_width % 4:
            raise ValueError(f"ELAS 2:4 sparsity needs the per-rank FFN width ({self.local_width}) divisible by 4")
        self.warmup_steps = warmup_steps
        self.ste = ste
        self.sparse_gemm = sparse_gemm
        self.sparse_min_tokens = sparse_min_tokens
        self.sparsity_active = warmup_steps == 0
        # Whether the last forward ran fc2 through cuSPARSELt (reported by tools/bench_ffn.py).
        self.used_sparse_gemm = False

    def on_train_step(self, step: int) -> None:
        """Dense for steps [0, warmup_steps), 2:4-sparse from then on."""
        self.sparsity_active = step >= self.warmup_steps

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise NotImplementedError("ElasMLP is a dense-layer FFN; per-token (MoE) scales are not supported")
        h, fc1_bias = self.linear_fc1(hidden_states)
        if fc1_bias is not None:
            h = h + fc1_bias
        lead, w = h.shape[:-1], h.shape[-1]
        flat = h.reshape(-1, w)
        sparse = self.sparsity_active
        sink: list = []
        y = _Relu2Sparse24.apply(flat, sparse, self.ste, sink)
        if sparse and self.ste == "masked":
            parts = tuple(sink)

            def rebuild(p):
                return decompress24(p[0], p[1], w, DECOMPRESS_SQUARE)
        else:
            parts = (flat,)

            def rebuild(p):
                if not sparse:
                    return relu2_dense(p[0])
                return sparsify24(p[0], relu2=True, write_dense=True, write_compressed=False)[0]

        self.used_sparse_gemm = sparse and self._use_sparse_gemm(y)
        if self.used_sparse_gemm:
            return self._fc2_sparse(y, parts, rebuild, lead)
        y = y.view(*lead, w)
        with save_compactly(y, parts, lambda p: rebuild(p).view(*lead, w)):
            return self.linear_fc2(y)

    # -------------------------------------------------------------------------------- GPU 2:4 GEMM
    def _sharded_fc2(self):
        fc2 = self.linear_fc2
        return fc2.factor_in if isinstance(fc2, LowRankRowParallelLinear) else fc2

    def _use_sparse_gemm(self, y: torch.Tensor) -> bool:
        if self.sparse_gemm == "never" or not y.is_cuda or y.dtype not in (torch.float16, torch.bfloat16):
            return False
        if not hasattr(torch, "_cslt_sparse_mm"):
            return False
        weight = getattr(self._sharded_fc2(), "weight", None)
        if weight is None or weight.shape[1] != y.shape[1]:
            return False
        n, w = y.shape
        # cuSPARSELt shape rules for a 16-bit sparse operand and its dense partner.
        if n % 16 or w % 16 or weight.shape[0] % 8:
            return False
        if self.sparse_gemm == "always":
            return True
        return n >= self.sparse_min_tokens and sparse_gemm_pays(y, weight)

    def _fc2_sparse(self, y, parts, rebuild, lead):
        fc2 = self._sharded_fc2()
        out = _Sparse24Linear.apply(y, fc2.weight, rebuild, *parts)
        out = out.view(*lead, out.shape[-1])
        if self.config.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if isinstance(self.linear_fc2, LowRankRowParallelLinear):
            return self.linear_fc2.apply_factor_out(out)
        bias = getattr(fc2, "bias", None)
        if bias is None:
            return out, None
        if getattr(fc2, "skip_bias_add", False):
            return out, bias
        return out + bias, None
