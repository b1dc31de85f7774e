"""SwiGLU on megatron's fused fc1 output: ``x = [gate | up]`` -> ``silu(gate) * up``, as one Triton
kernel for the forward and one for the backward, beside the plain-torch reference.

megatron's MLP without fusions computes ``silu(gate)`` into a new tensor, multiplies it by ``up``
into another, and autograd keeps ``silu(gate)`` for the backward, whose three products and the
concatenation of the two half-gradients are separate passes again. The kernels read ``x`` once and
write ``y`` once; the backward reads ``dy`` and ``x`` and writes ``dx`` (both halves) once, and
nothing but ``x`` (which fc1's output already is) is kept. Rounding follows the reference: silu is
rounded to the activation dtype before the product, as the unfused chain does.

`swiglu(x)` dispatches: Triton on CUDA tensors, the reference elsewhere (``use_triton=True`` forces
Triton, e.g. under Triton's CPU interpreter in tests).
"""

import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton keep the reference path
    triton = None

_BLOCK = 1024


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


def swiglu(x: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """``silu(x[..., :f]) * x[..., f:]`` for ``x`` of last dimension 2f; ``use_triton`` defaults to ``x.is_cuda``."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension ({x.shape[-1]}) must be even: [gate | up] halves")
    if use_triton is None:
        use_triton = x.is_cuda
    if not use_triton:
        return swiglu_reference(x)
    if triton is None:
        raise RuntimeError("swiglu(use_triton=True) needs the triton package")
    return _SwiGLUFunction.apply(x)


@functools.cache
def _kernels():
    """The Triton kernels, decorated on first use (Triton reads TRITON_INTERPRET at decoration)."""

    @triton.jit
    def forward(x_ptr, y_ptr, x_row_stride, y_row_stride, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        x_row = x_ptr + row * x_row_stride
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (act * up).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def backward(dy_ptr, x_ptr, dx_ptr, dy_row_stride, x_row_stride, dx_row_stride, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        ty = dx_ptr.dtype.element_ty
        x_row = x_ptr + row * x_row_stride
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + width + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        act = (gate * sig).to(ty).to(tl.float32)
        dact = (dy * up).to(ty).to(tl.float32)
        dgate = dact * sig * (1.0 + gate * (1.0 - sig))
        dx_row = dx_ptr + row * dx_row_stride
        tl.store(dx_row + cols, dgate.to(ty), mask=mask)
        tl.store(dx_row + width + cols, (dy * act).to(ty), mask=mask)

    return forward, backward


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x2 = _as_rows(x)
        rows, width = x2.shape[0], x2.shape[1] // 2
        y = torch.empty(rows, width, dtype=x.dtype, device=x.device)
        forward_kernel, _ = _kernels()
        if rows and width:
            forward_kernel[(rows, triton.cdiv(width, _BLOCK))](x2, y, x2.stride(0), y.stride(0), width,
                                                               BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x2,) = ctx.saved_tensors
        rows, width = x2.shape[0], x2.shape[1] // 2
        dy2 = _as_rows(dy)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        _, backward_kernel = _kernels()
        if rows and width:
            backward_kernel[(rows, triton.cdiv(width, _BLOCK))](dy2, x2, dx, dy2.stride(0), x2.stride(0), dx.stride(0),
                                                                width, BLOCK=_BLOCK, num_warps=4)
        return dx.view(ctx.x_shape)
