"""FP8 training of the decoder's linear layers (``train.precision = fp8``), on torchao's float8 training.

What runs in FP8. The GEMMs of every linear the layer specs build -- attention's ``linear_qkv`` and
``linear_proj``, the FFN's ``linear_fc1`` (gate and up) and ``linear_fc2`` (down), also inside the sparse FFN
kinds and ELAS's low-rank factors, and the V-row projection of EPAS sharing layers -- in forward (output),
backward (input gradient) and the weight gradient. The embedding, the LM head (megatron builds the output layer
itself, outside the specs), attention, norms and the loss stay in bf16.

How. megatron-core's ColumnParallelLinear / RowParallelLinear are not ``nn.Linear`` (torchao's module swap does
not see them), so `Fp8ColumnParallelLinear` / `Fp8RowParallelLinear` are those classes with their matmul
(``_forward_impl``) replaced: the tensor-parallel communication megatron's Function does (sequence-parallel
all-gather of the input with a reduce-scatter of its gradient, or the all-reduce of the input gradient) is done
by megatron's autograd-aware mappings, and the GEMM by torchao's ``matmul_with_hp_or_float8_args``: it casts
input and weight to float8 (e4m3) in forward and the output gradient (e5m2 for tensorwise, e4m3 for rowwise) in
backward with dynamic scales, and runs ``torch._scaled_mm``. Everything else about the layers -- parameters,
initialisation, checkpoint keys, the row-parallel output reduction -- is megatron's, so bf16 and FP8 checkpoints
are interchangeable.

Recipes (``train.fp8_recipe``), torchao's names:

* ``tensorwise``: one scale per tensor (cuBLAS tensorwise kernel; torchtitan's default).
* ``rowwise``: one scale per row of each operand, power-of-two scales (CUTLASS rowwise kernel), e4m3 for
  gradients too. More accurate with outliers, slower per GEMM.
* ``rowwise_with_gw_hp``: rowwise, with the weight-gradient GEMM in bf16.

Scaling state. Every recipe scales dynamically: each scale is computed from the tensor it scales (its amax),
in the same step. There is no amax history and no scale carried between steps (torchao removed delayed
scaling), so there is nothing to checkpoint: a resumed FP8 run continues exactly like an uninterrupted one
(tests/test_fp8.py checks that).

Speed. torchao's casts are separate elementwise and reduction kernels when run eagerly (abs, amax, scale,
cast: several passes over each activation). ``train.fp8_compile`` (default true, CUDA only) compiles the cast +
GEMM of each linear with torch.compile, which fuses each cast into one or two kernels, as torchtitan does by
compiling its whole block. The collectives stay outside the compiled region.

Emulation. ``train.fp8_emulate`` runs torchao's emulated casts (values rounded to float8 and back, matmul in
high precision): same numerics up to GEMM accumulation order, on any device, not faster. For tests (CPU) and for
checking numerics on GPUs without FP8.

Pipeline parallelism. The pipeline executor's B/W-split linears (effdist.pipeline.wgrad) defer the weight
gradient to a later W action, which torchao's fused backward cannot do; they call `Fp8Gemm.output`,
`grad_input` and `grad_weight`, the three GEMMs one at a time with the casts torchao's fused Function uses for
each (bit-identical results).

Not FP8: ELAS's 2:4 sparse GEMM (fc2's weight multiplied outside the linear), and the DeepSpeed engine
(refused). Requirements: a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell) unless emulating,
torchao (``pip install -e ".[fp8]"``), and GEMM dimensions that are multiples of 16 (every preset's are).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)

from effdist.config import FP8_RECIPES, ConfigError, TrainConfig
from effdist.model.spec import LinearImpl

FP8_MIN_CAPABILITY = (8, 9)
TORCHAO_INSTALL_HINT = 'pip install "torchao>=0.17" (or pip install -e ".[fp8]")'


class Fp8UnavailableError(ConfigError):
    """train.precision = fp8 where FP8 cannot run: no torchao, CPU, or a GPU without FP8 tensor cores."""


# Log lines torchao's import emits that say nothing a user can act on, matched exactly (anything else torchao or
# torch logs meanwhile still shows):
IMPORT_NOISE = (
    # torchao/__init__.py, one per optional C++ extension of the wheel that cannot load in this process (every
    # one on a CPU-only torch; the mxfp8 one on Python != 3.10). FP8 training uses none of them: its GEMM is
    # torch._scaled_mm and its casts are torch ops.
    re.compile(r"Failed to load \S*torchao[/\\]_C\w*(\.[\w-]+)*\.so: "),
    # torch/utils/_pytree.py, when torchao registers its KernelPreference Enum: a deprecation for torchao.
    re.compile(r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile as an opaque "
               r"value type\."),
)
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


class _DropImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in IMPORT_NOISE)


@contextlib.contextmanager
def _quiet_import():
    """Drop IMPORT_NOISE from the loggers that emit it while torchao is imported (on every rank)."""
    noise = _DropImportNoise()
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    for lg in loggers:
        lg.addFilter(noise)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(noise)


@functools.lru_cache(maxsize=None)
def torchao_float8():
    """torchao's float8 training modules, imported once (raises Fp8UnavailableError without torchao)."""
    try:
        with _quiet_import():
            import torchao.float8 as float8
            from torchao.float8 import float8_linear, float8_training_tensor
    except ImportError as e:
        raise Fp8UnavailableError(f"train.precision = 'fp8': torchao is not installed ({e}); install it with "
                                  f"{TORCHAO_INSTALL_HINT}, or use train.precision=bf16") from None
    return float8, float8_linear, float8_training_tensor


def fp8_hardware_problem(device: torch.device) -> Optional[str]:
    """Why FP8 GEMMs cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return (f"this run is on {device.type}; FP8 GEMMs need a CUDA GPU of compute capability >= 8.9 "
                "(Ada, Hopper or newer)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; FP8 GEMMs need "
                ">= 8.9 (Ada, Hopper or newer)")
    return None


def require_fp8_support(train: TrainConfig, device: torch.device) -> None:
    """Raise Fp8UnavailableError (one line naming train.precision and the fix) when ``train`` asks for FP8 and
    this process cannot run it; nothing when it does not ask."""
    if train.precision != "fp8":
        return
    torchao_float8()
    if train.fp8_emulate:
        return
    problem = fp8_hardware_problem(device)
    if problem:
        raise Fp8UnavailableError(f"train.precision = 'fp8': {problem}; use train.precision=bf16 (or "
                                  "train.fp8_emulate=true to check FP8 numerics without the speed)")


@dataclass(frozen=True)
class Fp8Settings:
    """What ``train.fp8_*`` asks for; see the module docstring."""

    recipe: str = "tensorwise"
    compile: bool = True
    emulate: bool = False

    @classmethod
    def from_train(cls, train: TrainConfig) -> Optional["Fp8Settings"]:
        """The settings of ``train.precision = 'fp8'``; None for any other precision."""
        if train.precision != "fp8":
            return None
        return cls(train.fp8_recipe, train.fp8_compile, train.fp8_emulate)


class Fp8Gemm:
    """``x @ weight.T`` for x [..., in] and weight [out, in] through torchao's float8 matmul (autograd: input and
    weight gradients by FP8 GEMMs too), with one recipe's casts. ``compile`` is honoured on CUDA tensors."""

    def __init__(self, settings: Fp8Settings):
        if settings.recipe not in FP8_RECIPES:
            raise ConfigError(f"train.fp8_recipe = {settings.recipe!r}: valid: {', '.join(FP8_RECIPES)}")
        float8, float8_linear, training_tensor = torchao_float8()
        config = float8.Float8LinearConfig.from_recipe_name(settings.recipe)
        if settings.emulate:
            config = dataclasses.replace(config, emulate=True)
        self.settings = settings
        self.config = config
        # What torchao's Float8Linear builds from its config: one ScaledMMConfig per GEMM (output, grad_input,
        # grad_weight).
        self.mm_config = training_tensor.LinearMMConfig(*(
            training_tensor.ScaledMMConfig(config.emulate, gemm.use_fast_accum, False, config.pad_inner_dim)
            for gemm in (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)))

        function = float8_linear.matmul_with_hp_or_float8_args
        mm_config = self.mm_config

        def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            # x keeps its leading dimensions: torchao saves exactly the tensor it is given for the weight
            # gradient, so the sparse FFNs' save_compactly (effdist.model.ffn.saved) still recognises their
            # down projection's input.
            return function.apply(x, weight.t(), mm_config, config)

        self._eager = matmul
        self._compiled = _compile(matmul) if settings.compile else None

        # The three GEMMs one at a time, for linears that run the weight gradient later (the pipeline executor's
        # B/W split). Each is torchao's forward with the operands' cast configs and GEMM config of that GEMM:
        # the same casts (same dtypes, granularity and reduction axes, hence the same scales) as its fused
        # backward.
        def gemm_as_forward(operand_a, operand_b, gemm):
            # Only the forward of ``cfg`` runs; its backward casts are set to the same pair so that torchao's
            # config check (>= 0.18: both operands of every GEMM high-precision or both float8) accepts it.
            cfg = dataclasses.replace(config, cast_config_input=operand_a, cast_config_input_for_grad_weight=operand_a,
                                      cast_config_weight=operand_b, cast_config_weight_for_grad_input=operand_b,
                                      cast_config_grad_output=operand_b,
                                      cast_config_grad_output_for_grad_weight=operand_b)
            mm = training_tensor.LinearMMConfig(*(training_tensor.ScaledMMConfig(
                config.emulate, gemm.use_fast_accum, False, config.pad_inner_dim),) * 3)

            def run(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:  # a [M, K] @ b_t [K, N]
                return function.apply(a, b_t, mm, cfg)

            return run, (_compile(run) if settings.compile else None)

        c = config
        self._split = {
            "output": gemm_as_forward(c.cast_config_input, c.cast_config_weight, c.gemm_config_output),
            "grad_input": gemm_as_forward(c.cast_config_grad_output, c.cast_config_weight_for_grad_input,
                                          c.gemm_config_grad_input),
            "grad_weight": gemm_as_forward(c.cast_config_grad_output_for_grad_weight,
                                           c.cast_config_input_for_grad_weight, c.gemm_config_grad_weight),
        }

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._compiled is not None and x.is_cuda:
            return self._compiled(x, weight)
        return self._eager(x, weight)

    def _run_split(self, name: str, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        eager, compiled = self._split[name]
        with torch.no_grad():  # each GEMM alone, no autograd graph (the caller is an autograd Function)
            return compiled(a, b_t) if compiled is not None and a.is_cuda else eager(a, b_t)

    def output(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Forward alone: ``x @ weight.T`` (x [..., in], weight [out, in]) with the output GEMM's casts."""
        return self._run_split("output", x.reshape(-1, x.shape[-1]), weight.t()).reshape(*x.shape[:-1], -1)

    def grad_input(self, grad_output: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Input gradient alone: ``grad_output @ weight`` with the grad_input GEMM's casts."""
        go = grad_output.reshape(-1, grad_output.shape[-1])
        return self._run_split("grad_input", go, weight).reshape(*grad_output.shape[:-1], -1)

    def grad_weight(self, grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Weight gradient alone: ``grad_output^T @ x`` [out, in] with the grad_weight GEMM's casts."""
        go = grad_output.reshape(-1, grad_output.shape[-1])
        return self._run_split("grad_weight", go.t(), x.reshape(-1, x.shape[-1]))


def _compile(fn: Callable) -> Callable:
    # dynamo keeps one graph per input shape (qkv, proj, fc1, fc2, the V rows of sharing layers), and counts
    # every Fp8Gemm's closure against one code object: more than its default of 8 recompilations.
    import torch._dynamo

    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(64, getattr(torch._dynamo.config, limit_name)))
    return torch.compile(fn, dynamic=False)


def _fp8_forward_impl(layer, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                      grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, **rest):
    """megatron's ``linear_with_grad_accumulation_and_async_allreduce`` contract with an FP8 GEMM.

    The weight gradient goes back through autograd (megatron DDP's hook adds it to ``main_grad``):
    ``gradient_accumulation_fusion`` is not used here. Frozen weights and megatron's embedding-wgrad deferral
    keep megatron's own Function.
    """
    if not weight.requires_grad or grad_output_buffer is not None or rest:
        return super(_Fp8Linear, layer)._forward_impl(
            input=input, weight=weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
            allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
            grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit, tp_group=tp_group,
            **rest)
    group = tp_group if tp_group is not None else layer.tp_group
    if sequence_parallel:
        # All-gather along the sequence; backward reduce-scatters the input gradient (megatron's Function does
        # the same around its GEMM, and saves only the local shard: here the gathered input is saved).
        input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=group)  # backward: all-reduce the input grad
    output = fp8_gemm_of(layer)(input, weight)
    if bias is not None:
        output = output + bias
    return output


def fp8_gemm_of(layer) -> Fp8Gemm:
    gemm = getattr(layer.config, "effdist_fp8_gemm", None)
    if gemm is None:
        raise RuntimeError(f"{type(layer).__name__} needs its TransformerConfig's effdist_fp8_gemm (build the model "
                           "with effdist.model.gpt.build_gpt and train.precision=fp8)")
    return gemm


class _Fp8Linear:
    """Mixin for a megatron linear: the Fp8Gemm on its TransformerConfig (``effdist_fp8_gemm``, set by
    build_gpt; copies of the config made by FFN modules keep it) runs its matmul."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _fp8_forward_impl(self, input, weight, *args, **kwargs)


class Fp8ColumnParallelLinear(_Fp8Linear, ColumnParallelLinear):
    """megatron's ColumnParallelLinear with its GEMMs in FP8."""

    def forward_rows(self, input_: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor]):
        """The layer applied with the output rows ``rows(weight)`` of its weight (EPAS: the V rows of
        linear_qkv in a sharing layer), through the FP8 GEMM. The rows' gradient reaches the weight through
        autograd (the other rows get zeros). Returns ``(output, output_bias)`` like forward."""
        if self.allreduce_dgrad or self.sequence_parallel or self.explicit_expert_comm or self.disable_grad_reduce:
            input_parallel = input_
        else:
            input_parallel = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        bias = None
        if self.bias is not None and not self.skip_bias_add:
            bias = rows(self.bias.unsqueeze(-1)).reshape(-1)
        output = self._forward_impl(input=input_parallel, weight=rows(self.weight), bias=bias,
                                    gradient_accumulation_fusion=False, allreduce_dgrad=self.allreduce_dgrad,
                                    sequence_parallel=self.sequence_parallel, tp_group=self.tp_group)
        if self.gather_output:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        output_bias = rows(self.bias.unsqueeze(-1)).reshape(-1) if self.skip_bias_add and self.bias is not None else None
        return output, output_bias


class Fp8RowParallelLinear(_Fp8Linear, RowParallelLinear):
    """megatron's RowParallelLinear with its GEMMs in FP8 (the output reduction is megatron's, in bf16)."""


FP8_LINEARS = LinearImpl(column=Fp8ColumnParallelLinear, row=Fp8RowParallelLinear)


def count_fp8_linears(model: torch.nn.Module) -> int:
    return sum(isinstance(m, _Fp8Linear) for m in model.modules())
