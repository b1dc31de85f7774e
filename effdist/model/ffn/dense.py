"""Dense FFNs built on megatron's own MLP: SwiGLU at a given width, and non-gated ReLU².

All effdist FFNs subclass megatron's `MLP` so they inherit its construction of fc1/fc2 through the
spec's linear classes (what lets the pipeline executor substitute B/W-split linears), its
sharded checkpoint layout (the [gate | up] split of a gated fc1) and `backward_dw`. What differs
per layer (gated or not, the activation, the width) lives in a shallow copy of the shared
TransformerConfig: megatron's MLP sizes fc2 from ``config.ffn_hidden_size`` and chooses gating
from ``config.gated_linear_unit``, so a per-layer FFN needs a per-layer config.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from megatron.core.activations import squared_relu
from megatron.core.transformer.mlp import MLP, MLPSubmodules


def mlp_config(config, *, width: int, gated: bool, activation: Optional[Callable] = None):
    """`config` with this FFN's width, gating and activation (the same object when nothing changes)."""
    activation = activation or config.activation_func
    if (config.ffn_hidden_size == width and config.gated_linear_unit == gated
            and config.activation_func is activation):
        return config
    local = copy.copy(config)
    local.ffn_hidden_size = width
    local.gated_linear_unit = gated
    local.activation_func = activation
    # megatron's fused bias-activation kernels cover gelu and swiglu only.
    local.bias_activation_fusion = False
    return local


class SwiGLUMLP(MLP):
    """megatron's SwiGLU MLP at an explicit width (for SwiGLU layers of a model whose
    TransformerConfig carries another FFN kind's width, e.g. ELAS on some layers only)."""

    def __init__(self, config, submodules: MLPSubmodules, ffn_hidden_size: Optional[int] = None, tp_group=None,
                 **kwargs):
        width = ffn_hidden_size or config.ffn_hidden_size
        super().__init__(mlp_config(config, width=width, gated=True), submodules, ffn_hidden_size=width,
                         tp_group=tp_group, **kwargs)


class ReLU2MLP(MLP):
    """Non-gated ``fc2(relu(fc1 x)²)``: the dense reference of ELAS (megatron's MLP forward as is)."""

    def __init__(self, config, submodules: MLPSubmodules, ffn_hidden_size: Optional[int] = None, tp_group=None,
                 **kwargs):
        width = ffn_hidden_size or config.ffn_hidden_size
        super().__init__(mlp_config(config, width=width, gated=False, activation=squared_relu), submodules,
                         ffn_hidden_size=width, tp_group=tp_group, **kwargs)
