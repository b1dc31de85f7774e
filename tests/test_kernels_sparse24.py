"""The fused ReLU² + 2:4 kernels (Triton, run by its CPU interpreter) against their torch reference."""

from __future__ import annotations

import pytest
import torch

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter, requires_gpu  # isort: skip

from effdist.kernels import sparse24
from effdist.kernels.sparse24 import (
    DECOMPRESS_RELU2_GRAD,
    DECOMPRESS_SQUARE,
    DECOMPRESS_VALUES,
    decompress24_reference,
    decompress24_triton,
    relu2_grad_reference,
    relu2_grad_triton,
    sparsify24_reference,
    sparsify24_triton,
)

SHAPES = [(1, 4), (5, 12), (37, 44), (19, 136)]  # odd row counts, odd and even group counts


def _input(n: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g, dtype=torch.float64).to(dtype)
    # Ties: an all-zero group, a group of equal magnitudes with mixed signs, repeated values.
    if width >= 8:
        x[0, :4] = 0
        x[-1, 4:8] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=dtype)
    return x


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        # The CPU interpreter rounds float->bf16 by truncation, torch to nearest: one bf16 ulp apart.
        return torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=0)
    return torch.equal(a, b)


@needs_interpreter
@pytest.mark.parametrize("relu2", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparsify_matches_reference(shape, dtype, relu2):
    x = _input(*shape, dtype, seed=shape[0] * 31 + shape[1])
    dense_t, values_t, meta_t = sparsify24_triton(x, relu2=relu2)
    dense_r, values_r, meta_r = sparsify24_reference(x, relu2=relu2)
    assert torch.equal(meta_t, meta_r)
    assert _close(values_t, values_r, dtype)
    assert _close(dense_t, dense_r, dtype)
    # Only the outputs asked for are written.
    only_dense = sparsify24_triton(x, relu2=relu2, write_compressed=False)
    assert only_dense[1] is None and only_dense[2] is None and _close(only_dense[0], dense_r, dtype)


@needs_interpreter
@pytest.mark.parametrize("mode", [DECOMPRESS_VALUES, DECOMPRESS_SQUARE, DECOMPRESS_RELU2_GRAD])
@pytest.mark.parametrize("shape", SHAPES)
def test_decompress_matches_reference(shape, mode):
    x = _input(*shape, torch.float64, seed=7)
    _, values, meta = sparsify24_reference(x, relu2=True)
    grad = _input(*shape, torch.float64, seed=8) if mode == DECOMPRESS_RELU2_GRAD else None
    out_t = decompress24_triton(values, meta, shape[1], mode, grad)
    out_r = decompress24_reference(values, meta, shape[1], mode, grad)
    assert torch.allclose(out_t, out_r, rtol=1e-12, atol=0)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu2_grad_matches_reference_and_autograd(dtype):
    g = torch.Generator().manual_seed(13)
    h = torch.randn(37, 44, generator=g, dtype=dtype, requires_grad=True)
    dy = torch.randn(37, 44, generator=g, dtype=dtype)
    ref = relu2_grad_reference(dy, h.detach())
    assert torch.allclose(relu2_grad_triton(dy, h.detach()), ref, rtol=1e-6, atol=0)
    (auto,) = torch.autograd.grad(torch.relu(h) ** 2, h, dy)
    assert torch.allclose(ref, auto, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_exactly_two_of_every_four_kept_and_they_are_the_largest(shape):
    x = _input(*shape, torch.float64, seed=3)
    n, width = shape
    dense, values, meta = sparsify24_reference(x, relu2=False)
    codes = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(n, -1)[:, : width // 4].long()
    i0, i1 = codes & 3, codes >> 2
    assert bool((i0 < i1).all()), "two distinct kept positions per group, in order"
    keep = torch.zeros(n, width // 4, 4, dtype=torch.bool)
    keep.scatter_(-1, i0.unsqueeze(-1), True).scatter_(-1, i1.unsqueeze(-1), True)
    assert bool((keep.sum(-1) == 2).all())
    mag = x.abs().view(n, width // 4, 4)
    kept_min = mag.masked_fill(~keep, float("inf")).amin(-1)
    dropped_max = mag.masked_fill(keep, -1.0).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    if width >= 8:
        # The all-zero group keeps its first two positions (ties go to the lower index), and so
        # does the group of equal magnitudes.
        assert (i0[0, 0].item(), i1[0, 0].item()) == (0, 1)
        assert (i0[-1, 1].item(), i1[-1, 1].item()) == (0, 1)
    assert torch.equal(dense.view(n, -1, 4), torch.where(keep, x.view(n, -1, 4), 0.0))


def test_relu2_round_trip_is_exact():
    x = _input(37, 44, torch.bfloat16, seed=5)
    dense, values, meta = sparsify24_reference(x, relu2=True)
    assert torch.equal(decompress24_reference(values, meta, 44, DECOMPRESS_SQUARE), dense)
    assert bool((values >= 0).all()), "relu2 stores relu(h), not h"
    # The compressed form takes 0.5 + 1/16 of the dense bf16 bytes when groups pair up.
    x = _input(64, 128, torch.bfloat16, seed=6)
    dense, values, meta = sparsify24_reference(x, relu2=True)
    stored = values.numel() * values.element_size() + meta.numel() * meta.element_size()
    assert stored / (dense.numel() * dense.element_size()) == pytest.approx(0.5625)


def test_width_must_be_multiple_of_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sparsify24_reference(torch.zeros(2, 6))


def test_dispatch_uses_reference_on_cpu():
    x = _input(5, 12, torch.float32, seed=9)
    for a, b in zip(sparse24.sparsify24(x, relu2=True), sparsify24_reference(x, relu2=True)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(4099, 8448)])
def test_cuda_kernels_match_reference(shape, dtype):
    x = _input(*shape, dtype, seed=11).cuda()
    for relu2 in (True, False):
        # Compiled Triton rounds to nearest like torch, and selection compares the same values: exact.
        for a, b in zip(sparsify24_triton(x, relu2=relu2), sparsify24_reference(x, relu2=relu2)):
            assert torch.equal(a, b)
    _, values, meta = sparsify24_reference(x, relu2=True)
    grad = _input(*shape, dtype, seed=12).cuda()
    for mode in (DECOMPRESS_VALUES, DECOMPRESS_SQUARE, DECOMPRESS_RELU2_GRAD):
        g = grad if mode == DECOMPRESS_RELU2_GRAD else None
        assert torch.equal(decompress24_triton(values, meta, shape[1], mode, g),
                           decompress24_reference(values, meta, shape[1], mode, g))
    assert torch.equal(relu2_grad_triton(grad, x), relu2_grad_reference(grad, x))
