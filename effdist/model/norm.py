"""RMSNorm that works with megatron's sequence parallelism.

megatron's WrappedTorchNorm refuses sequence parallelism, and apex/Transformer Engine norms are not
always installed. Under sequence parallelism each TP rank normalises its own slice of the sequence,
so the norm weight's gradient is partial on every rank: marking the weight ``sequence_parallel``
makes megatron's gradient finalisation all-reduce it over the TP group.

``fused=True`` (``train.fused_kernels``) runs the Triton RMSNorm of effdist.kernels.rmsnorm on CUDA
tensors (same rounding, one read and one write of the activation instead of a chain of fp32 passes);
on CPU, and with ``fused=False``, it is the plain-torch reference.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import nn

from effdist.kernels.rmsnorm import rmsnorm, rmsnorm_reference


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, fused: bool = False, **_unused):
        super().__init__()
        self.config = config
        self.eps = eps
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                              device="cpu" if config.use_cpu_initialization else None))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return rmsnorm(x, self.weight, self.eps, use_triton=x.is_cuda)
        return rmsnorm_reference(x, self.weight, self.eps)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {}, sharded_offsets)


def rmsnorm_spec(fused: bool) -> type | ModuleSpec:
    """What a layer spec's norm slot gets: the plain class (today's model) or the fused one."""
    return ModuleSpec(module=RMSNorm, params={"fused": True}) if fused else RMSNorm
