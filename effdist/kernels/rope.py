"""Rotary position embedding (RoPE) over megatron's [s, b, heads, head_dim] layout: one Triton kernel
(forward, and the same kernel rotating back for the backward), beside the plain-torch reference.

megatron's unfused RoPE (``rope_utils._apply_rotary_pos_emb_bshd``) takes the cos/sin of the whole
frequency table on every call, then runs ``t*cos``, a rotate-half made of two slices, a negation and
a concatenation, ``*sin``, an add and a final concatenation: about ten passes over Q (and again over
K), and as many again in the backward. The kernel reads each element once and writes it once; a
program handles all heads of one (position, batch) row. cos/sin are read from [s, head_dim] tables made
once per frequency tensor (megatron hands every layer the same one), not computed in the kernel. It reads
Q/K through their strides (they are strided views into the fused QKV GEMM output) and writes a contiguous
result.

Semantics are the reference's: cos/sin are rounded to the activation dtype before use, as megatron's
unfused path does; products and the sum are done in fp32 and rounded once.

`apply_rope(t, freqs, interleaved=False)` has the signature of the fused-RoPE slot megatron's
``apply_rotary_pos_emb`` calls when ``config.apply_rope_fusion`` is set (see effdist.model.fused).
It dispatches: Triton on CUDA tensors for the standard (non-interleaved, full rotary dim) layout,
the reference otherwise.
"""

import functools
import weakref

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton keep the reference path
    triton = None


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_reference(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """megatron's unfused RoPE (mscale 1): ``t * cos(freqs) + rotate_half(t) * sin(freqs)`` on the first
    ``freqs.shape[-1]`` channels of ``t`` [s, b, heads, head_dim]; freqs is [s, 1, 1, rot_dim] (fp32)."""
    rot_dim = freqs.shape[-1]
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos = torch.cos(freqs).to(t.dtype)
    sin = torch.sin(freqs).to(t.dtype)
    t = (t * cos) + (_rotate_half(t, interleaved) * sin)
    return torch.cat((t, t_pass), dim=-1)


def triton_supports(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> bool:
    """The layouts the kernel implements: non-interleaved RoPE over the whole head dim, one frequency
    row per sequence position shared by the batch (what megatron's RotaryEmbedding produces)."""
    return (not interleaved and t.dim() == 4 and freqs.dim() == 4
            and freqs.shape[0] == t.shape[0] and freqs.shape[1] == 1 and freqs.shape[2] == 1
            and freqs.shape[3] == t.shape[3] and t.shape[3] % 2 == 0
            and not freqs.requires_grad and freqs.dtype == torch.float32 and freqs.stride(3) == 1)


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False,
               use_triton: bool | None = None) -> torch.Tensor:
    """RoPE of ``t`` [s, b, heads, head_dim] with ``freqs`` [s, 1, 1, head_dim]; Triton on CUDA tensors
    (``use_triton`` overrides) when `triton_supports` the layout, else the reference."""
    if use_triton is None:
        use_triton = t.is_cuda
    if not use_triton or not triton_supports(t, freqs, interleaved):
        return rope_reference(t, freqs, interleaved)
    if triton is None:
        raise RuntimeError("apply_rope(use_triton=True) needs the triton package")
    return _RoPEFunction.apply(t, freqs)


@functools.cache
def _kernel():
    """The Triton kernel, decorated on first use (Triton reads TRITON_INTERPRET at decoration)."""

    @triton.jit
    def rope(t_ptr, cos_ptr, sin_ptr, out_ptr, batch, heads, half, t_stride_s, t_stride_b, t_stride_h,
             BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        s = row // batch
        b = row % batch
        cols = tl.arange(0, BLOCK_D)
        col_mask = cols < half
        ty = out_ptr.dtype.element_ty
        # cos/sin come as tables in the activation dtype (`_cos_sin`): computing them here cost each thread
        # two libdevice sin/cos per element it moved, which made the kernel compute-bound at ~40% of HBM
        # bandwidth on an H100.
        table_row = s.to(tl.int64) * (2 * half)
        cos1 = tl.load(cos_ptr + table_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + table_row + half + cols, mask=col_mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + table_row + cols, mask=col_mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + table_row + half + cols, mask=col_mask, other=0.0).to(tl.float32)
        # forward: o1 = x1 cos1 - x2 sin1, o2 = x2 cos2 + x1 sin2. backward (the transpose, for a
        # gradient): d1 = g1 cos1 + g2 sin2, d2 = g2 cos2 - g1 sin1: the same with (sin1, sin2) -> (-sin2, -sin1).
        if BACKWARD:
            sin_a = -sin2
            sin_b = -sin1
        else:
            sin_a = sin1
            sin_b = sin2
        t_row = t_ptr + s.to(tl.int64) * t_stride_s + b.to(tl.int64) * t_stride_b
        out_row = out_ptr + row.to(tl.int64) * heads * 2 * half
        for h0 in range(0, heads, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = (h[:, None] < heads) & col_mask[None, :]
            src = t_row + h[:, None].to(tl.int64) * t_stride_h + cols[None, :]
            x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
            o1 = x1 * cos1[None, :] - x2 * sin_a[None, :]
            o2 = x2 * cos2[None, :] + x1 * sin_b[None, :]
            dst = out_row + h[:, None] * (2 * half) + cols[None, :]
            tl.store(dst, o1.to(ty), mask=mask)
            tl.store(dst + half, o2.to(ty), mask=mask)

    return rope


# The last tables made, for the freqs tensor they were made from. megatron's RotaryEmbedding hands every
# layer's Q and K the same tensor (and the same again in later steps: it caches it per sequence length), so
# one entry serves them all; the weak reference lets the freqs tensor go when megatron drops it.
_last_tables: list = [None]


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``freqs`` [s, 1, 1, d] as contiguous [s, d] tables rounded to ``dtype`` (the rounding
    the reference does), made once per freqs tensor."""
    last = _last_tables[0]
    # Under CUDA-graph capture the tables are made inside the graph: a cached table would be replayed as a
    # constant however the freqs buffer changes between replays.
    if last is not None and not (freqs.is_cuda and torch.cuda.is_current_stream_capturing()):
        ref, version, table_dtype, cos, sin = last
        if ref() is freqs and version == freqs._version and table_dtype == dtype:
            return cos, sin
    flat = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    cos, sin = torch.cos(flat).to(dtype).contiguous(), torch.sin(flat).to(dtype).contiguous()
    _last_tables[0] = (weakref.ref(freqs), freqs._version, dtype, cos, sin)
    return cos, sin


def _launch(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    seq, batch, heads, head_dim = t.shape
    out = torch.empty((seq, batch, heads, head_dim), dtype=t.dtype, device=t.device)
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    # Up to 2048 elements per half-tile: no register spills up to head_dim 128 (checked with ptxas, sm_90).
    block_h = max(1, min(triton.next_power_of_2(heads), 2048 // block_d))
    if seq * batch and heads:
        _kernel()[(seq * batch,)](t, cos, sin, out, batch, heads, half, t.stride(0), t.stride(1), t.stride(2),
                                  BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
    return out


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        cos, sin = _cos_sin(freqs, t.dtype)
        ctx.save_for_backward(cos, sin)
        return _launch(t, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(grad, cos, sin, backward=True), None
