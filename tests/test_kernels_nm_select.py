"""n:m channel selection (MoC 2:8): the Triton kernel (CPU interpreter, or GPU) against its torch reference."""

from __future__ import annotations

import pytest
import torch

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter, requires_gpu  # isort: skip

from effdist.kernels.nm_select import top_n_of_m, top_n_of_m_reference, top_n_of_m_triton

CASES = [(13, 176, 2, 8), (1, 8, 2, 8), (7, 64, 1, 4), (5, 48, 3, 8), (9, 1040, 2, 8)]


def _scores(rows: int, width: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g).to(dtype)
    x[0, :8] = 1.0  # a group of ties: the lowest indices win
    return x


@pytest.mark.parametrize("case", CASES)
def test_reference_picks_the_n_largest_of_each_group(case):
    rows, width, n, m = case
    x = _scores(rows, width, seed=rows)
    idx = top_n_of_m_reference(x, n, m, torch.int16)
    assert idx.dtype == torch.int16 and idx.shape == (rows, width // m * n)
    groups = idx.long().view(rows, width // m, n) // m
    assert torch.equal(groups, torch.arange(width // m).view(1, -1, 1).expand_as(groups))
    picked = torch.gather(x, 1, idx.long()).view(rows, width // m, n)
    expected = torch.topk(x.view(rows, width // m, m), n, dim=-1).values
    assert torch.equal(picked, expected)
    if width >= 8 and m == 8:
        assert idx[0, :n].tolist() == list(range(n))


@needs_interpreter
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case):
    rows, width, n, m = case
    x = _scores(rows, width, seed=rows + 1)
    assert torch.equal(top_n_of_m_triton(x, n, m), top_n_of_m_reference(x, n, m))


def test_invalid_widths_are_rejected():
    with pytest.raises(ValueError, match="divisible by 8"):
        top_n_of_m(torch.zeros(2, 12), 2, 8)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_matches_reference(dtype):
    for rows, width, n, m in CASES + [(4099, 5632, 2, 8)]:
        x = _scores(rows, width, seed=3, dtype=dtype).cuda()
        assert torch.equal(top_n_of_m_triton(x, n, m, torch.int16), top_n_of_m_reference(x, n, m, torch.int16))
