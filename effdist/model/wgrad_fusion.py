"""Weight-gradient GEMMs that accumulate straight into megatron DDP's fp32 ``main_grad`` (lever ``wgrad``).

Why. Without fusion every linear's backward writes its weight gradient ``dW = dYᵀ X`` as a new bf16 tensor,
and megatron DDP's hook on the parameter's grad accumulator then adds it into the fp32 ``main_grad``
(``CUDAFunctor_add<float>``: read 2 + 4 bytes, write 4 per element; ~4 ms of a 125 ms LLaMA-1B step on an
H100, plus the GEMM's own bf16 write). megatron-core fuses the two when
``TransformerConfig.gradient_accumulation_fusion`` is set, through apex's CUDA extension
``fused_weight_gradient_mlp_cuda``; effdist has neither apex nor Transformer Engine. torch has the GEMM
itself: ``torch.addmm(main_grad, dYᵀ, X, out_dtype=torch.float32, out=main_grad)`` (``aten::addmm.dtype_out``,
CUDA only; an fp32 ``self`` with bf16/fp16 operands since pytorch#167931, torch 2.10) multiplies the 16-bit
operands and accumulates into the fp32 buffer with beta = 1 -- what apex's
``wgrad_gemm_accum_fp32(X, dY, main_grad)`` does.

How megatron-core 0.16.1 uses the extension (``tensor_parallel/layers.py``):

* at import, ``import fused_weight_gradient_mlp_cuda`` sets the module global ``_grad_accum_fusion_available``;
  ``ColumnParallelLinear.__init__`` raises when the config asks for fusion and it is False (``RowParallelLinear``
  does not check). `install_wgrad_fusion` sets that global and the module global ``fused_weight_gradient_mlp_cuda``
  there (and registers the name in ``sys.modules`` for the lazy import in ``megatron.core.utils``), so it works
  whatever was imported first.
* ``LinearWithGradAccumulationAndAsyncCommunication.backward`` makes the input and the output gradient contiguous
  and 2-D (``prepare_input_tensors_for_wgrad_compute`` flattens ``[s, b, h]``), then calls
  ``wgrad_gemm_accum_fp32(input, grad_output, weight.main_grad)`` (``..._fp16`` for a 16-bit ``main_grad``).
  When the weight has ``grad_added_to_main_grad`` (megatron DDP sets it on every parameter and resets it in
  ``zero_grad_buffer``) it returns a dummy weight gradient (``torch.empty``; zeros for weights marked
  ``zero_out_wgrad``, i.e. an embedding tied to the output layer) and sets the flag; DDP's hook then skips its
  add and drops the dummy.
* A weight without ``main_grad`` breaks that backward (it reads ``weight.main_grad.dtype`` of None): fusion is
  only for weights that megatron DDP wraps. `guard_wgrad_fusion` therefore decides per call, in a forward
  pre-hook of each linear, from whether the weight it multiplies has ``main_grad``: a model built with the lever
  on but never wrapped (reference models of tools and tests, eval-only copies) keeps megatron's plain path.

The contract has one sharp edge, megatron's: ``grad_added_to_main_grad`` stays set until the next
``zero_grad_buffer``, so a parameter whose gradient in one step comes partly from a fused linear and partly
through autograd would lose the autograd part (unless ``zero_out_wgrad``). In effdist a weight that a fused
linear multiplies gets all of a step's gradient that way, or the other path keeps the contract: the tied
embedding's lookup (megatron marks it ``zero_out_wgrad``), EPAS's V-row projection of a sharing layer (adds its
rows into ``main_grad`` and sets the flag itself, effdist.model.shared_qk). The fused LM-head loss and ELAS's
2:4 GEMM multiply the output layer's and fc2's weight outside the linear, but in every training microbatch of a
step or in none (ELAS caches its choice per shape).

When `build_gpt` turns it on (`wgrad_fusion_applies`): ``"wgrad"`` in ``train.fused_kernels``, a CUDA device,
``train.engine = megatron`` (DeepSpeed keeps gradients in ``param.grad``, no ``main_grad``), and this torch build
passes `fp32_accumulating_gemm_available`. On CPU nothing changes.

The pipeline executor's B/W-split linears (effdist.pipeline.wgrad) take ``gradient_accumulation_fusion`` as
"add the weight gradient to ``main_grad`` directly": with the lever on, their immediate weight gradient is added
by their own ``_ManualTarget`` (the same ``main_grad.add_`` DDP's hook does) instead of passing through autograd;
deferred ones already were. They do not call this module's GEMM.
"""

from __future__ import annotations

import functools
import types
import warnings

import torch

from effdist.model.kernel_choice import fused_kernel_set
from effdist.runtime.megatron_patches import fill_wgrad_extension

EXTENSION_NAME = "fused_weight_gradient_mlp_cuda"


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def accumulate_weight_grad(input_: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad += grad_outputᵀ · input`` with ``input`` [..., in] and ``grad_output`` [..., out] (leading
    dimensions flattened into tokens) and ``main_grad`` [out, in].

    On CUDA the GEMM accumulates into ``main_grad`` directly: in its own dtype (``addmm_``), or from 16-bit
    operands into an fp32 ``main_grad`` (``addmm`` with ``out_dtype=float32``). Elsewhere (CPU tensors, other
    dtype pairs, a torch without that overload) it runs megatron's unfused arithmetic exactly: the GEMM in the
    operands' dtype, then DDP's ``main_grad.add_``.
    """
    x, dy = _as_rows(input_), _as_rows(grad_output)
    if dy.shape[0] != x.shape[0] or tuple(main_grad.shape) != (dy.shape[1], x.shape[1]):
        raise ValueError(f"weight-gradient accumulation: input {tuple(input_.shape)}, grad_output "
                         f"{tuple(grad_output.shape)} and main_grad {tuple(main_grad.shape)} do not fit "
                         "main_grad[out, in] += grad_output[T, out]ᵀ · input[T, in] (the arguments come in apex's "
                         "order: input, grad_output, main_grad)")
    if main_grad.is_cuda and x.dtype == dy.dtype:
        if main_grad.dtype == x.dtype:
            main_grad.addmm_(dy.t(), x)
            return
        if (main_grad.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)
                and fp32_accumulating_gemm_available(main_grad.device, x.dtype)):
            torch.addmm(main_grad, dy.t(), x, out_dtype=torch.float32, out=main_grad)
            return
    main_grad.add_(torch.mm(dy.t(), x))


def wgrad_gemm_accum_fp32(input_: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """apex's ``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32``: see `accumulate_weight_grad`."""
    accumulate_weight_grad(input_, grad_output, main_grad)


def wgrad_gemm_accum_fp16(input_: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """apex's ``wgrad_gemm_accum_fp16`` (a bf16/fp16 ``main_grad``): see `accumulate_weight_grad`."""
    accumulate_weight_grad(input_, grad_output, main_grad)


# What megatron imports in place of apex's extension: exactly the two functions it calls.
EXTENSION = types.ModuleType(EXTENSION_NAME, "effdist's torch implementation of apex's fused weight-gradient "
                                             "accumulation (effdist.model.wgrad_fusion)")
EXTENSION.wgrad_gemm_accum_fp32 = wgrad_gemm_accum_fp32
EXTENSION.wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp16


@functools.lru_cache(maxsize=None)
def fp32_accumulating_gemm_available(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this torch build accumulates a ``dtype`` GEMM into an fp32 tensor in place on ``device``:
    ``torch.addmm(c32, a, b, out_dtype=torch.float32, out=c32)``. CUDA only; torch < 2.8 has no ``out_dtype``
    and builds before pytorch#167931 (torch 2.10) require ``c32`` in the operands' dtype. Checked once per device
    and dtype by running it on small integer operands, the first one transposed as in the weight gradient, into an
    accumulator whose values need fp32 (integers + 2^-14): the result is exact only if the products are summed
    into it in fp32."""
    if device.type != "cuda":
        return False
    try:
        grad_output = torch.arange(64 * 24, device=device).view(64, 24).remainder(5).sub(2).to(dtype)
        inputs = torch.arange(64 * 40, device=device).view(64, 40).remainder(3).sub(1).to(dtype)
        acc = torch.arange(24 * 40, device=device, dtype=torch.float32).view(24, 40).remainder(11).add(2.0 ** -14)
        start = acc.cpu().double()
        torch.addmm(acc, grad_output.t(), inputs, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    expected = start + grad_output.cpu().double().t() @ inputs.cpu().double()
    return bool(torch.equal(acc.cpu().double(), expected))


def wgrad_fusion_applies(train, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `build_gpt` builds with megatron's gradient-accumulation fusion: ``"wgrad"`` in
    ``train.fused_kernels``, a CUDA device, the megatron engine (its DDP gives every weight a ``main_grad``;
    DeepSpeed does not) and, for 16-bit weights, `fp32_accumulating_gemm_available` (else a warning and off)."""
    if "wgrad" not in fused_kernel_set(train.fused_kernels):
        return False
    if device.type != "cuda" or train.engine != "megatron":
        return False
    if dtype in (torch.bfloat16, torch.float16) and not fp32_accumulating_gemm_available(device, dtype):
        warnings.warn(f"train.fused_kernels includes wgrad, but torch {torch.__version__} cannot accumulate a "
                      f"{dtype} GEMM into an fp32 tensor in place (torch.addmm(..., out_dtype=torch.float32, out=...) "
                      "needs torch >= 2.10 on CUDA): weight gradients are accumulated unfused", stacklevel=2)
        return False
    return True


def install_wgrad_fusion() -> bool:
    """Put this module's implementation where megatron-core looks for apex's ``fused_weight_gradient_mlp_cuda``
    (call before building linears with ``gradient_accumulation_fusion=True``: ColumnParallelLinear checks it).
    Idempotent. Returns True when effdist's implementation is in the slot; False when apex's extension already is
    (same contract: kept)."""
    return fill_wgrad_extension(EXTENSION)  # the patch is described in effdist.runtime.megatron_patches


def _fuse_when_weight_has_main_grad(linear: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    # ColumnParallelLinear.forward(input_, weight=None, ...): the output layer of a tied model receives the
    # embedding's weight; RowParallelLinear.forward(input_) always uses its own.
    weight = kwargs.get("weight")
    if weight is None and len(args) > 1:
        weight = args[1]
    if weight is None:
        weight = linear.weight
    linear.gradient_accumulation_fusion = hasattr(weight, "main_grad")


def guard_wgrad_fusion(model: torch.nn.Module) -> int:
    """Make every megatron linear of ``model`` built with fusion fuse only into a weight that has ``main_grad``
    (a forward pre-hook sets the layer's ``gradient_accumulation_fusion`` per call; megatron reads it in
    forward). Idempotent; returns how many linears are guarded."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    guarded = 0
    for module in model.modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        if getattr(module, "effdist_wgrad_guard", None) is None:
            if not module.gradient_accumulation_fusion:
                continue
            module.effdist_wgrad_guard = module.register_forward_pre_hook(_fuse_when_weight_has_main_grad,
                                                                          with_kwargs=True)
        guarded += 1
    return guarded
