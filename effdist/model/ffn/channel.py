"""FFNs that keep a few channels per token: Mixture-of-Channels and top-k ReLU.

Mixture-of-Channels (MoC): SwiGLU whose token keeps only the K channels with the largest gate
pre-activation G (largest values, not magnitudes): Z = (SiLU(G)⊙U) on those channels, 0 elsewhere.
The "2:8" variant keeps the top 2 of every 8 channels instead. Top-k ReLU (the "Lazy Neuron"
top-k transformer): non-gated, act(H) = relu(H) or relu(H)² kept on the k largest channels.

Both are one autograd function between megatron's fc1 and fc2 (see `_SelectActivate`): forward
gathers the selected pre-activations, applies the activation there and scatters it into a dense Z
for fc2; it saves only the K selected pre-activations (G and U for MoC, H for top-k) and which
channels they are: a bit mask of the row (W/8 bytes) where the selection is a plain top-K on one
rank (unless ffn.save_selection = indices), else int16 channel indices (2K bytes; 2:8 and tensor
parallelism). fc2's own saved copy of Z is replaced by a recipe that rebuilds it from the same
tensors (effdist.model.ffn.saved), so an FFN layer keeps, per token, the fc1 input plus 2K (MoC) or
K (top-k) values and the selection, instead of SwiGLU's G, U, SiLU(G), Z (4·d_ffn values).
Gradients reach only the selected channels: the selection is a constant of the step.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.activations import squared_relu
from megatron.core.transformer.mlp import MLP, MLPSubmodules

from effdist.kernels.channel_select import (
    scatter_activated,
    scatter_activated_masked,
    select_activate,
    select_activate_backward,
    select_activate_backward_masked,
)
from effdist.kernels.topk_select import topk_select_activate
from effdist.model.ffn.dense import mlp_config
from effdist.model.ffn.saved import save_compactly
from effdist.model.ffn.selection import index_dtype, n_of_m_channels, topk_channels


class _SelectActivate(torch.autograd.Function):
    """src [N, W or 2W], idx [N, K] -> dense activation [N, W]; the selected inputs and idx go to `sink`.
    With idx None the K largest of src's first W columns are selected in the same kernel
    (effdist.kernels.topk_select.topk_select_activate: no sort, no separate gather pass), and the selection
    goes to `sink` as a bit mask (effdist.kernels.channel_select) with `as_mask`, else as int16 indices."""

    @staticmethod
    def forward(ctx, src, idx, width, act, sink, k=None, method="bisect", as_mask=True):
        ctx.masked = idx is None and as_mask
        if idx is None:
            z, sel_a, sel_b, idx = topk_select_activate(src, k, width, act, index_dtype(width), method, as_mask)
        else:
            z, sel_a, sel_b = select_activate(src, idx, width, act)
        ctx.width, ctx.act = width, act
        ctx.save_for_backward(sel_a, sel_b, idx)
        sink.extend([sel_a, sel_b, idx])
        return z

    @staticmethod
    def backward(ctx, dz):
        sel_a, sel_b, sel = ctx.saved_tensors
        fn = select_activate_backward_masked if ctx.masked else select_activate_backward
        return fn(dz.contiguous(), sel_a, sel_b, sel, ctx.width, ctx.act), None, None, None, None, None, None, None


class ChannelSelectMLP(MLP):
    """fc1 -> keep the selected channels' activation -> fc2. Subclasses choose scores and activation."""

    act: str = "swiglu"

    def __init__(self, config, submodules: MLPSubmodules, *, width: int, gated: bool, activation=None,
                 tp_group=None, select_method: str = "bisect", save_selection: str = "mask", **kwargs):
        super().__init__(mlp_config(config, width=width, gated=gated, activation=activation), submodules,
                         ffn_hidden_size=width, tp_group=tp_group, **kwargs)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        self.select_method = select_method  # of the fused top-K kernel: ffn.select_method
        self.save_selection = save_selection  # a fused top-K's selection as a bit mask or indices: ffn.save_selection
        self.width = width
        self.local_width = width // tp

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fused_topk(self) -> int | None:
        """K when the selection is a plain top-K within this rank (TP=1), which the fused select +
        activate kernel does on GPU; None when `select` must run (2:8, or the TP all-gather)."""
        tp = self.tp_group.size() if self.tp_group is not None else 1
        return self.k if tp == 1 and not getattr(self, "structured", False) else None

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise NotImplementedError(f"{type(self).__name__} is a dense-layer FFN; per-token (MoE) scales are not supported")
        fc1_out, fc1_bias = self.linear_fc1(hidden_states)
        if fc1_bias is not None:
            fc1_out = fc1_out + fc1_bias
        lead = fc1_out.shape[:-1]
        src = fc1_out.reshape(-1, fc1_out.shape[-1])
        w = self.local_width
        fused_k = self.fused_topk()
        idx = None if fused_k else self.select(src[:, :w].detach())
        sink: list = []
        masked = idx is None and self.save_selection == "mask"
        z = _SelectActivate.apply(src, idx, w, self.act, sink, fused_k, self.select_method, masked).view(*lead, w)
        sel_a, sel_b, sel = sink
        parts = (sel_a, sel_b, sel) if sel_b is not None else (sel_a, sel)
        with save_compactly(z, parts, self._rebuild(lead, masked=masked)):
            return self.linear_fc2(z)

    def _rebuild(self, lead, masked: bool):
        width, act = self.local_width, self.act
        scatter = scatter_activated_masked if masked else scatter_activated

        def rebuild(parts):
            sel_a, sel_b, sel = parts if len(parts) == 3 else (parts[0], None, parts[1])
            return scatter(sel_a, sel_b, sel, width, act).view(*lead, width)

        return rebuild


class MixtureOfChannelsMLP(ChannelSelectMLP):
    """SwiGLU keeping the top-K gate channels per token (or the top 2 of every 8 with `structured`)."""

    act = "swiglu"

    def __init__(self, config, submodules: MLPSubmodules, *, k: int, structured: bool = False,
                 ffn_hidden_size: Optional[int] = None, tp_group=None, **kwargs):
        width = ffn_hidden_size or config.ffn_hidden_size
        super().__init__(config, submodules, width=width, gated=True, tp_group=tp_group, **kwargs)
        if not structured and not 1 <= k <= width:
            raise ValueError(f"MoC top-K = {k} must lie in [1, ffn width {width}]")
        if structured and self.local_width % 8:
            raise ValueError(f"MoC 2:8 needs the per-rank FFN width ({self.local_width}) divisible by 8")
        self.k = width // 4 if structured else k
        self.structured = structured

    def select(self, gate: torch.Tensor) -> torch.Tensor:
        if self.structured:
            return n_of_m_channels(gate, 2, 8)
        return topk_channels(gate, self.k, self.tp_group)


class TopKMLP(ChannelSelectMLP):
    """Non-gated relu / relu² FFN keeping the k largest activations per token."""

    def __init__(self, config, submodules: MLPSubmodules, *, k: int, activation: str = "relu",
                 ffn_hidden_size: Optional[int] = None, tp_group=None, **kwargs):
        if activation not in ("relu", "relu2"):
            raise ValueError(f"top-k FFN activation = {activation!r}; valid: relu, relu2")
        width = ffn_hidden_size or config.ffn_hidden_size
        act_fn = torch.nn.functional.relu if activation == "relu" else squared_relu
        super().__init__(config, submodules, width=width, gated=False, activation=act_fn, tp_group=tp_group,
                         **kwargs)
        if not 1 <= k <= width:
            raise ValueError(f"top-k = {k} must lie in [1, ffn width {width}]")
        self.act = activation
        self.k = k

    def select(self, pre_activation: torch.Tensor) -> torch.Tensor:
        # relu and relu² are monotone, so the top-k pre-activations are the top-k activations.
        return topk_channels(pre_activation, self.k, self.tp_group)
