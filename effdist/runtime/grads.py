"""Where a parameter's gradient lives after backward; shared by the optimizer and the features that
adjust gradients before it (EPAS), so both read the same tensor."""

from __future__ import annotations

import torch


def accumulated_grad(param: torch.nn.Parameter):
    """The gradient backward accumulated for `param`: megatron DDP's fp32 ``main_grad`` where it has one
    (reduced over data-parallel ranks once the grad sync finished), else ``.grad``; None if neither."""
    grad = getattr(param, "main_grad", None)
    return param.grad if grad is None else grad
