"""What the sparse-FFN kernel modules (channel_select, sparse24, nm_select) share, written once.

Each of those modules dispatches to its Triton kernels on CUDA tensors and to its plain-torch reference
elsewhere, computes in fp32 (fp64 for fp64 inputs, which gradient checks use) and hands Triton row-major
tensors. The @triton.jit helpers here are inlined by Triton into the kernels that call them, so moving
them out of the kernel modules leaves the generated GPU code as it was.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency; keep CPU use possible without it
    HAVE_TRITON = False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic runs in fp32, or fp64 for fp64 inputs (used by gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def use_triton(t: torch.Tensor) -> bool:
    """Whether the dispatching functions run the Triton kernel for t (CUDA) or the torch reference (CPU)."""
    return HAVE_TRITON and t.is_cuda


def rowmajor(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along its last dimension (copied only when it is not): the kernels index rows by stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


if HAVE_TRITON:

    @triton.jit
    def upcast(x):
        """The kernels' compute dtype (see compute_dtype): fp64 stays fp64, everything else becomes fp32."""
        if x.dtype != tl.float64:
            x = x.to(tl.float32)
        return x
