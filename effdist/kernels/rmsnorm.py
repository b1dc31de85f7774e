"""RMSNorm: one Triton kernel for the forward, one for the backward, beside the plain-torch reference.

The reference is exactly effdist's RMSNorm (statistics in fp32, the normalised input rounded to the
input dtype, then multiplied by the weight). In plain torch that is a chain of seven elementwise
passes over fp32 copies of the activation, and autograd keeps several of those fp32 copies for the
backward; the kernels read the input once, write the output once, and keep only the input and one
fp32 ``rstd`` per row. The forward rounds where the reference rounds, so its output matches the
reference to the last bit up to the order of the fp32 sum of squares.

`rmsnorm(x, weight, eps)` dispatches: Triton on CUDA tensors, the reference elsewhere (Triton needs
a GPU unless its CPU interpreter is active, which only tests turn on: ``use_triton=True``).
"""

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton keep the reference path
    triton = None


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32: bf16 sums of squares lose too much precision at large hidden sizes.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf.to(dtype)) * weight


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, use_triton: bool | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension; ``use_triton`` defaults to ``x.is_cuda``."""
    if use_triton is None:
        use_triton = x.is_cuda
    if not use_triton:
        return rmsnorm_reference(x, weight, eps)
    if triton is None:
        raise RuntimeError("rmsnorm(use_triton=True) needs the triton package")
    return _RMSNormFunction.apply(x, weight, eps)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


@functools.cache
def _kernels():
    """The Triton kernels, decorated on first use: Triton reads TRITON_INTERPRET when a kernel is
    decorated, so a test that turns the interpreter on after this module was imported still gets it."""

    @triton.jit
    def forward(x_ptr, w_ptr, y_ptr, rstd_ptr, x_row_stride, y_row_stride, hidden, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        # Round the normalised input to the input dtype, as the reference does, before the weight.
        xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (xhat * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, rows_per_program,
                 dy_row_stride, x_row_stride, dx_row_stride, hidden, BLOCK: tl.constexpr):
        # Each program owns a contiguous band of rows and sums its share of the weight gradient in
        # registers; the host adds the per-program partial sums (no atomics, deterministic).
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        col_mask = cols < hidden
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for i in range(0, rows_per_program):
            row = first + i
            # (a block-shaped row index: the CPU interpreter rejects a block mask & a scalar)
            mask = col_mask & ((cols * 0 + row) < rows)
            x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
            xhat = x * rstd
            dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
            # The reference's autograd rounds dy * w to the activation dtype (a low-precision multiply).
            dxhat = (dy * w).to(x_ptr.dtype.element_ty).to(tl.float32)
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / hidden))
            tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_partial_ptr + pid.to(tl.int64) * hidden + cols, dw, mask=col_mask)

    return forward, backward


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _backward_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # A few programs per SM: enough to fill the GPU, few partial weight-gradient rows to sum.
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        if weight.shape != (hidden,):
            raise ValueError(f"rmsnorm: weight of shape {tuple(weight.shape)} does not match hidden size {hidden}")
        x2 = _as_rows(x)
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(hidden)
        forward_kernel, _ = _kernels()
        if x2.shape[0] > 0:
            forward_kernel[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), hidden, eps,
                                           BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, hidden = x2.shape
        dy2 = _as_rows(dy)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        programs = _backward_programs(rows, x2.device)
        rows_per_program = triton.cdiv(rows, programs) if rows else 0
        dw_partial = torch.zeros(programs, hidden, dtype=torch.float32, device=x2.device)
        block = triton.next_power_of_2(hidden)
        _, backward_kernel = _kernels()
        if rows > 0:
            backward_kernel[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, rows, rows_per_program,
                                         dy2.stride(0), x2.stride(0), dx.stride(0), hidden,
                                         BLOCK=block, num_warps=_num_warps(block))
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None
