"""The sum of several gradients of one shape and layout in one pass (EPAS: the anchor's Q/K gradient,
summed over the run of sharing layers that read it), beside the plain-torch reference.

Why a kernel: adding N gradients into an accumulator one at a time reads the accumulator N times and writes
it N times (N = 12 sharing layers of LLaMA-1B at 3L/4: 35 passes over a 128 MB packed Q/K gradient, ~1.6 ms
on an H100). Summing several at once reads each input once and the accumulator once per call.

`sum_into(out, inputs, accumulate)` computes ``out (+)= inputs[0] + inputs[1] + ...`` in that order, in fp32
(fp64 for fp64), rounded once into ``out``. The inputs must share one memory layout that is dense in some
order of the dimensions (what an attention kernel's gradients are: every layer returns the same layout);
``out`` may be strided differently (the packed Q/K halves are [s, b, heads, d] while the kernels return
[b, heads, s, d]): the kernel walks the inputs in memory order and scatters into ``out`` by its strides.
Layouts outside that, CPU tensors, and more than `MAX_INPUTS` inputs at once go through the reference.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from effdist.kernels._common import HAVE_TRITON, compute_dtype

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_INPUTS = 8
_BLOCK = 2048


def sum_reference(out: torch.Tensor, inputs: Sequence[torch.Tensor], accumulate: bool = False) -> torch.Tensor:
    """``out (+)= sum(inputs)`` in order, accumulated in the compute dtype and rounded once into ``out``."""
    dtype = compute_dtype(out.dtype)
    acc = out.to(dtype) if accumulate else torch.zeros(out.shape, dtype=dtype, device=out.device)
    for t in inputs:
        acc = acc + t.to(dtype)
    out.copy_(acc)
    return out


def _memory_order(t: torch.Tensor) -> Optional[list[int]]:
    """The order of t's dimensions in which its elements are dense (outermost first), or None."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.shape[d]))
    return order if t.permute(order).is_contiguous() else None


def triton_supports(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    """Inputs of out's shape and dtype sharing one dense layout, at most 4 dimensions and `MAX_INPUTS` inputs."""
    if not inputs or len(inputs) > MAX_INPUTS or out.dim() > 4 or out.dtype == torch.float64:
        return False
    first = inputs[0]
    if any(t.shape != out.shape or t.dtype != out.dtype or t.device != out.device or t.stride() != first.stride()
           for t in inputs):
        return False
    return _memory_order(first) is not None


def sum_into(out: torch.Tensor, inputs: Sequence[torch.Tensor], accumulate: bool = False,
             use_triton: Optional[bool] = None) -> torch.Tensor:
    """``out (+)= inputs[0] + inputs[1] + ...`` (see the module docstring); returns ``out``. Triton on CUDA
    tensors (``use_triton`` overrides) where `triton_supports` the layouts, the reference otherwise."""
    inputs = list(inputs)
    if not inputs:
        if not accumulate:
            out.zero_()
        return out
    if use_triton is None:
        use_triton = out.is_cuda
    if not (use_triton and HAVE_TRITON and triton_supports(out, inputs)):
        return sum_reference(out, inputs, accumulate)
    order = _memory_order(inputs[0])
    # Leading singleton dimensions make every layout 4-D.
    pad = 4 - out.dim()
    out_view = out.permute(order)[(None,) * pad]
    sizes = out_view.shape
    ostrides = out_view.stride()
    n = out.numel()
    if n == 0:
        return out
    flat = [t.permute(order) for t in inputs]
    pointers = flat + [flat[0]] * (MAX_INPUTS - len(flat))
    _kernel()[(triton.cdiv(n, _BLOCK),)](
        out_view, *pointers, n, sizes[1], sizes[2], sizes[3], *ostrides,
        NUM=len(inputs), ACCUMULATE=accumulate, OUT_DENSE=out_view.is_contiguous(), BLOCK=_BLOCK, num_warps=8)
    return out


@functools.cache
def _kernel():
    """The Triton kernel, decorated on first use (Triton reads TRITON_INTERPRET at decoration)."""

    @triton.jit
    def grad_sum(out_ptr, p0, p1, p2, p3, p4, p5, p6, p7, n, size1, size2, size3, os0, os1, os2, os3,
                 NUM: tl.constexpr, ACCUMULATE: tl.constexpr, OUT_DENSE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        if OUT_DENSE:
            dst = offs
        else:
            i3 = offs % size3
            rest = offs // size3
            i2 = rest % size2
            rest = rest // size2
            i1 = rest % size1
            i0 = rest // size1
            dst = i0 * os0 + i1 * os1 + i2 * os2 + i3 * os3
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if ACCUMULATE:
            acc += tl.load(out_ptr + dst, mask=mask, other=0.0).to(tl.float32)
        # The same order as the reference: out, then the inputs one after another.
        acc += tl.load(p0 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 1:
            acc += tl.load(p1 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 2:
            acc += tl.load(p2 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 3:
            acc += tl.load(p3 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 4:
            acc += tl.load(p4 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 5:
            acc += tl.load(p5 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 6:
            acc += tl.load(p6 + offs, mask=mask, other=0.0).to(tl.float32)
        if NUM > 7:
            acc += tl.load(p7 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return grad_sum
