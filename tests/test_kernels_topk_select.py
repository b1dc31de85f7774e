"""Exact top-k by threshold search (effdist.kernels.topk_select): the Triton kernel (CPU interpreter)
against its torch reference, the reference against torch.topk, ties and the row-per-program layouts."""

from __future__ import annotations

import pytest
import torch

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter, requires_gpu  # isort: skip

from effdist.kernels import topk_select as topk_module  # noqa: E402
from effdist.kernels.topk_select import topk_select, topk_select_config, topk_select_reference, topk_select_triton

# A few rows through the multi-row layout (ROWS > 1, last program partly full): the layout topk_select_config
# picks for a training-sized call (300 rows), without interpreting that many programs on the CPU.
MANY_ROWS, FEW_ROWS = 300, 11


def _multi_row_config(width: int) -> tuple[int, int, int]:
    config = topk_select_config(MANY_ROWS, width)
    assert config[0] > 1 and FEW_ROWS % config[0], config  # several rows per program, a partial last one
    return config


def _force_multi_row_layout(monkeypatch) -> None:
    """topk_select_triton with the layout of a 300-row call whatever the number of rows."""
    monkeypatch.setattr(topk_module, "topk_select_config", lambda rows, width: _multi_row_config(width))


def test_reference_is_the_topk_set_in_channel_order_ties_to_lower_channels():
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    idx, values = topk_select_reference(scores, 7)
    want = torch.topk(scores, 7, dim=1).indices.sort(dim=1).values
    assert torch.equal(idx.long(), want) and idx.dtype == torch.int32
    assert torch.equal(values, scores.gather(1, want))
    ties = torch.tensor([[1.0, 3.0, 1.0, 1.0, 0.0, 3.0]])
    assert topk_select_reference(ties, 3)[0].tolist() == [[0, 1, 5]]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,width,k", [(3, 40, 7), (MANY_ROWS, 96, 18), (2, 33, 33), (5, 20, 1)])
def test_triton_equals_reference(dtype, rows, width, k, monkeypatch):
    if rows == MANY_ROWS:  # the multi-row layout, on a few rows
        _force_multi_row_layout(monkeypatch)
        rows = FEW_ROWS
    g = torch.Generator().manual_seed(rows + width)
    scores = torch.randn(rows, width, generator=g).to(dtype)
    scores[0, :5] = scores[0, 5]  # ties (bf16/fp16 make many more)
    scores[-1, -3:] = -0.0
    scores[-1, :2] = float("-inf")
    idx, values = topk_select_triton(scores, k)
    want_idx, want_values = topk_select_reference(scores, k)
    assert torch.equal(idx, want_idx)
    assert torch.equal(values, want_values)


@needs_interpreter
def test_triton_several_rows_per_program_and_negative_rows(monkeypatch):
    _force_multi_row_layout(monkeypatch)
    # 300 rows take the multi-row layout (see topk_select_config; here on 11 rows); all-negative and constant rows.
    scores = torch.randn(FEW_ROWS, 64, generator=torch.Generator().manual_seed(3)) - 5
    scores[7] = 2.5
    idx, _ = topk_select_triton(scores, 10)
    assert torch.equal(idx, topk_select_reference(scores, 10)[0])
    assert idx[7].tolist() == list(range(10))


def _hard_rows(width: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Six rows that trip threshold searches: a run of ties, -0.0 beside +0.0, -inf, a constant row, an
    all-negative row and few distinct values (many ties)."""
    scores = torch.randn(6, width, generator=g).to(dtype)
    scores[0, :5] = scores[0, 5]
    scores[1, -3:] = -0.0
    scores[1, :3] = 0.0
    scores[2, :2] = float("-inf")
    scores[3] = 2.5
    scores[4] = scores[4].abs().neg() - 5
    scores[5] = torch.randint(-3, 3, (width,), generator=g).to(dtype)
    return scores


@needs_interpreter
@pytest.mark.parametrize("width,k", [(40, 7), (33, 33), (20, 1), (96, 50)])
def test_radix_threshold_equals_the_reference(width, k):
    """method="radix" (two 8-bit histograms, bf16, one row per program): the same channels and values as the
    reference, with ties (bf16 makes many), -0.0 beside +0.0, -inf, constant and all-negative rows."""
    g = torch.Generator().manual_seed(width + k)
    scores = _hard_rows(width, torch.bfloat16, g)
    config = (1, 1 << (width - 1).bit_length(), 1)
    idx, values = topk_select_triton(scores, k, config, method="radix")
    want_idx, want_values = topk_select_reference(scores, k)
    assert torch.equal(idx, want_idx) and torch.equal(values, want_values)
    for act, src_width in (("swiglu", 2 * width), ("relu", width)):
        src = torch.randn(6, src_width, generator=g).to(torch.bfloat16)
        src[:, :width] = scores
        got = topk_module.topk_select_activate_triton(src, k, width, act, torch.int32, config, method="radix")
        want = topk_module.topk_select_activate_triton(src, k, width, act, torch.int32, config, method="bisect")
        assert torch.equal(got[3], topk_module.topk_select_activate_reference(src, k, width, act)[3])
        for a, b in zip(got, want):  # silu(-inf) is NaN in both
            assert (a is None and b is None) or torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True) is None


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width,k", [(40, 7), (33, 33), (20, 1), (96, 50)])
def test_four_way_threshold_equals_the_reference(dtype, width, k):
    """method="bisect4" (three counts a round in one packed reduction, KEY_BITS / 2 rounds): the reference's
    channels and values for 16-, 19- and 32-bit keys (int32 and int64 ranges), with ties, signed zeros, -inf,
    constant and all-negative rows, one and several rows per program; the fused kernel's too."""
    g = torch.Generator().manual_seed(3 * width + k)
    scores = _hard_rows(width, dtype, g)
    want_idx, want_values = topk_select_reference(scores, k)
    block = 1 << (width - 1).bit_length()
    for config in ((1, block, 1), (4, block, 2)):
        idx, values = topk_select_triton(scores, k, config, method="bisect4")
        assert torch.equal(idx, want_idx) and torch.equal(values, want_values), config
    src = torch.randn(6, 2 * width, generator=g).to(dtype)
    src[:, :width] = scores
    got = topk_module.topk_select_activate_triton(src, k, width, "swiglu", torch.int32, (2, block, 2),
                                                  method="bisect4", as_mask=True)
    assert torch.equal(got[3], topk_module.topk_select_activate_reference(src, k, width, "swiglu", as_mask=True)[3])


def test_radix_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="method = 'radix' takes bf16 rows one per program, not torch.float32"):
        topk_module._use_radix("radix", torch.float32, 1)
    with pytest.raises(ValueError, match="with 2 rows per program"):
        topk_module._use_radix("radix", torch.bfloat16, 2)
    with pytest.raises(ValueError, match="method = 'heap': choose one of bisect, radix, bisect4"):
        topk_module._use_radix("heap", torch.bfloat16, 1)
    assert not topk_module._use_radix(None, torch.float32, 2)


def test_bad_k_names_it():
    with pytest.raises(ValueError, match="k = 0"):
        topk_select(torch.zeros(2, 4), 0)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,width,k", [(1, 5632, 1056), (32, 5632, 563), (4096, 2816, 528)])
def test_gpu_kernel_equals_reference(dtype, rows, width, k):
    scores = torch.randn(rows, width, device="cuda").to(dtype)
    idx, values = topk_select(scores, k)
    want_idx, want_values = topk_select_reference(scores, k)
    assert torch.equal(idx, want_idx) and torch.equal(values, want_values)


# ---------------------------------------------------------------------------------------- fused with the activation

from effdist.kernels.channel_select import select_activate_reference  # noqa: E402
from effdist.kernels.topk_select import (  # noqa: E402
    topk_select_activate,
    topk_select_activate_reference,
    topk_select_activate_triton,
)


def test_fused_reference_is_select_activate_at_the_topk():
    src = torch.randn(5, 2 * 24, generator=torch.Generator().manual_seed(1))
    z, a, b, idx = topk_select_activate_reference(src, 6, 24, "swiglu", torch.int16)
    assert idx.dtype == torch.int16
    want_idx = torch.topk(src[:, :24], 6, dim=1).indices.sort(dim=1).values
    assert torch.equal(idx.long(), want_idx)
    wz, wa, wb = select_activate_reference(src, want_idx, 24, "swiglu")
    assert torch.equal(z, wz) and torch.equal(a, wa) and torch.equal(b, wb)


@needs_interpreter
@pytest.mark.parametrize("act", ["swiglu", "relu", "relu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width,k", [(3, 40, 7), (MANY_ROWS, 24, 5)])
def test_fused_triton_equals_reference(act, dtype, rows, width, k):
    src_width = 2 * width if act == "swiglu" else width
    # 300 rows: the multi-row layout of a 300-row call, on a few rows.
    config = _multi_row_config(width) if rows == MANY_ROWS else None
    src = torch.randn(FEW_ROWS if config else rows, src_width, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = topk_select_activate_triton(src, k, width, act, torch.int16, config=config)
    want = topk_select_activate_reference(src, k, width, act, torch.int16)
    z, a, b, idx = got
    assert torch.equal(idx, want[3]) and torch.equal(a, want[1])
    assert (b is None) == (act != "swiglu") and (b is None or torch.equal(b, want[2]))
    # Same fp32 math rounded once; sigmoid's last bit may differ between Triton and torch.
    torch.testing.assert_close(z, want[0], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    assert torch.equal(z == 0, want[0] == 0)


@needs_interpreter
@pytest.mark.parametrize("method", ["bisect", "radix", "bisect4"])
@pytest.mark.parametrize("rows,width,k", [(3, 40, 7), (MANY_ROWS, 24, 5), (2, 70, 64)])
def test_fused_mask_is_the_references_selection(method, rows, width, k):
    """as_mask=True (the training path): the selection comes back as bit-mask words, the other outputs as with
    indices. Widths off the 32-bit word, below one word, and the multi-row layout."""
    from effdist.kernels.channel_select import mask_words, pack_mask_reference

    config = _multi_row_config(width) if rows == MANY_ROWS else None
    if method == "radix":
        config = (1, 1 << (width - 1).bit_length(), 1)
    n = FEW_ROWS if rows == MANY_ROWS else rows
    src = torch.randn(n, 2 * width, generator=torch.Generator().manual_seed(width)).to(torch.bfloat16)
    z, a, b, mask = topk_select_activate_triton(src, k, width, "swiglu", config=config, method=method, as_mask=True)
    wz, wa, wb, widx = topk_select_activate_reference(src, k, width, "swiglu")
    keep = torch.zeros(n, width, dtype=torch.bool).scatter_(1, widx.long(), True)
    assert mask.dtype == torch.int32 and mask.shape == (n, mask_words(width))
    assert torch.equal(mask, pack_mask_reference(keep))
    assert torch.equal(mask, topk_select_activate_reference(src, k, width, "swiglu", as_mask=True)[3])
    assert torch.equal(a, wa) and torch.equal(b, wb) and torch.equal(z == 0, wz == 0)


def test_fused_rejects_a_width_that_does_not_fit():
    with pytest.raises(ValueError, match="expected"):
        topk_select_activate_triton(torch.zeros(2, 10), 2, 4, "swiglu")


@needs_interpreter
def test_the_dispatcher_takes_radix_for_bf16_only(monkeypatch):
    """ffn.select_method=radix reaches the kernel for bf16 (one row per program) and falls back to bisection for
    other dtypes: the same channels as the reference either way."""
    calls = []
    real = topk_module.topk_select_activate_triton

    def spy(*args, **kwargs):
        calls.append((args[-2], args[-1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(topk_module, "use_triton", lambda t: True)
    monkeypatch.setattr(topk_module, "topk_select_activate_triton", spy)
    for dtype in (torch.bfloat16, torch.float32):
        src = torch.randn(3, 2 * 40, generator=torch.Generator().manual_seed(5)).to(dtype)
        got = topk_select_activate(src, 7, 40, "swiglu", torch.int16, method="radix")
        assert torch.equal(got[3], topk_select_activate_reference(src, 7, 40, "swiglu", torch.int16)[3])
    assert calls == [((1, 64, 4), "radix"), ((1, 64, 4), "bisect")]
    assert topk_module.topk_select_config(16384, 5632, "radix") == (1, 8192, 4)
    # The selection alone (the decode step's): radix for bf16 too, the reference's channels.
    scores = torch.randn(2, 40, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)

    def select_spy(scores, k, config, method):
        calls.append((config, method))
        return topk_select_triton(scores, k, config, method)  # this file's import: the module's own function

    monkeypatch.setattr(topk_module, "topk_select_triton", select_spy)
    assert torch.equal(topk_module.topk_select(scores, 7, "radix")[0], topk_select_reference(scores, 7)[0])
    assert calls[-1] == ((1, 64, 4), "radix")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("as_mask", [False, True])
@pytest.mark.parametrize("method", ["bisect", "radix", "bisect4"])
@pytest.mark.parametrize("act", ["swiglu", "relu"])
def test_gpu_fused_equals_reference(act, method, as_mask):
    width = 2816
    src = torch.randn(4096, 2 * width if act == "swiglu" else width, device="cuda", dtype=torch.bfloat16)
    z, a, b, idx = topk_select_activate(src, 528, width, act, torch.int16, method, as_mask=as_mask)
    wz, wa, wb, widx = topk_select_activate_reference(src, 528, width, act, torch.int16, as_mask=as_mask)
    assert torch.equal(idx, widx) and torch.equal(a, wa)
    torch.testing.assert_close(z, wz, rtol=1e-2, atol=1e-6)
