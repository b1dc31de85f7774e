"""Build the megatron-core GPTModel (chunk) a rank owns from effdist's per-layer specs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from effdist.config import Config, ConfigError, ffn_width, padded_vocab_size  # noqa: F401 (padded_vocab_size: re-exported)
from effdist.model.fp8 import FP8_LINEARS, Fp8Gemm, Fp8Settings, require_fp8_support
from effdist.model.fused import FusedLossGPTModel, fused_block_spec, fused_kernel_set, install_fused_rope
from effdist.model.spec import DEFAULT_LINEARS, LinearImpl, block_spec
from effdist.model.wgrad_fusion import guard_wgrad_fusion, install_wgrad_fusion, wgrad_fusion_applies


def _install_layer_offset() -> None:
    """Make megatron's layer-offset function return a chunk config's ``effdist_layer_offset``. Idempotent."""
    from megatron.core.transformer import transformer_block, transformer_layer

    original = transformer_layer.get_transformer_layer_offset
    if getattr(original, "effdist_wrapped", False):
        return

    def get_transformer_layer_offset(config, vp_stage=None, pp_rank=None):
        offset = getattr(config, "effdist_layer_offset", None)
        if offset is not None:
            return offset
        return original(config, vp_stage, pp_rank)

    get_transformer_layer_offset.effdist_wrapped = True
    get_transformer_layer_offset.__doc__ = original.__doc__
    transformer_layer.get_transformer_layer_offset = get_transformer_layer_offset
    transformer_block.get_transformer_layer_offset = get_transformer_layer_offset


_install_layer_offset()


def transformer_config(cfg: Config, dtype: torch.dtype, device: torch.device, num_layers: int | None = None,
                       rope_fusion: bool = False, wgrad_fusion: bool = False) -> TransformerConfig:
    """megatron's TransformerConfig for ``cfg``. ``rope_fusion`` and ``wgrad_fusion`` are the two levers of
    ``train.fused_kernels`` that live in the config; `build_gpt` decides them (wgrad_fusion only for a model
    megatron DDP will wrap: see effdist.model.wgrad_fusion)."""
    m = cfg.model
    on_cpu = device.type == "cpu"
    recompute = cfg.train.recompute
    return TransformerConfig(
        num_layers=num_layers if num_layers is not None else m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        ffn_hidden_size=ffn_width(cfg),
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=cfg.parallel.tp,
        # effdist's own executor runs the pipeline: each chunk is built as a standalone model.
        pipeline_model_parallel_size=1,
        sequence_parallel=cfg.parallel.sequence_parallel,
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


def build_gpt(cfg: Config, dtype: torch.dtype, device: torch.device, layer_indices: list[int] | None = None,
              pre_process: bool = True, post_process: bool = True,
              linears: LinearImpl = DEFAULT_LINEARS) -> GPTModel:
    """A GPTModel holding `layer_indices` (default: all layers), with or without embedding / LM head."""
    if layer_indices is None:
        layer_indices = list(range(cfg.model.num_layers))
    kernels = fused_kernel_set(cfg.train.fused_kernels)
    if "rope" in kernels:
        install_fused_rope()  # before the TransformerConfig: its validation checks the slot is filled
    if list(layer_indices) != list(range(layer_indices[0], layer_indices[0] + len(layer_indices))):
        raise ValueError(f"a model chunk holds a contiguous run of layers, got {layer_indices}")
    # num_layers is the whole model's (output-layer init scale, checkpoint layer axis) and the chunk's
    # first layer is its offset, so layer numbers and checkpoint keys are global in every pipeline layout.
    # Fused weight-gradient accumulation: on CUDA under the megatron engine only (wgrad_fusion_applies).
    wgrad = wgrad_fusion_applies(cfg, device, dtype)
    if wgrad:
        install_wgrad_fusion()  # before the linears: ColumnParallelLinear checks megatron's flag
    tcfg = transformer_config(cfg, dtype, device, rope_fusion="rope" in kernels, wgrad_fusion=wgrad)
    tcfg.effdist_layer_offset = layer_indices[0]
    fp8 = Fp8Settings.from_config(cfg)
    if fp8 is not None:
        # FP8 GEMMs in the decoder's linears (effdist.model.fp8); the embedding and the LM head stay bf16.
        require_fp8_support(cfg, device)
        if linears is not DEFAULT_LINEARS:
            raise ConfigError("train.precision = 'fp8': the pipeline executor's B/W-split linears have no FP8 GEMM; "
                              "use parallel.pp=1, or train.precision=bf16")
        linears = FP8_LINEARS
        tcfg.effdist_fp8_gemm = Fp8Gemm(fp8)
    model_cls, extra = GPTModel, {}
    if "loss" in kernels:
        model_cls, extra = FusedLossGPTModel, {"loss_chunk_tokens": cfg.train.fused_loss_chunk_tokens}
    model = model_cls(
        config=tcfg,
        transformer_layer_spec=fused_block_spec(block_spec(cfg, layer_indices, linears), kernels),
        vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base),
        parallel_output=True,
        **extra,
    )
    # Global layer index of every decoder layer, for per-layer features and readable errors.
    for layer, idx in zip(model.decoder.layers, layer_indices):
        if layer.layer_number != idx + 1:
            raise RuntimeError(f"megatron numbered global layer {idx} as {layer.layer_number - 1}: the layer-offset "
                               "wrapper in effdist.model.gpt is not in effect")
        layer.effdist_layer_index = idx
    if wgrad:
        guard_wgrad_fusion(model)  # a model never wrapped in megatron DDP keeps megatron's plain path
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
