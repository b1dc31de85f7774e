"""Per-layer megatron-core ModuleSpecs: attention kind x FFN kind, one spec per decoder layer.

Layers are described, not subclassed: each feature (EPAS shared-QK attention, sparse FFNs, the
pipeline executor's B/W-split linears) swaps a submodule of the layer it applies to.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from effdist.config import EpasConfig, FFNConfig, ModelConfig
from effdist.model.attention import SDPAttention
from effdist.model.ffn import build_mlp_spec
from effdist.model.norm import RMSNorm
from effdist.model.shared_qk import EpasSelfAttention, EpasTransformerLayer


@dataclass(frozen=True)
class LinearImpl:
    """The linear classes the specs use; the pipeline executor substitutes B/W-split ones."""

    column: type = ColumnParallelLinear
    row: type = RowParallelLinear
    # The classes run their GEMMs in FP8 themselves when their TransformerConfig carries an effdist_fp8_gemm
    # (train.precision=fp8; effdist.model.fp8). Otherwise build_gpt substitutes its FP8 linears or refuses.
    runs_fp8: bool = False


DEFAULT_LINEARS = LinearImpl()


def self_attention_spec(epas: EpasConfig, linears: LinearImpl = DEFAULT_LINEARS) -> ModuleSpec:
    # With EPAS every layer gets the switchable attention (layer 0 too: it may export its Q/K).
    return ModuleSpec(
        module=EpasSelfAttention if epas.enabled else SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=linears.column,
            core_attention=SDPAttention,
            linear_proj=linears.row,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def layer_spec(model: ModelConfig, ffn: FFNConfig, epas: EpasConfig, layer_idx: int,
               linears: LinearImpl = DEFAULT_LINEARS) -> ModuleSpec:
    """The spec of global decoder layer `layer_idx` (0-based)."""
    return ModuleSpec(
        module=EpasTransformerLayer if epas.enabled else TransformerLayer,
        params={"epas_layer_index": layer_idx} if epas.enabled else {},
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=self_attention_spec(epas, linears),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=build_mlp_spec(ffn, model, layer_idx, linears.column, linears.row),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(model: ModelConfig, ffn: FFNConfig, epas: EpasConfig, layer_indices: list[int],
               linears: LinearImpl = DEFAULT_LINEARS) -> TransformerBlockSubmodules:
    """Specs for the decoder layers one model chunk owns, in forward order, plus the final norm."""
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(model, ffn, epas, i, linears) for i in layer_indices],
        layer_norm=RMSNorm,
    )
