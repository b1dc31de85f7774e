"""Where effdist's fused kernels plug into megatron-core's GPT (``train.fused_kernels``).

Every piece is opt-in and leaves megatron's own code path untouched when it is off:

* RMSNorm: effdist's RMSNorm with ``fused=True`` in the norm slots of the layer specs.
* RoPE: megatron's ``apply_rotary_pos_emb`` calls a fused-RoPE function (Transformer Engine's, when
  installed) if ``TransformerConfig.apply_rope_fusion`` is set. `install_fused_rope` fills that
  slot with effdist's kernel, so ``apply_rope_fusion=True`` routes every RoPE application through it:
  megatron's SelfAttention and EPAS's shared-QK attention alike (both call that one function), with
  no attention subclass. Q and K are rotated by one launch each.
* SwiGLU: `FusedSwiGLUMLP`, megatron's MLP whose activation is the fused SwiGLU kernel applied to
  the whole ``[gate | up]`` fc1 output (megatron's ``use_te_activation_func`` branch: the activation
  module receives the unsplit fc1 output).
* LM head + loss: `FusedLossGPTModel`, a GPTModel whose training loss (forward with labels) runs the
  LM-head GEMM and a vocab-parallel cross-entropy without fp32 logits
  (effdist.kernels.cross_entropy). Logits for inference (no labels) are megatron's, unchanged.
* Weight gradients ("wgrad"): megatron's gradient-accumulation fusion, with effdist's torch implementation
  of apex's extension (effdist.model.wgrad_fusion): each linear's weight-gradient GEMM accumulates straight
  into megatron DDP's fp32 ``main_grad`` instead of writing a bf16 gradient that DDP's hook then adds. Not a
  Triton kernel and not on CPU: `build_gpt` turns it on only on CUDA under the megatron engine.

`fused_kernel_set` reads ``train.fused_kernels`` (true, false or a list of FUSED_KERNELS names);
`fused_block_spec` rewrites a block spec (norm slots, SwiGLU MLPs); `FusedLossGPTModel` replaces
GPTModel; ``apply_rope_fusion=True`` after `install_fused_rope` switches RoPE; ``gradient_accumulation_fusion=True``
after `install_wgrad_fusion` switches wgrad. See docs/dense_speed.md.

On CPU the kernels' plain-torch references run (Triton needs a GPU): the dispatch is
``use_triton = tensor.is_cuda`` in every piece; "wgrad" is off there.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from effdist.kernels.cross_entropy import linear_cross_entropy
from effdist.kernels.rope import apply_rope
from effdist.kernels.swiglu import swiglu
from effdist.model.ffn.dense import SwiGLUMLP
from effdist.model.kernel_choice import FUSED_KERNELS, fused_kernel_set  # noqa: F401  (the names callers use)
from effdist.model.norm import RMSNorm, rmsnorm_spec
from effdist.runtime.megatron_patches import fill_rope_slot


# ---------------------------------------------------------------------------------------- RoPE

def install_fused_rope() -> bool:
    """Fill megatron's fused-RoPE slot with effdist's kernel (call before building a TransformerConfig
    with ``apply_rope_fusion=True``: its validation checks the slot). Returns True when effdist's kernel
    is in the slot; False when Transformer Engine's fused RoPE already is (it is equivalent; kept)."""
    return fill_rope_slot(apply_rope)  # the patch is described in effdist.runtime.megatron_patches


# ---------------------------------------------------------------------------------------- SwiGLU

class SwiGLUActivation(torch.nn.Module):
    """Activation module for megatron's MLP: the whole fc1 output ``[gate | up]`` in, ``silu(gate) * up`` out."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, use_triton=x.is_cuda)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        # megatron's MLP asks every child for its checkpoint entries; an activation has none.
        return {}


class FusedSwiGLUMLP(MLP):
    """megatron's SwiGLU MLP (fc1 -> SwiGLU -> fc2, its checkpoint layout, its linears from the spec)
    with the fused SwiGLU kernel as activation.

    megatron's MLP hands its activation module the unsplit fc1 output only when
    ``config.use_te_activation_func`` is set; this MLP sets it (and SwiGLU gating) on a private copy
    of the config, so no other module of the model sees a changed config. ``ffn_hidden_size`` may
    differ from the config's (the copy carries it: megatron sizes fc2 from the config).
    """

    def __init__(self, config, submodules: MLPSubmodules, ffn_hidden_size: Optional[int] = None, **kwargs):
        if config.activation_func_clamp_value is not None or config.glu_linear_offset != 0.0:
            raise ValueError("FusedSwiGLUMLP computes plain SwiGLU: TransformerConfig.activation_func_clamp_value = "
                             f"{config.activation_func_clamp_value} and glu_linear_offset = "
                             f"{config.glu_linear_offset} need megatron's MLP (leave swiglu out of train.fused_kernels)")
        width = ffn_hidden_size or config.ffn_hidden_size
        local = copy.copy(config)
        local.ffn_hidden_size = width
        local.gated_linear_unit = True
        local.activation_func = F.silu
        local.bias_activation_fusion = False
        local.use_te_activation_func = True
        submodules = dataclasses.replace(submodules, activation_func=SwiGLUActivation)
        super().__init__(local, submodules, ffn_hidden_size=width, **kwargs)


# ---------------------------------------------------------------------------------------- specs

def fused_block_spec(spec: TransformerBlockSubmodules,
                     kernels: frozenset[str] = frozenset(FUSED_KERNELS)) -> TransformerBlockSubmodules:
    """A copy of ``spec`` with, for "rmsnorm" in ``kernels``, the fused RMSNorm in every RMSNorm slot and,
    for "swiglu", `FusedSwiGLUMLP` in place of megatron's MLP and effdist's SwiGLUMLP (both SwiGLU
    under effdist's TransformerConfig). Attention, the other FFN kinds and the linear classes (e.g.
    the executor's B/W-split ones) stay as given."""
    norm = "rmsnorm" in kernels
    mlp = "swiglu" in kernels

    def fused_norm(slot):
        return rmsnorm_spec(True) if norm and slot is RMSNorm else slot

    def fused_mlp(slot):
        if mlp and isinstance(slot, ModuleSpec) and slot.module in (MLP, SwiGLUMLP):
            return dataclasses.replace(slot, module=FusedSwiGLUMLP)
        return slot

    def fused_layer(layer: ModuleSpec) -> ModuleSpec:
        subs = layer.submodules
        return dataclasses.replace(layer, submodules=dataclasses.replace(
            subs, input_layernorm=fused_norm(subs.input_layernorm),
            pre_mlp_layernorm=fused_norm(subs.pre_mlp_layernorm), mlp=fused_mlp(subs.mlp)))

    return dataclasses.replace(spec, layer_specs=[fused_layer(s) for s in spec.layer_specs],
                               layer_norm=fused_norm(spec.layer_norm))


# ---------------------------------------------------------------------------------------- LM head + loss

def lm_head_cross_entropy(hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, output_layer,
                          chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) of decoder output ``hidden_states`` [s, b, h] through the LM head
    ``weight`` (this TP rank's vocab slice) against ``labels`` [b, s]: what megatron's
    ``output_layer`` + ``compute_language_model_loss`` return, without materialising fp32 logits.

    The input side of the TP communication is the output layer's own (a ColumnParallelLinear):
    all-gather along the sequence under sequence parallelism (reduce-scatter of the gradient),
    otherwise the identity with an all-reduce of the gradient.
    """
    tp_group = output_layer.tp_group
    tp = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    x = hidden_states
    if tp > 1:
        if output_layer.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(x, group=tp_group)
    seq, batch, hidden = x.shape
    vocab_slice = weight.shape[0]
    rank = 0 if tp == 1 else torch.distributed.get_rank(tp_group)
    # Tokens in the decoder's [s, b] order, so the hidden states need no copy.
    labels_sb = labels.transpose(0, 1).reshape(-1)
    loss = linear_cross_entropy(x.reshape(seq * batch, hidden), weight, labels_sb,
                                tp_group=tp_group if tp > 1 else None, vocab_start=rank * vocab_slice,
                                chunk_tokens=chunk_tokens, use_triton=x.is_cuda)
    return loss.view(seq, batch).transpose(0, 1).contiguous()


_POSTPROCESS = inspect.signature(GPTModel._postprocess)


class FusedLossGPTModel(GPTModel):
    """GPTModel whose training loss is `lm_head_cross_entropy`.

    Only the plain training case is replaced (labels given, last stage, no multi-token prediction,
    no inference context, no gathered logits, no deferred embedding wgrad, no config logger); every
    other call is megatron's ``_postprocess`` unchanged. ``loss_chunk_tokens``: None keeps the
    LM head's logits (activation dtype) for the backward; a count recomputes them that many tokens
    at a time instead (least memory, one more LM-head GEMM).
    """

    def __init__(self, *args, loss_chunk_tokens: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens

    def _postprocess(self, *args, **kwargs):
        bound = _POSTPROCESS.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not self._fused_loss_applies(a):
            return super()._postprocess(*args, **kwargs)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        return lm_head_cross_entropy(a["hidden_states"], weight, a["labels"], self.output_layer,
                                     chunk_tokens=self.loss_chunk_tokens)

    def _fused_loss_applies(self, a: dict) -> bool:
        from megatron.core.config_logger import has_config_logger_enabled

        return (a["labels"] is not None and self.post_process and not a["mtp_in_postprocess"]
                and self.config.mtp_num_layers is None and a["inference_context"] is None
                and a["inference_params"] is None and not a["runtime_gather_output"]
                and not self.output_layer.gather_output and not self.config.defer_embedding_wgrad_compute
                and not has_config_logger_enabled(self.config))
