"""FFN kinds, each a megatron-core MLP spec chosen per layer (see build_mlp_spec)."""

from effdist.config import ffn_kind_of_layer, ffn_width_of_layer
from effdist.model.ffn.registry import build_mlp_spec, elas_linears, swiglu_spec

__all__ = ["build_mlp_spec", "elas_linears", "ffn_kind_of_layer", "ffn_width_of_layer", "swiglu_spec"]
