"""The FFN of one inference layer, for every trained FFN kind: dense math, and sparse decode.

Each class holds a layer's FFN weights as plain tensors and offers two functions of the
post-norm hidden state x:

* ``dense(x)`` [..., h]: exactly what the training module computes in eval mode, over all channels
  (fc1 GEMM, the kind's activation and selection written into a dense activation, fc2 GEMM). Prefill
  and the no-cache reference run it; it is the "dense-math reference" sparse decode is held to.
* ``decode(x)`` [b, h]: the same function for one token per sequence, reading only the FFN weight
  rows of the channels each token keeps (effdist.kernels.gather_gemv: Triton on GPU, torch on CPU):

  kind    selection (per token)                       what decode reads
  swiglu  none                                        all of fc1 and fc2 (dense)
  relu2   channels with relu(h) > 0                   all of fc1; fc2 at the active channels
  topk    the k largest of h (ffn.topk_k)             all of fc1; fc2 at the k channels
  elas    2:4 of relu(h)² (after warm-up), non-zeros  all of fc1 (both low-rank factors); fc2's
                                                      input factor (or fc2) at the active channels
  moc     the K largest gate pre-activations          the gate rows of fc1; up rows and fc2 at the
          (or top 2 of every 8 with 2:8)              K channels, SiLU(g)·u fused into the up GEMV

  Non-gated kinds must compute all of fc1 to know which activations are non-zero; only the down
  projection is sparse. MoC chooses on the gate alone, so its up and down projections are both sparse.
  Past `sparse_batch_limit()` tokens (width / rows a token reads) the gathers would read more bytes
  than the dense projections, and decode runs `dense` instead.

fc2 (or the input factor of a low-rank fc2) is stored transposed, [F, h]: an active channel is then
one contiguous row, which is what lets a gather-GEMV read it at full memory bandwidth. The dense
path multiplies by the same tensor's transpose.

Selection is the training code's own (effdist.model.ffn.selection, effdist.kernels.sparse24), so
decode keeps the channels the dense math keeps; the two differ only in the order of floating-point
sums (see docs/inference.md, "Sparse FFN decode").
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from effdist.kernels.channel_select import select_activate
from effdist.kernels.gather_gemv import compact_active, gather_rows_combine, gather_rows_matvec
from effdist.kernels.sparse24 import sparsify24
from effdist.kernels.swiglu import swiglu
from effdist.kernels.topk_select import topk_select
from effdist.model.ffn.selection import n_of_m_channels, topk_channels

try:  # the Triton kernels need triton and a GPU; the torch references run elsewhere
    import triton  # noqa: F401

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover
    _HAVE_TRITON = False

FFN_KINDS = ("swiglu", "relu2", "topk", "moc", "elas")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _activate(a: torch.Tensor, act: str) -> torch.Tensor:
    """relu / relu² of selected pre-activations, in fp32 rounded once (effdist.kernels.channel_select's math)."""
    r = a.float().clamp_min(0)
    return (r if act == "relu" else r.square()).to(a.dtype)


class InferenceFFN(nn.Module):
    kind: str = ""
    # Whether decode reads less than the whole FFN (tools/bench_decode.py reports it).
    sparse: bool = False
    # Larger decode batches run the dense math (same function, fewer bytes read); None: the kind's
    # byte rule (`sparse_batch_limit`).
    sparse_max_batch: Optional[int] = None
    # The top-K search of MoC's / top-k's decode step (ffn.select_method): "bisect", "bisect4" or "radix" (bf16).
    select_method: str = "bisect"

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)

    @property
    def width(self) -> int:
        raise NotImplementedError


class GatedFFN(InferenceFFN):
    """SwiGLU (dense) and Mixture-of-Channels: fc1 = [gate; up] rows [2F, h]; fc2 [h, F], stored as
    [F, h] for MoC (whose decode reads it by channel)."""

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, *, moc_k: Optional[int] = None,
                 moc_structured: bool = False):
        super().__init__()
        width = fc2.shape[1]
        if fc1.shape[0] != 2 * width:
            raise ValueError(f"gated fc1 has {fc1.shape[0]} rows, expected 2 x fc2's {width} columns")
        self.moc = moc_k is not None or moc_structured
        self.register_buffer("fc1", fc1)
        self.register_buffer("fc2", fc2.t().contiguous() if self.moc else fc2.contiguous())
        self.kind = "moc" if self.moc else "swiglu"
        self.sparse = self.moc
        self.structured = moc_structured
        self.k = width // 4 if moc_structured else moc_k
        if self.moc and not 1 <= self.k <= width:
            raise ValueError(f"MoC top-K = {self.k} must lie in [1, ffn width {width}]")
        if moc_structured and width % 8:
            raise ValueError(f"MoC 2:8 needs the FFN width ({width}) divisible by 8")

    @property
    def width(self) -> int:
        return self.fc1.shape[0] // 2

    def down_weight(self) -> torch.Tensor:
        """fc2 as [h, F] (a transposed view for MoC)."""
        return self.fc2.t() if self.moc else self.fc2

    def _select(self, gate: torch.Tensor) -> torch.Tensor:
        if self.structured:
            return n_of_m_channels(gate, 2, 8)
        return topk_channels(gate, self.k)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.fc1)
        if not self.moc:
            z = swiglu(h, use_triton=h.is_cuda and _HAVE_TRITON)
        else:  # MixtureOfChannelsMLP.forward: select on the gate, SiLU(g)·u on those channels only
            src = _flat(h)
            idx = self._select(src[:, :self.width])
            z = select_activate(src, idx, self.width, "swiglu")[0].view(*h.shape[:-1], self.width)
        return F.linear(z, self.down_weight())

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.moc:
            return self.dense(x)
        if x.shape[0] > self.sparse_batch_limit():
            return self.dense(x)
        w = self.width
        gate = F.linear(x, self.fc1[:w])
        if self.structured:
            idx = self._select(gate)
            gate_at = gate.gather(1, idx.long())
        else:
            idx, gate_at = topk_select(gate, self.k, self.select_method)
        coef = gather_rows_matvec(x, idx, self.fc1[w:], gate=gate_at)
        return gather_rows_combine(coef, idx, self.fc2)

    def sparse_batch_limit(self) -> int:
        """Largest batch decoded sparsely: each token reads its own K up and down rows, so beyond
        width / K tokens the gathers read more bytes than the dense up and down projections."""
        if self.sparse_max_batch is not None:
            return self.sparse_max_batch
        return max(1, self.width // self.k)


class PlainFFN(InferenceFFN):
    """Non-gated FFNs: relu2 (dense ReLU²), topk (ReLU or ReLU² on the k largest) and elas (ReLU² then
    2:4, fc1/fc2 optionally low-rank). fc1 is [F, h] or the factors (in [r, h], out [F, r]); fc2 is
    [h, F] or the factors (in [r, F], out [h, r]); fc2 or its input factor is stored transposed,
    [F, h|r], for the sparse decode (`by_channel`)."""

    def __init__(self, kind: str, fc1: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 fc2: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *, topk_k: Optional[int] = None,
                 topk_activation: str = "relu", elas_sparse: bool = True, by_channel: bool = True):
        super().__init__()
        if kind not in ("relu2", "topk", "elas"):
            raise ValueError(f"PlainFFN kind = {kind!r}; valid: relu2, topk, elas")
        self.kind = kind
        self.low_rank = isinstance(fc1, tuple)
        if self.low_rank:
            self.register_buffer("fc1_in", fc1[0])
            self.register_buffer("fc1_out", fc1[1])
            fc2_in = fc2[0]
            self.register_buffer("fc2_out", fc2[1])
        else:
            self.register_buffer("fc1", fc1)
            fc2_in = fc2
            self.fc2_out = None
        # Sparse decode reads fc2 (or its input factor) by channel: stored [F, h|r] then.
        self.by_channel = by_channel
        self.register_buffer("fc2_in", fc2_in.t().contiguous() if by_channel else fc2_in.contiguous())
        width = fc2_in.shape[1]
        if kind == "topk":
            if topk_k is None or not 1 <= topk_k <= width:
                raise ValueError(f"top-k = {topk_k} must lie in [1, ffn width {width}]")
            if topk_activation not in ("relu", "relu2"):
                raise ValueError(f"top-k FFN activation = {topk_activation!r}; valid: relu, relu2")
        if kind == "elas" and width % 4:
            raise ValueError(f"ELAS 2:4 sparsity needs the FFN width ({width}) divisible by 4")
        self.k = topk_k if kind == "topk" else None
        self.act = topk_activation if kind == "topk" else "relu2"
        # ELAS before the end of its warm-up is plain ReLU² (ElasMLP.sparsity_active).
        self.elas_sparse = elas_sparse
        self.sparse = True

    @property
    def width(self) -> int:
        return self.fc2_in.shape[0 if self.by_channel else 1]

    def down_in_weight(self) -> torch.Tensor:
        """fc2 (or its input factor) as [h|r, F]."""
        return self.fc2_in.t() if self.by_channel else self.fc2_in

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        if self.low_rank:  # LowRankColumnParallelLinear: factor_out(factor_in(x))
            return F.linear(F.linear(x, self.fc1_in), self.fc1_out)
        return F.linear(x, self.fc1)

    def _finish_down(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.fc2_out is None else F.linear(y, self.fc2_out)

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """The dense activation [N, F] the trained module hands fc2 (zeros off the kept channels)."""
        if self.kind == "topk":
            idx = topk_channels(h, self.k)
            return select_activate(h, idx, self.width, self.act)[0]
        if self.kind == "elas" and self.elas_sparse:
            return sparsify24(h, relu2=True, write_dense=True, write_compressed=False)[0]
        return torch.pow(F.relu(h), 2)  # megatron's squared_relu

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        h = self._up(x)
        z = self._activation(_flat(h)).view(h.shape)
        return self._finish_down(F.linear(z, self.down_in_weight()))

    def sparse_batch_limit(self) -> int:
        """Largest batch decoded sparsely: each token reads its own rows of fc2 (k for top-k, at most
        half for ELAS, data-dependent for relu2: taken as half), so beyond width / rows-per-token tokens
        the gather reads more bytes than the dense down projection."""
        if self.sparse_max_batch is not None:
            return self.sparse_max_batch
        per_token = self.k if self.kind == "topk" else self.width // 2
        return max(1, self.width // per_token)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.sparse_batch_limit():
            return self.dense(x)
        h = self._up(x)
        if self.kind == "topk":
            idx, h_at = topk_select(h, self.k, self.select_method)
            coef = _activate(h_at, self.act)
            y = gather_rows_combine(coef, idx, self.fc2_in)
        else:
            z = self._activation(h)
            # 2:4 keeps at most half of each row: half the slots suffice.
            bound = self.width // 2 if self.kind == "elas" and self.elas_sparse else None
            coef, idx, count = compact_active(z, bound)
            y = gather_rows_combine(coef, idx, self.fc2_in, count)
        return self._finish_down(y)


def ffn_from_weights(kind: str, take: Callable[[str], torch.Tensor], *,
                     topk_k: Optional[int] = None, topk_activation: str = "relu", moc_k: Optional[int] = None,
                     moc_structured: bool = False, elas_sparse: bool = True) -> InferenceFFN:
    """A layer's FFN from a TP=1 megatron state dict: `take(name)` returns the layer's tensor
    ``mlp.<name>`` and raises ValueError when there is none."""
    if kind in ("swiglu", "moc"):
        return GatedFFN(take("linear_fc1.weight").clone(), take("linear_fc2.weight"),
                        moc_k=moc_k if kind == "moc" else None, moc_structured=kind == "moc" and moc_structured)
    if kind not in ("relu2", "topk", "elas"):
        raise ValueError(f"ffn.kind = {kind!r}; valid: {', '.join(FFN_KINDS)}")
    low_rank = kind == "elas" and _has(take, "linear_fc1.factor_in.weight")
    if low_rank:
        fc1 = (take("linear_fc1.factor_in.weight").clone(), take("linear_fc1.factor_out.weight").clone())
        fc2 = (take("linear_fc2.factor_in.weight"), take("linear_fc2.factor_out.weight").clone())
    else:
        fc1, fc2 = take("linear_fc1.weight").clone(), take("linear_fc2.weight")
    return PlainFFN(kind, fc1, fc2, topk_k=topk_k, topk_activation=topk_activation, elas_sparse=elas_sparse)


def _has(take: Callable[[str], torch.Tensor], name: str) -> bool:
    try:
        take(name)
    except (KeyError, ValueError):
        return False
    return True


def random_ffn(kind: str, hidden: int, width: int, normal: Callable[..., torch.Tensor], *, k: Optional[int] = None,
               topk_activation: str = "relu", moc_structured: bool = False, rank: Optional[int] = None,
               elas_sparse: bool = True) -> InferenceFFN:
    """Random weights drawn by `normal(*size)` (benchmarks, tests). `k` is top-k's k or MoC's K
    (defaults: the config's 0.1 and 0.1875 of the width); `rank` makes ELAS low-rank."""
    if kind == "swiglu":
        return GatedFFN(normal(2 * width, hidden), normal(hidden, width))
    if kind == "moc":
        return GatedFFN(normal(2 * width, hidden), normal(hidden, width),
                        moc_k=k or max(1, round(0.1875 * width)), moc_structured=moc_structured)
    if kind == "elas" and rank is not None:
        return PlainFFN(kind, (normal(rank, hidden), normal(width, rank)), (normal(rank, width), normal(hidden, rank)),
                        elas_sparse=elas_sparse)
    topk_k = (k or max(1, round(0.1 * width))) if kind == "topk" else None
    return PlainFFN(kind, normal(width, hidden), normal(hidden, width), topk_k=topk_k,
                    topk_activation=topk_activation, elas_sparse=elas_sparse)


def dense_counterpart(ffn: InferenceFFN) -> InferenceFFN:
    """The dense FFN of the same shape and weights, for speed comparisons: SwiGLU for MoC, plain
    ReLU² for ELAS and relu2, the top-k FFN's activation on every channel for top-k."""
    if isinstance(ffn, GatedFFN):
        return GatedFFN(ffn.fc1, ffn.down_weight())
    assert isinstance(ffn, PlainFFN)
    fc1 = (ffn.fc1_in, ffn.fc1_out) if ffn.low_rank else ffn.fc1
    fc2 = (ffn.down_in_weight(), ffn.fc2_out) if ffn.low_rank else ffn.down_in_weight()
    return _DenseActivationFFN(fc1, fc2, "relu" if ffn.kind == "topk" and ffn.act == "relu" else "relu2")


class _DenseActivationFFN(PlainFFN):
    """fc2(act(fc1 x)) on every channel, decoded densely (the baseline of a non-gated sparse FFN)."""

    def __init__(self, fc1, fc2, act: str):
        super().__init__("relu2", fc1, fc2, by_channel=False)
        self.act = act
        self.kind = act
        self.sparse = False

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h) if self.act == "relu" else torch.pow(F.relu(h), 2)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)
