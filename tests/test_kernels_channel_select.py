"""Channel gather/activate/scatter kernels (Triton, run by its CPU interpreter) against their torch
reference, and the reference's gradient against autograd of the dense masked formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter, requires_gpu  # isort: skip

from effdist.kernels.channel_select import (
    mask_to_index,
    mask_words,
    pack_mask_reference,
    masked_tile_config,
    scatter_activated_masked_reference,
    scatter_activated_masked_triton,
    scatter_activated_reference,
    scatter_activated_triton,
    select_activate_backward_masked_reference,
    select_activate_backward_masked_triton,
    select_activate_backward_reference,
    select_activate_backward_triton,
    select_activate_reference,
    select_activate_triton,
    unpack_mask_reference,
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


# ------------------------------------------------------------------------ the selection as a bit mask

def _masked_case(act: str, n: int, width: int, k: int, dtype: torch.dtype, seed: int = 0):
    """A plain top-k selection (k per row, as the fused kernel makes it) as a mask, the selected values in column
    order, and the same selection as indices."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(n, 2 * width if act == "swiglu" else width, generator=g, dtype=torch.float64).to(dtype)
    idx = torch.stack([torch.randperm(width, generator=g)[:k].sort().values for _ in range(n)])
    keep = torch.zeros(n, width, dtype=torch.bool).scatter_(1, idx, True)
    _, a, b = select_activate_reference(src, idx, width, act)
    return pack_mask_reference(keep), a, b, idx


def test_mask_words_hold_one_bit_per_channel_and_round_trip():
    keep = torch.zeros(2, 70, dtype=torch.bool)
    keep[0, [0, 31, 32, 69]] = True
    keep[1, 31] = True
    mask = pack_mask_reference(keep)
    assert mask.dtype == torch.int32 and mask.shape == (2, mask_words(70)) == (2, 3)
    assert mask[0].tolist() == [1 - 2 ** 31, 1, 1 << 5]  # bit 31 is the sign bit of word 0
    assert mask[1].tolist() == [-2 ** 31, 0, 0]
    assert torch.equal(unpack_mask_reference(mask, 70), keep)
    assert mask_to_index(mask, 70, 5).tolist() == [[0, 31, 32, 69, -1], [31, -1, -1, -1, -1]]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [(13, 37, 9), (3, 8, 8), (5, 100, 1)])
@pytest.mark.parametrize("act", ACTS)
def test_masked_kernels_match_reference(act, size, dtype):
    """The dense-row kernels (every element written, no memset) against the masked references, which are the
    index references at the same selection. Widths below and off the 32-bit word, a full and a single slot; each
    row in one chunk (the default here), in several 32-column chunks (the count of kept channels carried from
    chunk to chunk), and two rows per program (rows 12 of 13 and 4 of 5 are a partial pair)."""
    n, width, k = size
    mask, a, b, idx = _masked_case(act, n, width, k, dtype, seed=4)
    assert masked_tile_config(width, act)[1] >= width  # the default: one chunk at these widths
    z = scatter_activated_reference(a, b, idx, width, act)
    assert torch.equal(scatter_activated_masked_reference(a, b, mask, width, act), z)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-30)
    dz = torch.randn(n, width, dtype=torch.float64).to(dtype)
    want = select_activate_backward_reference(dz, a, b, idx, width, act)
    assert torch.equal(select_activate_backward_masked_reference(dz, a, b, mask, width, act), want)
    for config in (None, (1, 32, 1), (2, 64, 2)):
        torch.testing.assert_close(scatter_activated_masked_triton(a, b, mask, width, act, config).float(),
                                   z.float(), **tol)
        torch.testing.assert_close(select_activate_backward_masked_triton(dz, a, b, mask, width, act, config).float(),
                                   want.float(), **tol)


def test_masked_tile_config_walks_wide_rows_in_chunks():
    assert masked_tile_config(5632, "swiglu") == (1, 512, 2)  # llama-1b: eleven chunks, 8 columns a thread
    assert masked_tile_config(5632, "relu") == (1, 256, 1)
    assert masked_tile_config(20, "swiglu") == (1, 32, 1)  # at least one mask word, fewer warps on a narrow row
    assert masked_tile_config(300, "swiglu") == (1, 512, 2)


def test_masked_kernels_refuse_a_mask_of_another_width():
    mask, a, b, _ = _masked_case("relu", 2, 40, 3, torch.float32)
    with pytest.raises(ValueError, match=r"expected int32 \[2, 1\] for width 20"):
        scatter_activated_masked_triton(a, b, mask, 20, "relu")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
def test_cuda_masked_kernels_match_reference(act, dtype):
    for n, width, k in [(13, 37, 9), (4099, 5632, 1056), (1001, 2816, 282)]:
        mask, a, b, idx = _masked_case(act, n, width, k, dtype, seed=5)
        mask, a, b, idx = mask.cuda(), a.cuda(), b.cuda() if b is not None else None, idx.cuda()
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        z = scatter_activated_reference(a, b, idx, width, act)
        torch.testing.assert_close(scatter_activated_masked_triton(a, b, mask, width, act).float(), z.float(), **tol)
        dz = torch.randn(n, width, dtype=dtype, device="cuda")
        torch.testing.assert_close(select_activate_backward_masked_triton(dz, a, b, mask, width, act).float(),
                                   select_activate_backward_reference(dz, a, b, idx, width, act).float(), **tol)
