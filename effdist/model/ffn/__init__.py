"""FFN kinds, each a megatron-core MLP spec chosen per layer (see build_mlp_spec)."""

from effdist.model.ffn.registry import build_mlp_spec, ffn_kind_of_layer

__all__ = ["build_mlp_spec", "ffn_kind_of_layer"]
