"""EPAS shared-QK attention: a decoder layer that can reuse the Q and K of the layer above it.

A *sharing* layer i computes ``Attn(Q_a, K_a, V_i)`` where ``Q_a, K_a`` are the post-RoPE query
and key of its anchor (the last non-sharing layer before it): it runs neither the Q/K part of its
fused ``linear_qkv`` GEMM nor RoPE. Its Wq/Wk rows stay in the fused weight (a dense checkpoint
converts, the region can shrink at inference) and receive an exactly-zero gradient.

How the anchor's Q/K reaches the sharing layers: megatron's TransformerBlock threads a ``context``
value from layer to layer (and through its full-recompute checkpoint functions). Every EPAS layer
returns as its context the Q/K the next layer needs, packed into ONE tensor of shape
``[s, b, heads + kv_heads, head_dim]`` (the flattened query, then the flattened grouped key: `pack_qk`),
because the checkpoint functions only track tensors. Nothing is packed unless the next layer shares
(``exports_qk``), so a layer outside the region costs exactly what a dense layer costs.

Whether a layer shares is switched at run time (`apply_region`): the region grows during training.

Pipeline boundaries: TransformerBlock does not return the final context. Seed the first layer of a
chunk with ``model(..., extra_block_kwargs={"context": qk})`` and, right after a chunk's forward,
take the Q/K its last layer exported with `pop_exported_qk(model)` (it carries autograd: back-
propagate it together with the chunk's output). See docs/epas.md.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    linear_with_grad_accumulation_and_async_allreduce,
)
from megatron.core.tensor_parallel.layers import linear_with_frozen_weight
from megatron.core.tensor_parallel.random import is_checkpointing
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer

from effdist.kernels.grad_sum import sum_into


# ---------------------------------------------------------------------- adaptive EPAS's statistic
# (effdist.epas.adaptive decides with it; the attention below computes it during a probe step)

STATS = 3  # dot, |own|^2, |incoming|^2
# Elements converted to fp64 at a time: bounds the probe's extra memory (32 MiB per operand) on large layers.
CHUNK = 1 << 22


@torch.no_grad()
def qk_similarity_stats(own_query: torch.Tensor, own_key: torch.Tensor, incoming_query: torch.Tensor,
                        incoming_key: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``[own . incoming, own . own, incoming . incoming]`` (fp64, on the tensors' device) of the packed Q/K
    ``own = (own_query, own_key)`` and ``incoming = (incoming_query, incoming_key)``, flattened; products and
    sums in fp64, `chunk` elements at a time."""
    out = torch.zeros(STATS, dtype=torch.float64, device=own_query.device)
    for own, incoming in ((own_query, incoming_query), (own_key, incoming_key)):
        if own.shape != incoming.shape:
            raise ValueError(f"Q/K of shapes {tuple(own.shape)} and {tuple(incoming.shape)} cannot be compared")
        a, b = own.detach().reshape(-1), incoming.detach().reshape(-1)
        for start in range(0, a.numel(), chunk):
            x, y = a[start:start + chunk].double(), b[start:start + chunk].double()
            out += torch.stack([torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)])
    return out


class EpasError(RuntimeError):
    """An EPAS region or Q/K hand-over is inconsistent (e.g. a sharing layer received no Q/K)."""


# Sentinel: "not inside an EPAS forward", so get_query_key_value_tensors behaves like megatron's.
_OUTSIDE_EPAS_FORWARD = object()


def pack_qk(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[s, b, heads, d] + [s, b, kv_heads, d] -> one tensor of shape [s, b, heads + kv_heads, d] holding the
    flattened query followed by the flattened key.

    Not a concatenation along the head dimension: there, a slice of Q or K would be strided, and the GPU's
    attention kernels copy such inputs to a dense layout first -- in every sharing layer (measured on an
    H100: two extra copies per LLaMA-1B sharing layer). This way both halves are contiguous views.
    """
    s, b, heads, d = query.shape
    return torch.cat([query.reshape(-1), key.reshape(-1)]).view(s, b, heads + key.shape[2], d)


def _split_packed(qk: torch.Tensor, num_query_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    s, b, heads_and_kv, d = qk.shape
    flat = qk.reshape(-1)
    split = s * b * num_query_heads * d
    return flat[:split].view(s, b, num_query_heads, d), flat[split:].view(s, b, heads_and_kv - num_query_heads, d)


class _QKGradSum:
    """The gradient of one packed Q/K tensor, summed over the sharing layers that read it (see _UnpackQK)."""

    __slots__ = ("grad", "consumers", "seen", "pending")

    # Gradients held back before they are summed: fewer passes over the accumulator, bounded extra memory
    # (4 x dQ/dK of one layer; with 12 sharing layers 17 passes over a packed gradient instead of 35).
    PENDING = 4

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None
        self.consumers = 0
        self.seen = 0
        self.pending: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []

    def flush(self, packed_shape: torch.Size, num_query_heads: int) -> None:
        """Add the held-back gradients into the packed sum (creating it from the first ones)."""
        pending, self.pending = self.pending, []
        known = [g for pair in pending for g in pair if g is not None]
        if not known:
            return
        first = self.grad is None
        if first:
            self.grad = known[0].new_empty(packed_shape)
        for half, grads in zip(_split_packed(self.grad, num_query_heads), zip(*pending)):
            sum_into(half, [g for g in grads if g is not None], accumulate=not first)


class _UnpackQK(torch.autograd.Function):
    """Q and K views of a packed tensor; the backward of all layers reading one packed tensor builds ONE
    packed gradient.

    Slicing under plain autograd would, in every sharing layer, zero-fill a packed-size gradient per slice,
    copy the slice into it and add the two (measured on an H100: ~0.2 ms per LLaMA-1B sharing layer). One
    packed gradient per layer, summed by autograd, still costs a copy of dQ and dK per layer, and adding each
    layer's into the sum in place a pass over the sum per layer. Instead each backward (the deepest sharing
    layer first) holds its dQ/dK back; every `_QKGradSum.PENDING` layers, and at the last one, the held-back
    gradients are summed into the packed gradient in one pass (effdist.kernels.grad_sum); the last one
    returns it, the others return no gradient. Autograd runs the node that produced the packed tensor (the
    anchor, or a pipeline boundary's leaf) only after every node that read it, so it receives the whole sum;
    the sum is returned last so that autograd may add it to other gradients of that tensor (e.g. the one a
    pipeline boundary sends back) like any other. Only forwards with autograd on are counted (a checkpointed
    layer's first, no-grad forward is not).
    """

    @staticmethod
    def forward(ctx, qk: torch.Tensor, num_query_heads: int, grad_sum: _QKGradSum):
        ctx.packed_shape = qk.shape
        ctx.num_query_heads = num_query_heads
        ctx.grad_sum = grad_sum
        grad_sum.consumers += 1
        return _split_packed(qk, num_query_heads)

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        grad_sum = ctx.grad_sum
        grad_sum.seen += 1
        if grad_sum.seen > grad_sum.consumers:  # again through a retained graph: each layer returns its own
            return _UnpackQK._packed(ctx, grad_query, grad_key), None, None
        grad_sum.pending.append((grad_query, grad_key))
        last = grad_sum.seen == grad_sum.consumers
        if last or len(grad_sum.pending) >= _QKGradSum.PENDING:
            grad_sum.flush(ctx.packed_shape, ctx.num_query_heads)
        if not last:
            return None, None, None
        result, grad_sum.grad = grad_sum.grad, None
        return result, None, None

    @staticmethod
    def _packed(ctx, grad_query, grad_key) -> Optional[torch.Tensor]:
        if grad_query is None and grad_key is None:
            return None
        known = grad_query if grad_query is not None else grad_key
        packed = known.new_empty(ctx.packed_shape)
        # Copied straight into the packed halves: the attention kernels return strided (permuted) gradients, so
        # flattening each first would cost one more pass over each.
        for half, grad in zip(_split_packed(packed, ctx.num_query_heads), (grad_query, grad_key)):
            if grad is None:
                half.zero_()
            else:
                half.copy_(grad)
        return packed


def unpack_qk(qk: torch.Tensor, num_query_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query [s, b, heads, d] and key [s, b, kv_heads, d] of a `pack_qk` tensor, as contiguous views."""
    if not (qk.requires_grad and torch.is_grad_enabled()):
        return _split_packed(qk, num_query_heads)
    grad_sum = getattr(qk, "_epas_grad_sum", None)
    if grad_sum is None:
        grad_sum = qk._epas_grad_sum = _QKGradSum()
    return _UnpackQK.apply(qk, num_query_heads, grad_sum)


def qkv_row_blocks(weight_or_bias: torch.Tensor, num_groups: int, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """View a (per-rank) fused linear_qkv weight/bias as [groups, heads_per_group + 2, head_dim, ...].

    megatron interleaves the fused rows per query group: [q heads of the group, k, v]; so along
    dim 1, indices ``:heads_per_group`` are Q, ``heads_per_group`` is K, ``heads_per_group + 1`` is V.
    """
    return weight_or_bias.view(num_groups, heads_per_group + 2, head_dim, *weight_or_bias.shape[1:])


def value_block(weight_or_bias: torch.Tensor, groups: int, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """The V rows of a fused linear_qkv weight/bias as a [groups, head_dim, ...] view."""
    return qkv_row_blocks(weight_or_bias, groups, heads_per_group, head_dim)[:, heads_per_group + 1]


def value_rows(weight_or_bias: torch.Tensor, groups: int, heads_per_group: int, head_dim: int) -> torch.Tensor:
    """The V rows of a fused linear_qkv weight/bias as one [groups * head_dim, ...] tensor (a copy where the
    rows are not adjacent, i.e. with more than one query group)."""
    return value_block(weight_or_bias, groups, heads_per_group, head_dim).reshape(
        groups * head_dim, *weight_or_bias.shape[1:])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous once.

    The attention kernels return dV in their own (permuted) layout; megatron's linear backward would then copy
    it twice (for the input gradient's matmul and again for the weight gradient). A dense layer never pays
    this: its dV is concatenated with dQ/dK into the fused QKV gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _ValueRowsOfWeight(torch.autograd.Function):
    """The V rows of a fused linear_qkv weight (or bias) as one [groups * head_dim, ...] tensor.

    Backward, under megatron DDP (the parameter has ``main_grad``): the rows' gradient is added straight into
    the V rows of ``main_grad`` and the parameter is marked ``grad_added_to_main_grad`` -- the contract of
    megatron's fused weight-gradient accumulation, so DDP's hook skips its own add. Plain autograd would
    zero-fill a full [3h, h] gradient, copy the rows into it and add all of it to ``main_grad`` (measured on an
    H100: ~0.15 ms per LLaMA-1B sharing layer). Without ``main_grad`` it returns that full gradient.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, groups: int, heads_per_group: int, head_dim: int):
        # The shape is kept here: under ZeRO-3 the parameter's storage is released again before backward.
        ctx.param, ctx.blocks, ctx.shape = weight, (groups, heads_per_group, head_dim), weight.shape
        return value_rows(weight, groups, heads_per_group, head_dim)

    @staticmethod
    def backward(ctx, grad_rows):
        param, blocks, shape = ctx.param, ctx.blocks, ctx.shape
        grad_rows = grad_rows.view(blocks[0], blocks[2], *shape[1:])
        main_grad = getattr(param, "main_grad", None)
        if main_grad is not None and hasattr(param, "grad_added_to_main_grad"):
            value_block(main_grad, *blocks).add_(grad_rows)
            param.grad_added_to_main_grad = True
            # Only its presence matters: DDP's hook sees grad_added_to_main_grad and drops it unread.
            return grad_rows.new_empty(shape), None, None, None
        grad = grad_rows.new_zeros(shape)
        value_block(grad, *blocks).copy_(grad_rows)
        return grad, None, None, None


class EpasSelfAttention(SelfAttention):
    """megatron SelfAttention whose Q/K source is chosen per layer at run time.

    * ``sharing = False, exports_qk = False``: exactly megatron's SelfAttention.
    * ``exports_qk = True``: as above, and the post-RoPE Q/K are packed into ``exported_qk``.
    * ``sharing = True``: Q/K come from ``incoming_qk`` (set by EpasTransformerLayer); only the V
      rows of ``linear_qkv`` are multiplied; no RoPE.
    * ``blend = a`` (a layer in transition, not sharing yet): its own post-RoPE Q/K mixed with the
      incoming ones, ``(1 - a) * own + a * incoming``; the mix is what it exports.
    * ``probing = True`` (epas.mode adaptive, a candidate during a probe step): computes exactly what a
      dense layer computes and adds, without autograd, ``[own . incoming, own . own, incoming . incoming]``
      of its post-RoPE packed Q/K and the incoming ones to ``probe_stats`` (fp64; training forwards only,
      not the re-forward of a full-recompute backward). With ``probe_passes_incoming`` (the next layer
      probes too) it exports the incoming Q/K instead of its own, as a sharing layer would.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sharing = False
        self.blend: Optional[float] = None
        self.probing = False
        self.probe_passes_incoming = False
        self.probe_stats: Optional[torch.Tensor] = None
        self.exports_qk = False
        self.incoming_qk: Optional[torch.Tensor] = None
        self.exported_qk: Optional[torch.Tensor] = None
        self._rope = _OUTSIDE_EPAS_FORWARD

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):
        self.exported_qk = None
        if not (self.sharing or self.exports_qk or self.blend is not None or self.probing):
            return super().forward(hidden_states, attention_mask, key_value_states, inference_context, rotary_pos_emb,
                                   rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin, attention_bias,
                                   packed_seq_params, sequence_len_offset, inference_params=inference_params)
        self._check_supported(inference_context or inference_params, packed_seq_params)
        if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = (rotary_pos_emb,) * 2
        # RoPE moves into get_query_key_value_tensors (same function, same arguments as megatron's
        # forward uses), so that the Q/K exported are post-RoPE and a sharing layer can skip it.
        self._rope = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, key_value_states, None, None, rotary_pos_cos,
                                   rotary_pos_sin, rotary_pos_cos_sin, attention_bias, None, sequence_len_offset)
        finally:
            self._rope = _OUTSIDE_EPAS_FORWARD

    def _check_supported(self, inference_context, packed_seq_params) -> None:
        where = f"EPAS layer {self.layer_number - 1} (local index)"
        if inference_context is not None:
            raise NotImplementedError(f"{where}: Q/K sharing does not use megatron's inference_context KV cache; "
                                      "effdist.infer keeps its own cache (shared K for sharing layers)")
        if packed_seq_params is not None:
            raise NotImplementedError(f"{where}: Q/K sharing does not support packed sequences")
        if self.config.attention_output_gate or self.config.fused_single_qkv_rope or self.config.flash_decode:
            raise NotImplementedError(f"{where}: Q/K sharing needs attention_output_gate, fused_single_qkv_rope "
                                      "and flash_decode off")

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        if self._rope is _OUTSIDE_EPAS_FORWARD:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                       split_qkv=split_qkv)
        if self.sharing:
            qk = self._expected_incoming(hidden_states)
            query, key = unpack_qk(qk, self.num_attention_heads_per_partition)
            value = self._value_projection(hidden_states)
            self.exported_qk = qk if self.exports_qk else None
            return query, key, value
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states)
        if self._rope is not None:
            q_pos_emb, k_pos_emb = self._rope
            mscale = _yarn_get_concentration_factor_from_config(self.config)
            if q_pos_emb is not None:
                query = apply_rotary_pos_emb(query, q_pos_emb, config=self.config, cu_seqlens=None, mscale=mscale,
                                             cp_group=self.pg_collection.cp)
            if k_pos_emb is not None:
                key = apply_rotary_pos_emb(key, k_pos_emb, config=self.config, cu_seqlens=None, mscale=mscale,
                                           cp_group=self.pg_collection.cp)
        if self.blend is not None:
            incoming_query, incoming_key = unpack_qk(self._expected_incoming(hidden_states),
                                                     self.num_attention_heads_per_partition)
            query = torch.lerp(query, incoming_query, self.blend)
            key = torch.lerp(key, incoming_key, self.blend)
        if self.probing:
            incoming = self._expected_incoming(hidden_states)
            self._accumulate_probe(query, key, incoming)
            if self.probe_passes_incoming:
                self.exported_qk = incoming if self.exports_qk else None
                return query, key, value
        self.exported_qk = pack_qk(query, key) if self.exports_qk else None
        return query, key, value

    def _accumulate_probe(self, query: torch.Tensor, key: torch.Tensor, incoming: torch.Tensor) -> None:
        """Add this forward's similarity statistics to ``probe_stats``; the tensors are only read."""
        if not self.training or (is_checkpointing() and torch.is_grad_enabled()):
            return  # evaluation, or a full-recompute backward re-running a forward already counted
        with torch.no_grad():
            incoming_query, incoming_key = _split_packed(incoming.detach(), self.num_attention_heads_per_partition)
            stats = qk_similarity_stats(query, key, incoming_query, incoming_key)
        self.probe_stats = stats if self.probe_stats is None else self.probe_stats + stats

    # ------------------------------------------------------------------ sharing path
    def _expected_incoming(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qk = self.incoming_qk
        seq = hidden_states.shape[0] * (self.linear_qkv.tp_group.size() if self.config.sequence_parallel else 1)
        want = (seq, hidden_states.shape[1],
                self.num_attention_heads_per_partition + self.num_query_groups_per_partition,
                self.hidden_size_per_attention_head)
        if qk is None:
            raise EpasError(f"layer {self.layer_number - 1} of this chunk shares Q/K (or is in transition, or "
                            "probes) but received none: the layer before it must export its Q/K (apply_region "
                            "sets that), and the first layer of a pipeline chunk needs "
                            "model(..., extra_block_kwargs={'context': qk})")
        if tuple(qk.shape) != want:
            raise EpasError(f"layer {self.layer_number - 1} of this chunk received Q/K of shape {tuple(qk.shape)}, "
                            f"expected [seq, batch, heads + kv_heads, head_dim] = {list(want)}")
        return qk

    def _value_projection(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """V = hidden @ Wv^T with only the V rows of the fused weight (this rank's TP slice)."""
        groups = self.num_query_groups_per_partition
        heads_per_group = self.num_attention_heads_per_partition // groups
        head_dim = self.hidden_size_per_attention_head
        linear = self.linear_qkv
        blocks = (groups, heads_per_group, head_dim)

        # A linear class substituted through spec.LinearImpl (e.g. the pipeline executor's B/W-split
        # linear) may run the row subset itself, keeping its own weight-gradient handling.
        forward_rows = getattr(linear, "forward_rows", None)
        if forward_rows is not None:
            out, _ = forward_rows(hidden_states, lambda t: value_rows(t, *blocks))
        else:
            def rows(t: torch.Tensor) -> torch.Tensor:
                return _ValueRowsOfWeight.apply(t, *blocks) if t.requires_grad else value_rows(t, *blocks)

            out = _column_parallel_forward(linear, hidden_states, rows(linear.weight),
                                           rows(linear.bias) if linear.bias is not None else None)
        return _ContiguousGrad.apply(out).view(out.shape[0], out.shape[1], groups, head_dim)


def _column_parallel_forward(linear, input_: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor]) -> torch.Tensor:
    """ColumnParallelLinear.forward with a row subset of its weight (which forward's shape check forbids).

    Same communication as the layer (TP input copy / sequence-parallel all-gather, dgrad all-reduce);
    gradient-accumulation fusion is off because it would write into ``weight.main_grad``, which a
    row subset does not have: the rows' gradient reaches the fused weight through `_ValueRowsOfWeight`
    (straight into the V rows of ``main_grad`` under megatron DDP).
    """
    if linear.skip_bias_add:
        bias = None
    if linear.allreduce_dgrad or linear.sequence_parallel:
        input_parallel = input_
    else:
        input_parallel = copy_to_tensor_model_parallel_region(input_, group=linear.tp_group)
    fn = linear_with_grad_accumulation_and_async_allreduce if weight.requires_grad else linear_with_frozen_weight
    return fn(input=input_parallel, weight=weight, bias=bias, gradient_accumulation_fusion=False,
              allreduce_dgrad=linear.allreduce_dgrad, sequence_parallel=linear.sequence_parallel,
              tp_group=linear.tp_group)


class EpasTransformerLayer(TransformerLayer):
    """TransformerLayer that takes the anchor's packed Q/K as ``context`` and returns the Q/K the
    next layer needs (or None) as its new context."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None, pg_collection=None,
                 vp_stage=None, epas_layer_index: Optional[int] = None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        if not isinstance(self.self_attention, EpasSelfAttention):
            raise TypeError(f"EpasTransformerLayer needs EpasSelfAttention as self_attention, got "
                            f"{type(self.self_attention).__name__} (see effdist.model.spec)")
        # Global 0-based index (build_gpt also sets effdist_layer_index; both must agree).
        self.epas_layer_index = epas_layer_index
        # The last layer of a chunk keeps the Q/K it exported in its latest forward: what crosses a
        # pipeline boundary (pop_exported_qk). apply_region marks it.
        self.keeps_export = False
        self.exported_qk: Optional[torch.Tensor] = None

    @property
    def sharing(self) -> bool:
        return self.self_attention.sharing

    def forward(self, *args, **kwargs):
        if len(args) > 2:
            raise TypeError("EpasTransformerLayer: pass context (and everything after attention_mask) by keyword, "
                            "as megatron's TransformerBlock does")
        incoming = kwargs.pop("context", None)
        attention = self.self_attention
        attention.incoming_qk = incoming
        try:
            output, _ = super().forward(*args, context=None, **kwargs)
            exported = attention.exported_qk
        finally:
            attention.incoming_qk = None
            attention.exported_qk = None
        # Not during the backward's re-forward of a full-recompute checkpoint: that tensor is internal to
        # the recomputation (and holding it would keep the recomputed layer's graph alive).
        if self.keeps_export and not (is_checkpointing() and torch.is_grad_enabled()):
            self.exported_qk = exported
        return output, exported


# ---------------------------------------------------------------------- region switching on modules

def epas_layers(model_chunks: Iterable[torch.nn.Module]) -> dict[int, EpasTransformerLayer]:
    """Global layer index -> EPAS decoder layer, over this rank's model chunks (DDP-wrapped or not)."""
    out: dict[int, EpasTransformerLayer] = {}
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, EpasTransformerLayer):
                index = layer_index(module)
                if index in out:
                    raise EpasError(f"global layer index {index} appears twice in these model chunks")
                out[index] = module
    return out


def layer_index(layer: EpasTransformerLayer) -> int:
    from_spec = layer.epas_layer_index
    from_builder = getattr(layer, "effdist_layer_index", None)
    if from_spec is None and from_builder is None:
        raise EpasError("an EPAS layer has no global index: build the model with effdist.model.gpt.build_gpt")
    if from_spec is not None and from_builder is not None and from_spec != from_builder:
        raise EpasError(f"layer built for global index {from_spec} sits at index {from_builder} of the model")
    return from_builder if from_builder is not None else from_spec


def apply_region(model_chunks: Iterable[torch.nn.Module], sharing: Iterable[int],
                 blending: Optional[dict[int, float]] = None, probing: Optional[Iterable[int]] = None) -> None:
    """Switch every EPAS layer of these chunks: layer i shares iff i is in `sharing`, blends its own Q/K
    with the incoming ones with weight ``blending[i]`` if listed there (a layer in transition), probes
    (computes as a dense layer and measures its Q/K against the incoming ones, epas.mode adaptive) iff i is
    in `probing`; layer i exports its Q/K iff layer i + 1 shares, blends or probes (possibly in the next
    pipeline chunk). Every layer's ``probe_stats`` start again from nothing."""
    region = frozenset(int(i) for i in sharing)
    blending = {int(i): float(a) for i, a in (blending or {}).items()}
    probing = frozenset(int(i) for i in (probing or ()))
    if 0 in region or 0 in blending or 0 in probing:
        raise EpasError("layer 0 cannot share Q/K: it has no previous layer")
    both = region & blending.keys()
    if both:
        raise EpasError(f"layers {sorted(both)} are listed as sharing and as in transition; a layer is one or the other")
    both = probing & (region | blending.keys())
    if both:
        raise EpasError(f"layers {sorted(both)} are listed as probing and as sharing or in transition; a probing "
                        "layer computes its own Q/K")
    bad = {i: a for i, a in blending.items() if not 0.0 < a < 1.0}
    if bad:
        raise EpasError(f"blend weights {bad}: a layer in transition takes a weight in (0, 1) of the incoming Q/K")
    chunks = list(model_chunks)
    layers = epas_layers(chunks)
    if not layers:
        raise EpasError("these model chunks have no EPAS layers: build them with epas.enabled=true")
    for index, layer in layers.items():
        layer.self_attention.sharing = index in region
        layer.self_attention.blend = blending.get(index)
        layer.self_attention.probing = index in probing
        layer.self_attention.probe_passes_incoming = index in probing and (index + 1) in probing
        layer.self_attention.probe_stats = None
        layer.self_attention.exports_qk = (index + 1) in region or (index + 1) in blending or (index + 1) in probing
        layer.keeps_export = False
        layer.exported_qk = None
    for chunk in chunks:
        in_chunk = [m for m in chunk.modules() if isinstance(m, EpasTransformerLayer)]
        if in_chunk:
            in_chunk[-1].keeps_export = True


def current_region(model_chunks: Iterable[torch.nn.Module]) -> frozenset[int]:
    """The sharing layers among these chunks' layers, as switched now."""
    return frozenset(i for i, layer in epas_layers(model_chunks).items() if layer.sharing)


def pop_exported_qk(model_chunk: torch.nn.Module) -> Optional[torch.Tensor]:
    """The packed Q/K the chunk's last decoder layer exported in its latest forward, and forget it.

    Call right after the chunk's forward. It is None unless the next chunk's first layer shares. It
    carries autograd (also under full recompute, where it is an output of the checkpoint function):
    backpropagate the gradient received for it together with the chunk output's gradient, e.g.
    ``torch.autograd.backward([output, qk], [grad_output, grad_qk])``.
    """
    layers = [m for m in model_chunk.modules() if isinstance(m, EpasTransformerLayer)]
    if not layers:
        return None
    qk = layers[-1].exported_qk
    for layer in layers:
        layer.exported_qk = None
    return qk


def qk_context_shape(config, seq_length: int, micro_batch: int) -> tuple[int, int, int, int]:
    """Shape of the packed Q/K on one TP rank (megatron TransformerConfig `config`): what a pipeline
    stage sends next to its output when the next stage's first layer shares."""
    tp = config.tensor_model_parallel_size
    heads = config.num_attention_heads // tp
    groups = (config.num_query_groups or config.num_attention_heads) // tp
    return (seq_length, micro_batch, heads + groups, config.kv_channels)
