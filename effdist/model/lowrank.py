"""Low-rank linears W = A·B (rank r) with megatron's ColumnParallel/RowParallel constructor signatures.

They drop into any linear slot of a megatron spec (an FFN's fc1/fc2, attention's linear_qkv /
linear_proj) as ``ModuleSpec(LowRankColumnParallelLinear, params={"rank": r})``. W [out, in] is
applied as x -> B (in -> r) -> A (r -> out).

Tensor parallelism, chosen so that the only collectives are the ones the full-rank layer already
has, on r-wide instead of out- or in-wide tensors:
  column-parallel (W's output dim sharded): B is replicated, A is a ColumnParallelLinear (r -> out),
    sharded like W's rows. A's input copy (identity forward, all-reduce backward) sums every rank's
    contribution to d(Bx), so B's gradient is complete and identical on every rank without an
    extra reduction. Under sequence parallelism A all-gathers the r-wide Bx instead of the h-wide x.
  row-parallel (W's input dim sharded): B is a RowParallelLinear (in -> r), sharded like W's
    columns; its all-reduce (or reduce-scatter) is r wide; A is replicated and applied after it.
Replicated factors see sequence-sharded activations under sequence parallelism, so their weights
are marked ``sequence_parallel`` (their gradients need the TP all-reduce, exactly like norm weights).
The sharded factor is built from the spec's linear class (`sharded_linear`), so a B/W-split linear
substituted by the pipeline executor defers its weight gradient; the replicated factor's weight
gradient is computed in the ordinary backward.

Initialisation: both factors ~ N(0, a²) with a² = σ/√r, so W = A·B has entries of std σ, the std
of the init_method the full-rank layer would have used (read from megatron's init partial,
else config.init_method_std). Every factor is drawn whole from one generator and sliced, so a TP=2
model starts from the same W as a TP=1 model (on CPU, where megatron also initialises whole weights).
"""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module


def target_std(init_method, config) -> float:
    """The std the full-rank weight would be drawn with."""
    if isinstance(init_method, functools.partial) and "std" in init_method.keywords:
        return float(init_method.keywords["std"])
    return float(config.init_method_std)


def factor_std(std: float, rank: int) -> float:
    return math.sqrt(std / math.sqrt(rank))


def _normal_init(std: float):
    return functools.partial(torch.nn.init.normal_, mean=0.0, std=std)


def _check_rank(rank: int, input_size: int, output_size: int) -> None:
    if not 0 < rank <= min(input_size, output_size):
        raise ValueError(f"low-rank rank = {rank} must lie in [1, min(in, out) = {min(input_size, output_size)}]")


class ReplicatedLinear(MegatronModule):
    """y = x Wᵀ with W whole on every TP rank (drawn from the default generator, the same on all ranks)."""

    def __init__(self, input_size: int, output_size: int, *, config, std: float):
        super().__init__(config=config)
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        master = torch.empty(output_size, input_size, dtype=torch.float32, device=device)
        if config.perform_initialization:
            master.normal_(mean=0.0, std=std)
        self.weight = torch.nn.Parameter(master.to(config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


class LowRankColumnParallelLinear(MegatronModule):
    """ColumnParallelLinear-compatible W = A·B: B replicated, A column-parallel. Returns (out, bias)."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, rank: int, bias: bool = True,
                 gather_output: bool = False, stride: int = 1, skip_bias_add: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name=None, tp_group=None, sharded_linear=ColumnParallelLinear, **kwargs):
        super().__init__(config=config)
        _check_rank(rank, input_size, output_size)
        self.rank = rank
        std = factor_std(target_std(init_method, config), rank)
        self.factor_in = ReplicatedLinear(input_size, rank, config=config, std=std)
        self.factor_out = build_module(sharded_linear, rank, output_size, config=config, init_method=_normal_init(std),
                                       bias=bias, gather_output=gather_output, stride=stride,
                                       skip_bias_add=skip_bias_add, is_expert=is_expert,
                                       tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group, **kwargs)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        if weight is not None:
            raise ValueError("LowRankColumnParallelLinear holds its own factors; an external weight is not supported")
        return self.factor_out(self.factor_in(input_), runtime_gather_output=runtime_gather_output)

    def backward_dw(self):
        if hasattr(self.factor_out, "backward_dw"):
            self.factor_out.backward_dw()


class LowRankRowParallelLinear(MegatronModule):
    """RowParallelLinear-compatible W = A·B: B row-parallel (its reduction is r wide), A replicated."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, rank: int, bias: bool = True,
                 input_is_parallel: bool = True, skip_bias_add: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name=None, tp_group=None, sharded_linear=RowParallelLinear, **kwargs):
        super().__init__(config=config)
        _check_rank(rank, input_size, output_size)
        self.rank = rank
        self.skip_bias_add = skip_bias_add
        std = factor_std(target_std(init_method, config), rank)
        self.factor_in = build_module(sharded_linear, input_size, rank, config=config, init_method=_normal_init(std),
                                      bias=False, input_is_parallel=input_is_parallel, skip_bias_add=True,
                                      is_expert=is_expert, tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group,
                                      **kwargs)
        self.factor_out = ReplicatedLinear(rank, output_size, config=config, std=std)
        if bias:
            device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
            self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype, device=device))
            setattr(self.bias, "sequence_parallel", bool(config.sequence_parallel))
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor):
        reduced, _ = self.factor_in(input_)
        return self.apply_factor_out(reduced)

    def apply_factor_out(self, reduced: torch.Tensor):
        """The replicated half of the forward, from the TP-reduced r-wide activation."""
        out = self.factor_out(reduced)
        if self.bias is None:
            return out, None
        if self.skip_bias_add:
            return out, self.bias
        return out + self.bias, None

    def backward_dw(self):
        if hasattr(self.factor_in, "backward_dw"):
            self.factor_in.backward_dw()
