"""The multi-input gradient sum (Triton, run by its CPU interpreter) against its torch reference, and EPAS's
packed Q/K gradient built with it against plain autograd over many sharing layers."""

from __future__ import annotations

import pytest
import torch

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter, requires_gpu  # isort: skip

from effdist.kernels.grad_sum import MAX_INPUTS, sum_into, sum_reference, triton_supports
from effdist.model.shared_qk import _QKGradSum, pack_qk, unpack_qk


def _bhsd_grads(count: int, s: int, b: int, h: int, d: int, dtype: torch.dtype, seed: int = 0):
    """Gradients laid out as attention kernels return them ([b, h, s, d] memory) seen as [s, b, h, d]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype).permute(2, 0, 1, 3) for _ in range(count)]


@needs_interpreter
@pytest.mark.parametrize("count", [1, 3, MAX_INPUTS])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("out_layout", ["sbhd", "same_as_inputs"])
def test_triton_matches_reference(count, accumulate, out_layout):
    s, b, h, d = 37, 3, 5, 8  # numel 4440: two blocks, the second partial
    inputs = _bhsd_grads(count, s, b, h, d, torch.float32)
    if out_layout == "sbhd":
        start = torch.randn(s, b, h, d)
    else:
        start = torch.randn(b, h, s, d).permute(2, 0, 1, 3)
    assert triton_supports(start, inputs)
    expected = sum_reference(start.clone(), inputs, accumulate)
    got = sum_into(start.clone(), inputs, accumulate, use_triton=True)
    # Same order of fp32 additions: bit for bit.
    assert torch.equal(got, expected)
    manual = sum(inputs, start if accumulate else torch.zeros_like(start))
    torch.testing.assert_close(got, manual, rtol=1e-6, atol=1e-6)


@needs_interpreter
def test_bf16_accumulates_in_fp32_and_rounds_once():
    # 1 + 8 * 2^-9: each 2^-9 alone is lost when added to 1 in bf16 (7 mantissa bits), their sum is not.
    out = torch.ones(64, dtype=torch.bfloat16)
    inputs = [torch.full((64,), 2.0 ** -9, dtype=torch.bfloat16) for _ in range(8)]
    got = sum_into(out.clone(), inputs, accumulate=True, use_triton=True)
    assert torch.equal(got, torch.full((64,), 1.015625, dtype=torch.bfloat16))
    assert torch.equal(got, sum_reference(out.clone(), inputs, accumulate=True))


def test_layouts_it_does_not_take_go_through_the_reference():
    inputs = _bhsd_grads(2, 5, 2, 3, 4, torch.float32)
    mixed = [inputs[0], inputs[1].contiguous()]  # different strides
    assert not triton_supports(torch.empty(5, 2, 3, 4), mixed)
    overlapping = [torch.randn(5, 1, 3, 4).expand(5, 2, 3, 4)] * 2  # not dense
    assert not triton_supports(torch.empty(5, 2, 3, 4), overlapping)
    assert not triton_supports(torch.empty(5, 2, 3, 4), inputs * MAX_INPUTS)  # too many
    out = torch.randn(5, 2, 3, 4)
    got = sum_into(out.clone(), mixed, accumulate=True, use_triton=True)
    torch.testing.assert_close(got, out + mixed[0] + mixed[1], rtol=0, atol=1e-6)
    assert torch.equal(sum_into(out.clone(), [], accumulate=False), torch.zeros_like(out))


@pytest.mark.parametrize("consumers", [1, 3, _QKGradSum.PENDING, 2 * _QKGradSum.PENDING + 3])
def test_packed_qk_gradient_over_many_sharing_layers_equals_autograd(consumers):
    """One packed Q/K read by `consumers` sharing layers (more than are held back at once): the packed
    gradient equals plain autograd's sum of every layer's gradient, and only the last layer returns it."""
    s, b, heads, kv_heads, d = 6, 2, 4, 2, 8
    g = torch.Generator().manual_seed(1)
    query = torch.randn(s, b, heads, d, generator=g, dtype=torch.float64)
    key = torch.randn(s, b, kv_heads, d, generator=g, dtype=torch.float64)
    weights = [(torch.randn(s, b, heads, d, generator=g, dtype=torch.float64),
                torch.randn(s, b, kv_heads, d, generator=g, dtype=torch.float64)) for _ in range(consumers)]

    def loss_of(unpack):
        total = 0
        for wq, wk in weights:
            q, k = unpack()
            # What an attention kernel returns: gradients in its own [b, h, s, d] layout.
            total = total + (q.permute(1, 2, 0, 3).contiguous() * wq.permute(1, 2, 0, 3)).sum()
            total = total + (k.permute(1, 2, 0, 3).contiguous() * wk.permute(1, 2, 0, 3)).sum() * 0.5
        return total

    packed = pack_qk(query, key).requires_grad_(True)
    loss_of(lambda: unpack_qk(packed, heads)).backward()
    plain = pack_qk(query, key).requires_grad_(True)
    loss_of(lambda: (plain.reshape(-1)[: query.numel()].view_as(query),
                     plain.reshape(-1)[query.numel():].view_as(key))).backward()
    torch.testing.assert_close(packed.grad, plain.grad, rtol=1e-12, atol=1e-12)
    expected_q = sum(wq for wq, _ in weights)
    torch.testing.assert_close(packed.grad.reshape(-1)[: query.numel()].view_as(query), expected_q)


def test_packed_qk_gradient_when_some_layers_use_only_q():
    s, b, heads, d = 4, 1, 2, 4
    query, key = torch.randn(s, b, heads, d), torch.randn(s, b, heads, d)
    packed = pack_qk(query, key).requires_grad_(True)
    total = 0
    for i in range(6):
        q, k = unpack_qk(packed, heads)
        total = total + q.sum() * (i + 1) + (k.sum() if i == 4 else 0)
    total.backward()
    q_grad, k_grad = packed.grad.reshape(-1).split([query.numel(), key.numel()])
    assert torch.equal(q_grad, torch.full_like(q_grad, 21.0))
    assert torch.equal(k_grad, torch.ones_like(k_grad))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_matches_reference(dtype):
    inputs = [t.cuda() for t in _bhsd_grads(5, 512, 4, 16, 64, dtype)]
    start = torch.randn(512, 4, 16, 64, device="cuda").to(dtype)
    for accumulate in (False, True):
        expected = sum_reference(start.clone(), inputs, accumulate)
        got = sum_into(start.clone(), inputs, accumulate)
        assert torch.equal(got, expected)
