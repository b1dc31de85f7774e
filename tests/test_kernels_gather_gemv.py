"""Gather-GEMV kernels (Triton, run by its CPU interpreter) against their torch reference, and the
reference against the dense products it replaces (a masked dense GEMV over all channels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter, requires_gpu  # isort: skip

from effdist.kernels.gather_gemv import (
    compact_active,
    gather_rows_combine,
    gather_rows_combine_reference,
    gather_rows_combine_triton,
    gather_rows_matvec,
    gather_rows_matvec_reference,
    gather_rows_matvec_triton,
)

# (rows, channels, features, slots): odd sizes; slot and feature blocks that straddle the kernels' blocks.
SIZES = [(1, 40, 33, 7), (5, 300, 130, 75), (3, 64, 257, 64)]


def _case(rows, channels, features, slots, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, features, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(channels, generator=g)[:slots] for _ in range(rows)]).to(torch.int32)
    coef = torch.randn(rows, slots, generator=g).to(dtype)
    x = torch.randn(rows, features, generator=g).to(dtype)
    if rows > 1:
        idx[1, 0] = -1  # an unused slot
    return weight, idx, coef, x


def _dense_coef(coef, idx, channels, count=None):
    """The same products as a dense [rows, channels] operand with zeros off the active channels."""
    dense = torch.zeros(idx.shape[0], channels + 1, dtype=torch.float64)
    valid = idx >= 0
    if count is not None:
        valid &= torch.arange(idx.shape[1])[None] < count[:, None]
    target = torch.where(valid, idx.long(), channels)
    return dense.scatter_(1, target, torch.where(valid, coef.double(), 0.0))[:, :channels]


@pytest.mark.parametrize("size", SIZES)
def test_references_equal_the_dense_products(size):
    rows, channels, features, slots = size
    weight, idx, coef, x = _case(rows, channels, features, slots, torch.float64)
    count = torch.randint(0, slots + 1, (rows,), generator=torch.Generator().manual_seed(1)).to(torch.int32)
    for cnt in (None, count):
        want = _dense_coef(coef, idx, channels, cnt) @ weight
        torch.testing.assert_close(gather_rows_combine_reference(coef, idx, weight, cnt), want)
    full = x @ weight.t()  # [rows, channels]
    want_u = torch.where(idx >= 0, full.gather(1, idx.long().clamp_min(0)), 0.0)
    torch.testing.assert_close(gather_rows_matvec_reference(x, idx, weight), want_u)
    gate = torch.randn(rows, slots, dtype=torch.float64)
    torch.testing.assert_close(gather_rows_matvec_reference(x, idx, weight, gate),
                               torch.where(idx >= 0, F.silu(gate) * want_u, 0.0))


@needs_interpreter
@pytest.mark.parametrize("size", SIZES)
def test_combine_triton_matches_reference(size):
    rows, channels, features, slots = size
    weight, idx, coef, x = _case(rows, channels, features, slots, torch.float32)
    count = torch.tensor([slots, slots // 2, 0, 3, 1][:rows], dtype=torch.int32)
    for cnt in (None, count):
        want = gather_rows_combine_reference(coef, idx, weight, cnt)
        for split in (1, 4):  # one program per row, and a row's slots shared by several programs
            got = gather_rows_combine_triton(coef, idx, weight, cnt, split=split)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gather_rows_combine_triton(coef, idx, weight, cnt), want, rtol=1e-5, atol=1e-5)
    if rows > 2:  # a row with count 0 is exactly zero
        assert torch.equal(gather_rows_combine_triton(coef, idx, weight, count)[2], torch.zeros(features))


@needs_interpreter
@pytest.mark.parametrize("size", SIZES)
def test_matvec_triton_matches_reference(size):
    rows, channels, features, slots = size
    weight, idx, coef, x = _case(rows, channels, features, slots, torch.float32)
    torch.testing.assert_close(gather_rows_matvec_triton(x, idx, weight), gather_rows_matvec_reference(x, idx, weight),
                               rtol=1e-5, atol=1e-5)
    gated = gather_rows_matvec_triton(x, idx, weight, gate=coef)
    torch.testing.assert_close(gated, gather_rows_matvec_reference(x, idx, weight, gate=coef), rtol=1e-5, atol=1e-5)
    assert (gated[idx < 0] == 0).all()


@needs_interpreter
def test_triton_bf16_within_rounding():
    weight, idx, coef, x = _case(3, 64, 257, 64, torch.bfloat16)
    got = gather_rows_combine_triton(coef, idx, weight)
    want = gather_rows_combine_reference(coef, idx, weight)
    # Both accumulate in fp32 and round once; the interpreter truncates to bf16: within two bf16 ulps.
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=1e-2)
    assert got.dtype == torch.bfloat16


def test_compact_active_moves_nonzeros_first_in_channel_order():
    z = torch.tensor([[0.0, 2.0, 0.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    coef, idx, count = compact_active(z)
    assert count.tolist() == [3, 0, 5]
    assert idx[0, :3].tolist() == [1, 3, 4] and coef[0, :3].tolist() == [2.0, -1.0, 3.0]
    assert (idx[0, 3:] == -1).all() and (idx[1] == -1).all() and idx[2].tolist() == [0, 1, 2, 3, 4]
    coef2, idx2, _ = compact_active(z[:2], max_active=3)  # a bound on the non-zeros per row
    assert idx2.shape == (2, 3) and idx2[0].tolist() == [1, 3, 4]
    weight = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(gather_rows_combine(coef.double(), idx, weight, count), z.double() @ weight)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_match_reference(dtype):
    weight, idx, coef, x = (t.cuda() for t in _case(8, 5632, 2048, 563, dtype))
    count = torch.randint(0, 564, (8,), device="cuda", dtype=torch.int32)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gather_rows_combine(coef, idx, weight, count),
                               gather_rows_combine_reference(coef, idx, weight, count), **tol)
    torch.testing.assert_close(gather_rows_matvec(x, idx, weight, coef),
                               gather_rows_matvec_reference(x, idx, weight, coef), **tol)
