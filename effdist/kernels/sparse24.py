"""2:4 activation sparsity: fused (ReLU² +) magnitude 2:4 selection and compression, and its inverse.

Selection rule (the contract both implementations follow bit for bit): in every group of 4
consecutive features of a row keep the 2 entries of largest magnitude; equal magnitudes are broken
towards the lower feature index, so exactly 2 of every 4 are kept, also in all-zero groups. With
``relu2=True`` the input is a pre-activation h, the magnitude is relu(h) (the same order as relu(h)²)
and the dense output is relu(h)² on the kept entries.

Compressed layout (effdist's own, readable by both the Triton and the torch code, unlike
cuSPARSELt's opaque one), for x of shape [N, F] with F % 4 == 0 and G = F / 4 groups:
  values [N, F/2]          kept entries of group g at columns 2g, 2g+1, in feature order; with
                           relu2 these are relu(h) (not relu(h)²), so that both relu(h) (what the
                           backward needs) and relu(h)² (what the down projection saw) come back exactly;
  meta   [N, ceil(G/2)] uint8   per group a 4-bit code i0 | i1 << 2 (i0 < i1 the kept positions),
                           group 2j in the low nibble of byte j, group 2j+1 in the high nibble.
In bf16 that is 0.5 + 1/16 = 0.5625 of the dense bytes (the same as cuSPARSELt's packing).

Functions with a ``_reference`` suffix are the plain-torch definitions the tests hold the Triton
kernels to; the unsuffixed functions dispatch to Triton on CUDA tensors and to the reference on CPU.
"""

from __future__ import annotations

import torch

from effdist.kernels._common import HAVE_TRITON, compute_dtype, rowmajor, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from effdist.kernels._common import upcast

# Backward modes of decompress24: what each kept entry v turns into in the dense output.
DECOMPRESS_VALUES = 0  # v
DECOMPRESS_SQUARE = 1  # v² (relu(h)² from stored relu(h))
DECOMPRESS_RELU2_GRAD = 2  # 2·v·grad (d relu(h)²/dh times the incoming gradient, at kept entries)


def _check_width(width: int) -> None:
    if width % 4:
        raise ValueError(f"2:4 sparsity needs the feature width divisible by 4, got {width}")


def meta_columns(width: int) -> int:
    return (width // 4 + 1) // 2


# ---------------------------------------------------------------------------------------- reference

def _keep_mask_reference(magnitude: torch.Tensor) -> torch.Tensor:
    """[N, G, 4] magnitudes -> bool keep mask: rank < 2 with ties to the lower index."""
    m_j = magnitude.unsqueeze(-1)  # [N, G, 4(j), 1]
    m_i = magnitude.unsqueeze(-2)  # [N, G, 1, 4(i)]
    j_idx = torch.arange(4, device=magnitude.device).view(4, 1)
    i_idx = torch.arange(4, device=magnitude.device).view(1, 4)
    beats = (m_j > m_i) | ((m_j == m_i) & (j_idx < i_idx))  # j outranks i
    rank = beats.sum(dim=-2)  # [N, G, 4]
    return rank < 2


def sparsify24_reference(x: torch.Tensor, relu2: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, F] -> (dense 2:4-sparse output [N, F], values [N, F/2], meta [N, ceil(F/8)] uint8)."""
    n, width = x.shape
    _check_width(width)
    groups = x.to(compute_dtype(x.dtype)).view(n, width // 4, 4)
    source = groups.clamp_min(0) if relu2 else groups
    keep = _keep_mask_reference(source.abs())
    out = torch.where(keep, source * source if relu2 else source, torch.zeros_like(source))
    dense = out.view(n, width).to(x.dtype)
    # Kept positions in increasing order: sorting (not keep) puts kept first, stable keeps index order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :2]  # [N, G, 2]
    values = torch.gather(source, -1, order).reshape(n, width // 2).to(x.dtype)
    codes = (order[..., 0] | (order[..., 1] << 2)).to(torch.uint8)  # [N, G]
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)
    meta = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
    return dense, values, meta


def decompress24_reference(values: torch.Tensor, meta: torch.Tensor, width: int, mode: int = DECOMPRESS_VALUES,
                           grad: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of the compression: dense [N, width] (see the DECOMPRESS_* modes)."""
    n = values.shape[0]
    _check_width(width)
    g = width // 4
    codes = torch.stack([meta & 15, meta >> 4], dim=-1).reshape(n, -1)[:, :g].long()  # [N, G]
    pos = torch.stack([codes & 3, codes >> 2], dim=-1)  # [N, G, 2]
    ct = compute_dtype(values.dtype)
    v = values.to(ct).view(n, g, 2)
    if mode == DECOMPRESS_SQUARE:
        v = v * v
    elif mode == DECOMPRESS_RELU2_GRAD:
        if grad is None:
            raise ValueError("mode DECOMPRESS_RELU2_GRAD needs grad")
        v = 2.0 * v * torch.gather(grad.to(ct).view(n, g, 4), -1, pos)
    out = torch.zeros(n, g, 4, dtype=ct, device=values.device).scatter_(-1, pos, v)
    dtype = grad.dtype if grad is not None else values.dtype
    return out.view(n, width).to(dtype)


def relu2_grad_reference(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d relu(h)²/dh · grad = 2·relu(h)·grad: the backward of sparsify24(h, relu2) under the identity STE."""
    ct = compute_dtype(grad.dtype)
    return (2.0 * h.to(ct).clamp_min(0) * grad.to(ct)).to(grad.dtype)


# ---------------------------------------------------------------------------------------- triton

if HAVE_TRITON:

    @triton.jit
    def _rank_keep(m0, m1, m2, m3):
        # c_ij: i outranks j (i < j: ties go to the lower index).
        c01 = (m0 >= m1).to(tl.int32)
        c02 = (m0 >= m2).to(tl.int32)
        c03 = (m0 >= m3).to(tl.int32)
        c12 = (m1 >= m2).to(tl.int32)
        c13 = (m1 >= m3).to(tl.int32)
        c23 = (m2 >= m3).to(tl.int32)
        r0 = 3 - c01 - c02 - c03
        r1 = c01 + 1 - c12 + 1 - c13
        r2 = c02 + c12 + 1 - c23
        r3 = c03 + c13 + c23
        return r0 < 2, r1 < 2, r2 < 2, r3 < 2

    @triton.jit
    def _split4(x, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        """[R, G, 4] -> its four [R, G] columns."""
        even, odd = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_G, 2, 2)))
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        return x0, x1, x2, x3

    @triton.jit
    def _join4(x0, x1, x2, x3, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        """Four [R, G] columns -> [R, G, 4] (inverse of _split4)."""
        return tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (BLOCK_R, BLOCK_G, 4))

    @triton.jit
    def _sparsify24_kernel(x_ptr, dense_ptr, val_ptr, meta_ptr, n_rows, n_groups,
                           stride_x, stride_d, stride_v, stride_m,
                           RELU2: tl.constexpr, WRITE_DENSE: tl.constexpr, WRITE_COMPRESSED: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        # One program: BLOCK_R rows x BLOCK_G groups, read and written as contiguous [R, G, 4] tiles.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        grp = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        r3 = rows[:, None, None]
        g3 = grp[None, :, None]
        p3 = tl.arange(0, 4)[None, None, :]
        ok3 = (r3 < n_rows) & (g3 < n_groups) & (p3 < 4)
        x = upcast(tl.load(x_ptr + r3 * stride_x + g3 * 4 + p3, mask=ok3, other=0.0))
        if RELU2:
            x = tl.maximum(x, 0.0)
            mag = x
        else:
            mag = tl.abs(x)
        m0, m1, m2, m3 = _split4(mag, BLOCK_R, BLOCK_G)
        k0, k1, k2, k3 = _rank_keep(m0, m1, m2, m3)
        x0, x1, x2, x3 = _split4(x, BLOCK_R, BLOCK_G)
        if WRITE_DENSE:
            if RELU2:
                o0, o1, o2, o3 = x0 * x0, x1 * x1, x2 * x2, x3 * x3
            else:
                o0, o1, o2, o3 = x0, x1, x2, x3
            out = _join4(tl.where(k0, o0, 0.0), tl.where(k1, o1, 0.0), tl.where(k2, o2, 0.0), tl.where(k3, o3, 0.0),
                         BLOCK_R, BLOCK_G)
            tl.store(dense_ptr + r3 * stride_d + g3 * 4 + p3, out.to(dense_ptr.dtype.element_ty), mask=ok3)
        if WRITE_COMPRESSED:
            # Lowest and highest kept position of each group, and their values.
            i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
            i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
            v0 = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
            v1 = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
            q3 = tl.arange(0, 2)[None, None, :]
            okv = (r3 < n_rows) & (g3 < n_groups) & (q3 < 2)
            vals = tl.join(v0, v1)  # [R, G, 2]
            tl.store(val_ptr + r3 * stride_v + g3 * 2 + q3, vals.to(val_ptr.dtype.element_ty), mask=okv)
            ok2 = (rows[:, None] < n_rows) & (grp[None, :] < n_groups)
            code = tl.where(ok2, i0 | (i1 << 2), 0)
            lo, hi = tl.split(tl.reshape(code, (BLOCK_R, BLOCK_G // 2, 2)))
            pair = tl.program_id(1) * (BLOCK_G // 2) + tl.arange(0, BLOCK_G // 2)
            okm = (rows[:, None] < n_rows) & (pair[None, :] * 2 < n_groups)
            tl.store(meta_ptr + rows[:, None] * stride_m + pair[None, :], (lo | (hi << 4)).to(tl.uint8), mask=okm)

    @triton.jit
    def _decompress24_kernel(val_ptr, meta_ptr, grad_ptr, out_ptr, n_rows, n_groups,
                             stride_v, stride_m, stride_g, stride_o,
                             MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        grp = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        pair = tl.program_id(1) * (BLOCK_G // 2) + tl.arange(0, BLOCK_G // 2)
        okm = (rows[:, None] < n_rows) & (pair[None, :] * 2 < n_groups)
        byte = tl.load(meta_ptr + rows[:, None] * stride_m + pair[None, :], mask=okm, other=0).to(tl.int32)
        code = tl.reshape(tl.join(byte & 15, byte >> 4), (BLOCK_R, BLOCK_G))
        i0 = code & 3
        i1 = code >> 2
        r3 = rows[:, None, None]
        g3 = grp[None, :, None]
        q3 = tl.arange(0, 2)[None, None, :]
        okv = (r3 < n_rows) & (g3 < n_groups) & (q3 < 2)
        v0, v1 = tl.split(upcast(tl.load(val_ptr + r3 * stride_v + g3 * 2 + q3, mask=okv, other=0.0)))
        if MODE == 1:
            v0 = v0 * v0
            v1 = v1 * v1
        o0 = tl.where(i0 == 0, v0, 0.0)
        o1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, 0.0))
        o2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0.0))
        o3 = tl.where(i1 == 3, v1, 0.0)
        p3 = tl.arange(0, 4)[None, None, :]
        ok3 = (r3 < n_rows) & (g3 < n_groups) & (p3 < 4)
        out = _join4(o0, o1, o2, o3, BLOCK_R, BLOCK_G)
        if MODE == 2:
            g = upcast(tl.load(grad_ptr + r3 * stride_g + g3 * 4 + p3, mask=ok3, other=0.0))
            out = 2.0 * out * g
        tl.store(out_ptr + r3 * stride_o + g3 * 4 + p3, out.to(out_ptr.dtype.element_ty), mask=ok3)

    @triton.jit
    def _relu2_grad_kernel(g_ptr, h_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = upcast(tl.load(g_ptr + offs, mask=ok, other=0.0))
        h = upcast(tl.load(h_ptr + offs, mask=ok, other=0.0))
        tl.store(out_ptr + offs, (2.0 * tl.maximum(h, 0.0) * g).to(out_ptr.dtype.element_ty), mask=ok)


_BLOCK_R = 8
_BLOCK_G = 128  # even: a program writes whole meta bytes


def _grid(n_rows: int, n_groups: int):
    return (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(max(1, n_groups), _BLOCK_G))


def sparsify24_triton(x: torch.Tensor, relu2: bool = False, write_dense: bool = True,
                      write_compressed: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton version of sparsify24_reference; outputs not asked for come back as None."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use sparsify24_reference")
    n, width = x.shape
    _check_width(width)
    x = rowmajor(x)
    dense = torch.empty_like(x) if write_dense else None
    values = torch.empty(n, width // 2, dtype=x.dtype, device=x.device) if write_compressed else None
    meta = torch.empty(n, meta_columns(width), dtype=torch.uint8, device=x.device) if write_compressed else None
    if n == 0:
        return dense, values, meta
    dummy = x
    _sparsify24_kernel[_grid(n, width // 4)](
        x, dense if write_dense else dummy, values if write_compressed else dummy, meta if write_compressed else dummy,
        n, width // 4, x.stride(0), dense.stride(0) if write_dense else 0,
        values.stride(0) if write_compressed else 0, meta.stride(0) if write_compressed else 0,
        RELU2=relu2, WRITE_DENSE=write_dense, WRITE_COMPRESSED=write_compressed, BLOCK_R=_BLOCK_R, BLOCK_G=_BLOCK_G)
    return dense, values, meta


def decompress24_triton(values: torch.Tensor, meta: torch.Tensor, width: int, mode: int = DECOMPRESS_VALUES,
                        grad: torch.Tensor | None = None) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use decompress24_reference")
    _check_width(width)
    n = values.shape[0]
    if mode == DECOMPRESS_RELU2_GRAD:
        if grad is None:
            raise ValueError("mode DECOMPRESS_RELU2_GRAD needs grad")
        grad = rowmajor(grad)
    out = torch.empty(n, width, dtype=grad.dtype if grad is not None else values.dtype, device=values.device)
    if n == 0:
        return out
    g = grad if grad is not None else values
    _decompress24_kernel[_grid(n, width // 4)](
        values, meta, g, out, n, width // 4, values.stride(0), meta.stride(0), g.stride(0), out.stride(0),
        MODE=mode, BLOCK_R=_BLOCK_R, BLOCK_G=_BLOCK_G)
    return out


def relu2_grad_triton(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use relu2_grad_reference")
    if grad.shape != h.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and h {tuple(h.shape)} must have the same shape")
    grad, h = grad.contiguous(), h.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _relu2_grad_kernel[(triton.cdiv(n, 4096),)](grad, h, out, n, BLOCK=4096)
    return out


# ---------------------------------------------------------------------------------------- dispatch

def sparsify24(x: torch.Tensor, relu2: bool = False, write_dense: bool = True, write_compressed: bool = True):
    """2:4-sparsify the rows of x [N, F] (see the module doc); Triton on GPU, torch on CPU."""
    if use_triton(x):
        return sparsify24_triton(x, relu2, write_dense, write_compressed)
    dense, values, meta = sparsify24_reference(x, relu2)
    return (dense if write_dense else None, values if write_compressed else None, meta if write_compressed else None)


def decompress24(values: torch.Tensor, meta: torch.Tensor, width: int, mode: int = DECOMPRESS_VALUES,
                 grad: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(values):
        return decompress24_triton(values, meta, width, mode, grad)
    return decompress24_reference(values, meta, width, mode, grad)


def relu2_grad(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if use_triton(grad):
        return relu2_grad_triton(grad, h)
    return relu2_grad_reference(grad, h)
