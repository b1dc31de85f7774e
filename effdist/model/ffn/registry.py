"""Which FFN a layer gets: ``ffn.kind`` on the layers listed in ``ffn.layers`` (all by default)."""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from effdist.config import Config


def ffn_kind_of_layer(cfg: Config, layer_idx: int) -> str:
    if cfg.ffn.layers is None or layer_idx in cfg.ffn.layers:
        return cfg.ffn.kind
    return "swiglu"


def swiglu_spec(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear) -> ModuleSpec:
    """megatron's own MLP: SwiGLU when the TransformerConfig says gated_linear_unit + silu."""
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2))


def build_mlp_spec(cfg: Config, layer_idx: int, linear_fc1=ColumnParallelLinear,
                   linear_fc2=RowParallelLinear) -> ModuleSpec:
    kind = ffn_kind_of_layer(cfg, layer_idx)
    if kind == "swiglu":
        return swiglu_spec(linear_fc1, linear_fc2)
    raise NotImplementedError(f"ffn.kind = {kind!r} is not available in this build")
