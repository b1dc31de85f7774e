"""Triton kernels, each beside the plain-torch reference it is tested against.

On CUDA tensors the dispatching functions run the Triton kernels; on CPU they run the references.
Tests run the Triton kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1, which must be
set before triton is first imported in the process; see `triton_interpreter_active`).
"""

from __future__ import annotations


def triton_interpreter_active() -> bool:
    """True when Triton kernels launched on CPU tensors run through Triton's interpreter here."""
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError:
        return False

    @triton.jit
    def _probe(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32) + 1.0)

    x = torch.zeros(4)
    try:
        _probe[(1,)](x, BLOCK=4)
    except Exception:
        return False
    return bool((x == 1).all())
