"""RMSNorm that works with megatron's sequence parallelism.

megatron's WrappedTorchNorm refuses sequence parallelism, and apex/Transformer Engine norms are not
always installed. Under sequence parallelism each TP rank normalises its own slice of the sequence,
so the norm weight's gradient is partial on every rank: marking the weight ``sequence_parallel``
makes megatron's gradient finalisation all-reduce it over the TP group.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.config = config
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                              device="cpu" if config.use_cpu_initialization else None))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: bf16 sums of squares lose too much precision at large hidden sizes.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf.to(dtype)) * self.weight

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, {}, sharded_offsets)
