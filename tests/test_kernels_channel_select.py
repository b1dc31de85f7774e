"""Channel gather/activate/scatter kernels (Triton, run by its CPU interpreter) against their torch
reference, and the reference's gradient against autograd of the dense masked formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter, requires_gpu  # isort: skip

from effdist.kernels.channel_select import (
    scatter_activated_reference,
    scatter_activated_triton,
    select_activate_backward_reference,
    select_activate_backward_triton,
    select_activate_reference,
    select_activate_triton,
)

ACTS = ["swiglu", "relu", "relu2"]
# (rows, width, slots): odd sizes; slot blocks that straddle the kernel's block size.
SIZES = [(13, 37, 9), (1, 5, 5), (21, 300, 150)]


def _case(act: str, n: int, width: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, 2 * width if act == "swiglu" else width, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.stack([torch.randperm(width, generator=g)[:k] for _ in range(n)]).to(torch.int16)
    # Unused slots (another tensor-parallel rank won them): one in a row, and a whole row.
    idx[0, -1] = -1
    if n > 2:
        idx[2, :] = -1
    return src, idx


def _mask(idx: torch.Tensor, width: int) -> torch.Tensor:
    target = torch.where(idx >= 0, idx.long(), width)  # unused slots mark a spare column
    return torch.zeros(idx.shape[0], width + 1, dtype=torch.bool).scatter_(1, target, True)[:, :width]


def _dense_masked(src: torch.Tensor, idx: torch.Tensor, width: int, act: str) -> torch.Tensor:
    if act == "swiglu":
        z = F.silu(src[:, :width]) * src[:, width:]
    elif act == "relu":
        z = torch.relu(src)
    else:
        z = torch.relu(src) ** 2
    return z * _mask(idx, width)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("act", ACTS)
def test_triton_matches_reference(act, size, dtype):
    n, width, k = size
    src, idx = _case(act, n, width, k, dtype)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    z_t, a_t, b_t = select_activate_triton(src, idx, width, act)
    z_r, a_r, b_r = select_activate_reference(src, idx, width, act)
    assert torch.allclose(z_t, z_r, **tol)
    assert torch.equal(a_t[idx >= 0], a_r[idx >= 0])
    assert (b_t is None) == (b_r is None) == (act != "swiglu")
    if b_t is not None:
        assert torch.equal(b_t[idx >= 0], b_r[idx >= 0])
    assert torch.allclose(scatter_activated_triton(a_r, b_r, idx, width, act), z_r, **tol)
    dz = torch.randn(n, width, dtype=dtype)
    assert torch.allclose(select_activate_backward_triton(dz, a_r, b_r, idx, width, act),
                          select_activate_backward_reference(dz, a_r, b_r, idx, width, act), **tol)


@needs_interpreter
def test_triton_bf16_within_rounding():
    src, idx = _case("swiglu", 13, 37, 9, torch.bfloat16)
    z_t, _, _ = select_activate_triton(src, idx, 37, "swiglu")
    z_r, _, _ = select_activate_reference(src, idx, 37, "swiglu")
    # The CPU interpreter rounds to bf16 by truncation: at most one bf16 ulp apart.
    assert torch.allclose(z_t.float(), z_r.float(), rtol=2 ** -7, atol=1e-30)


@pytest.mark.parametrize("act", ACTS)
def test_reference_is_the_dense_masked_function_and_its_gradient(act):
    n, width, k = 13, 37, 9
    src, idx = _case(act, n, width, k, torch.float64, seed=1)
    z, a, b = select_activate_reference(src, idx, width, act)
    x = src.clone().requires_grad_(True)
    dense = _dense_masked(x, idx, width, act)
    assert torch.allclose(z, dense, rtol=1e-12, atol=0)
    assert torch.equal(scatter_activated_reference(a, b, idx, width, act), z)
    dz = torch.randn(n, width, dtype=torch.float64)
    dense.backward(dz)
    assert torch.allclose(select_activate_backward_reference(dz, a, b, idx, width, act), x.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("act", ACTS)
def test_autograd_function_passes_gradcheck(act):
    from effdist.model.ffn.channel import _SelectActivate

    n, width, k = 5, 11, 4
    src, idx = _case(act, n, width, k, torch.float64, seed=2)
    src = src + 0.05 * torch.sign(src)  # keep relu inputs away from the kink at 0
    src.requires_grad_(True)

    def f(s):
        return _SelectActivate.apply(s, idx, width, act, [])

    assert torch.autograd.gradcheck(f, (src,), eps=1e-6, atol=1e-8)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
def test_cuda_kernels_match_reference(act, dtype):
    for n, width, k in SIZES + [(4099, 5632, 1056)]:
        src, idx = _case(act, n, width, k, dtype, seed=3)
        src, idx = src.cuda(), idx.cuda()
        # Compiled sigmoid/exp differ from torch's by float rounding only.
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        z_t, a_t, b_t = select_activate_triton(src, idx, width, act)
        z_r, a_r, b_r = select_activate_reference(src, idx, width, act)
        assert torch.allclose(z_t.float(), z_r.float(), **tol)
        valid = idx >= 0
        assert torch.equal(a_t[valid], a_r[valid])
        assert torch.allclose(scatter_activated_triton(a_r, b_r, idx, width, act).float(), z_r.float(), **tol)
        dz = torch.randn(n, width, dtype=dtype, device="cuda")
        assert torch.allclose(select_activate_backward_triton(dz, a_r, b_r, idx, width, act).float(),
                              select_activate_backward_reference(dz, a_r, b_r, idx, width, act).float(), **tol)
