"""Build the megatron-core GPTModel (chunk) a rank owns from effdist's per-layer specs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from effdist.config import (ConfigError, EpasConfig, FFNConfig, ModelConfig, ParallelConfig, TrainConfig,
                            padded_vocab_size)  # noqa: F401 (padded_vocab_size: re-exported)
from effdist.model.fp8 import FP8_LINEARS, Fp8Gemm, Fp8Settings, require_fp8_support
from effdist.model.fused import FusedLossGPTModel, fused_block_spec, fused_kernel_set, install_fused_rope
from effdist.model.spec import DEFAULT_LINEARS, LinearImpl, block_spec
from effdist.model.wgrad_fusion import guard_wgrad_fusion, install_wgrad_fusion, wgrad_fusion_applies
from effdist.runtime.megatron_patches import install_layer_offset


def transformer_config(model: ModelConfig, parallel: ParallelConfig, ffn: FFNConfig, dtype: torch.dtype,
                       device: torch.device, *, recompute: bool = False, num_layers: int | None = None,
                       rope_fusion: bool = False, wgrad_fusion: bool = False, layer_offset: int | None = None,
                       fp8_gemm: Fp8Gemm | None = None) -> TransformerConfig:
    """megatron's TransformerConfig for effdist's model, parallel and ffn sections: the one place where effdist
    settings become megatron's. ``recompute`` is train.recompute. ``rope_fusion`` and ``wgrad_fusion`` are the
    two levers of ``train.fused_kernels`` that live in the config; `build_gpt` decides them (wgrad_fusion only
    for a model megatron DDP will wrap: see effdist.model.wgrad_fusion).

    Two values megatron has no field for ride on the config as attributes, because megatron hands the config,
    and nothing else of effdist, to every layer and to its layer-offset function: ``layer_offset`` (the chunk's
    first global layer, read by the layer-offset patch of effdist.runtime.megatron_patches) becomes
    ``effdist_layer_offset`` and ``fp8_gemm`` (effdist.model.fp8's linears run their GEMMs through it) becomes
    ``effdist_fp8_gemm``; either is absent when None."""
    on_cpu = device.type == "cpu"
    tcfg = TransformerConfig(
        num_layers=num_layers if num_layers is not None else model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        ffn_hidden_size=ffn.width(model),
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tp,
        # effdist's own executor runs the pipeline: each chunk is built as a standalone model.
        pipeline_model_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        # CPU init builds each full weight from the seeded CPU generator and then slices it, so
        # every TP layout starts from the same model (what makes TP=1 and TP=2 runs comparable).
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        # effdist's Triton RoPE fills megatron's fused-RoPE slot (install_fused_rope) when fused kernels are on.
        apply_rope_fusion=rope_fusion,
        # Weight-gradient GEMMs accumulate into DDP's fp32 main_grad (effdist.model.wgrad_fusion fills the slot
        # of apex's extension; build_gpt guards every linear so that it fuses only into a weight with main_grad).
        gradient_accumulation_fusion=wgrad_fusion,
        # Gradients are summed over data-parallel ranks (not averaged): the loss of every microbatch
        # is already divided by the token count of the whole global batch.
        calculate_per_token_loss=True,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        # No CUDA graphs; the field's default ("full") is deprecated and warns on every build.
        cuda_graph_scope=[],
    )
    if layer_offset is not None:
        tcfg.effdist_layer_offset = layer_offset
    if fp8_gemm is not None:
        tcfg.effdist_fp8_gemm = fp8_gemm
    return tcfg


def build_gpt(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, ffn: FFNConfig, epas: EpasConfig,
              dtype: torch.dtype, device: torch.device, layer_indices: list[int] | None = None,
              pre_process: bool = True, post_process: bool = True,
              linears: LinearImpl = DEFAULT_LINEARS) -> GPTModel:
    """A GPTModel holding `layer_indices` (default: all layers), with or without embedding / LM head.

    It reads the model, parallel (tp, sequence_parallel), ffn and epas sections, and from the train section the
    settings that shape the built modules: fused_kernels, fused_loss_chunk_tokens, recompute, precision and
    fp8_*, and engine (whether megatron DDP will give weights a main_grad: effdist.model.wgrad_fusion)."""
    if layer_indices is None:
        layer_indices = list(range(model.num_layers))
    install_layer_offset()  # megatron numbers the layers from the chunk's effdist_layer_offset (global numbers)
    kernels = fused_kernel_set(train.fused_kernels)
    if "rope" in kernels:
        install_fused_rope()  # before the TransformerConfig: its validation checks the slot is filled
    if list(layer_indices) != list(range(layer_indices[0], layer_indices[0] + len(layer_indices))):
        raise ValueError(f"a model chunk holds a contiguous run of layers, got {layer_indices}")
    # num_layers is the whole model's (output-layer init scale, checkpoint layer axis) and the chunk's
    # first layer is its offset, so layer numbers and checkpoint keys are global in every pipeline layout.
    # Fused weight-gradient accumulation: on CUDA under the megatron engine only (wgrad_fusion_applies).
    wgrad = wgrad_fusion_applies(train, device, dtype)
    if wgrad:
        install_wgrad_fusion()  # before the linears: ColumnParallelLinear checks megatron's flag
    fp8 = Fp8Settings.from_train(train)
    fp8_gemm = None
    if fp8 is not None:
        # FP8 GEMMs in the decoder's linears (effdist.model.fp8); the embedding and the LM head stay bf16.
        require_fp8_support(train, device)
        if linears is DEFAULT_LINEARS:
            linears = FP8_LINEARS
        elif not linears.runs_fp8:
            raise ConfigError(f"train.precision = 'fp8': the linears {linears.column.__name__}/{linears.row.__name__} "
                              "have no FP8 GEMM; use train.precision=bf16")
        fp8_gemm = Fp8Gemm(fp8)
    tcfg = transformer_config(model, parallel, ffn, dtype, device, recompute=train.recompute,
                              rope_fusion="rope" in kernels, wgrad_fusion=wgrad, layer_offset=layer_indices[0],
                              fp8_gemm=fp8_gemm)
    model_cls, extra = GPTModel, {}
    if "loss" in kernels:
        model_cls, extra = FusedLossGPTModel, {"loss_chunk_tokens": train.fused_loss_chunk_tokens}
    gpt = model_cls(
        config=tcfg,
        transformer_layer_spec=fused_block_spec(block_spec(model, ffn, epas, layer_indices, linears), kernels),
        vocab_size=model.padded_vocab_size(parallel.tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        parallel_output=True,
        **extra,
    )
    # Global layer index of every decoder layer, for per-layer features and readable errors.
    for layer, idx in zip(gpt.decoder.layers, layer_indices):
        if layer.layer_number != idx + 1:
            raise RuntimeError(f"megatron numbered global layer {idx} as {layer.layer_number - 1}: the layer-offset "
                               "patch of effdist.runtime.megatron_patches is not in effect")
        layer.effdist_layer_index = idx
    if wgrad:
        guard_wgrad_fusion(gpt)  # a model never wrapped in megatron DDP keeps megatron's plain path
    return gpt.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gpt_chunk_builder(model: ModelConfig, parallel: ParallelConfig, train: TrainConfig, ffn: FFNConfig,
                      epas: EpasConfig, dtype: torch.dtype, device: torch.device):
    """``build(layer_indices, pre_process, post_process, linears)``: `build_gpt` for these sections on `device`,
    the chunk builder effdist.pipeline.chunks takes (it knows nothing of the config)."""

    def build(layer_indices: list[int], pre_process: bool, post_process: bool,
              linears: LinearImpl = DEFAULT_LINEARS) -> GPTModel:
        return build_gpt(model, parallel, train, ffn, epas, dtype, device, layer_indices, pre_process=pre_process,
                         post_process=post_process, linears=linears)

    return build
