"""Which FFN a layer gets: ``ffn.kind`` on the layers listed in ``ffn.layers`` (all by default).

Every kind is a megatron-core module for a TransformerLayer's ``mlp`` slot, built from the linear
classes the caller passes (megatron's ColumnParallel/RowParallel linears by default; the pipeline
executor passes B/W-split ones):
  swiglu  megatron's MLP (gated SiLU)                       width ffn_hidden_size
  relu2   non-gated ReLU² (ReLU2MLP)                          width ffn.width(model)
  topk    ReLU / ReLU² keeping the top-k per token (TopKMLP)  width ffn.width(model)
  moc     Mixture-of-Channels SwiGLU (MixtureOfChannelsMLP)   width ffn.width(model)
  elas    ReLU² + 2:4 activation sparsity (ElasMLP), fc1/fc2 low-rank with ffn.elas_rank
Layers outside ``ffn.layers`` are SwiGLU at model.ffn_hidden_size, also when the model's
TransformerConfig carries the (wider) ELAS width.
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from effdist.config import FFNConfig, ModelConfig, resolve_count
from effdist.model.ffn.channel import MixtureOfChannelsMLP, TopKMLP
from effdist.model.ffn.dense import ReLU2MLP, SwiGLUMLP
from effdist.model.ffn.elas import ElasMLP
from effdist.model.lowrank import LowRankColumnParallelLinear, LowRankRowParallelLinear


def swiglu_spec(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear) -> ModuleSpec:
    """megatron's own MLP: SwiGLU when the TransformerConfig says gated_linear_unit + silu."""
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2))


def elas_linears(rank: int | None, linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear) -> MLPSubmodules:
    """fc1/fc2 of an ELAS FFN: the given linears, or their low-rank factorisations of `rank`."""
    if rank is None:
        return MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2)
    return MLPSubmodules(
        linear_fc1=ModuleSpec(LowRankColumnParallelLinear, params={"rank": rank, "sharded_linear": linear_fc1}),
        linear_fc2=ModuleSpec(LowRankRowParallelLinear, params={"rank": rank, "sharded_linear": linear_fc2}),
    )


def build_mlp_spec(ffn: FFNConfig, model: ModelConfig, layer_idx: int, linear_fc1=ColumnParallelLinear,
                   linear_fc2=RowParallelLinear) -> ModuleSpec:
    """The ``mlp`` spec of global layer `layer_idx` (the ffn section and the model's ffn_hidden_size decide it)."""
    kind = ffn.kind_of_layer(layer_idx)
    width = ffn.width_of_layer(model, layer_idx)
    f = ffn
    plain = MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2)
    if kind == "swiglu":
        if width == ffn.width(model):
            return swiglu_spec(linear_fc1, linear_fc2)
        return ModuleSpec(module=SwiGLUMLP, params={"ffn_hidden_size": width}, submodules=plain)
    if kind == "relu2":
        return ModuleSpec(module=ReLU2MLP, params={"ffn_hidden_size": width}, submodules=plain)
    if kind == "topk":
        return ModuleSpec(module=TopKMLP, submodules=plain, params={
            "ffn_hidden_size": width, "k": resolve_count(f.topk_k, width), "activation": f.topk_activation,
            "select_method": f.select_method, "save_selection": f.save_selection})
    if kind == "moc":
        return ModuleSpec(module=MixtureOfChannelsMLP, submodules=plain, params={
            "ffn_hidden_size": width, "k": resolve_count(f.moc_k, width), "structured": f.moc_structured,
            "select_method": f.select_method, "save_selection": f.save_selection})
    if kind == "elas":
        return ModuleSpec(module=ElasMLP, submodules=elas_linears(f.elas_rank, linear_fc1, linear_fc2), params={
            "ffn_hidden_size": width, "warmup_steps": f.elas_warmup_steps,
            # Straight-through mode: "identity" (the ELAS draft) until config.py grows ffn.elas_ste.
            "ste": getattr(f, "elas_ste", "identity"),
            "sparse_gemm": "auto" if f.elas_sparse_kernels else "never"})
    raise NotImplementedError(f"ffn.kind = {kind!r} is not available in this build")
