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

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a declared dependency; keep CPU use possible without it
    HAVE_TRITON = False

# Backward modes of decompress24: what each kept entry v turns into in the dense output.
DECOMPRESS_VALUES = 0  # v
DECOMPRESS_SQUARE = 1  # v² (relu(h)² from stored relu(h))
DECOMPRESS_RELU2_GRAD = 2  # 2·v·grad (d relu(h)²/dh times the incoming gradient, at kept entries)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic runs in fp32, or fp64 for fp64 inputs (used by gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


# ---------------------------------------------------------------------------------------- triton

if HAVE_TRITON:

    @triton.jit
    def _upcast(x):
        if x.dtype != tl.float64:
            x = x.to(tl.float32)
        return x

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
    def _sparsify24_kernel(x_ptr, dense_ptr, val_ptr, meta_ptr, n_rows, n_groups,
                           stride_x, stride_d, stride_v, stride_m,
                           RELU2: tl.constexpr, WRITE_DENSE: tl.constexpr, WRITE_COMPRESSED: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        # One program: BLOCK_R rows x BLOCK_P pairs of groups (one meta byte per pair).
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        pairs = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P))[None, :]
        row_ok = rows < n_rows
        byte = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.int32)
        for half in tl.static_range(2):
            grp = pairs * 2 + half
            ok = row_ok & (grp < n_groups)
            src = x_ptr + rows * stride_x + grp * 4
            x0 = _upcast(tl.load(src + 0, mask=ok, other=0.0))
            x1 = _upcast(tl.load(src + 1, mask=ok, other=0.0))
            x2 = _upcast(tl.load(src + 2, mask=ok, other=0.0))
            x3 = _upcast(tl.load(src + 3, mask=ok, other=0.0))
            if RELU2:
                x0 = tl.maximum(x0, 0.0)
                x1 = tl.maximum(x1, 0.0)
                x2 = tl.maximum(x2, 0.0)
                x3 = tl.maximum(x3, 0.0)
                k0, k1, k2, k3 = _rank_keep(x0, x1, x2, x3)
            else:
                k0, k1, k2, k3 = _rank_keep(tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3))
            if WRITE_DENSE:
                dst = dense_ptr + rows * stride_d + grp * 4
                if RELU2:
                    o0 = x0 * x0
                    o1 = x1 * x1
                    o2 = x2 * x2
                    o3 = x3 * x3
                else:
                    o0 = x0
                    o1 = x1
                    o2 = x2
                    o3 = x3
                ty = dense_ptr.dtype.element_ty
                tl.store(dst + 0, tl.where(k0, o0, 0.0).to(ty), mask=ok)
                tl.store(dst + 1, tl.where(k1, o1, 0.0).to(ty), mask=ok)
                tl.store(dst + 2, tl.where(k2, o2, 0.0).to(ty), mask=ok)
                tl.store(dst + 3, tl.where(k3, o3, 0.0).to(ty), mask=ok)
            if WRITE_COMPRESSED:
                # Lowest and highest kept position of the group.
                i0 = tl.where(k0, 0, tl.where(k1, 1, 2))
                i1 = tl.where(k3, 3, tl.where(k2, 2, 1))
                v0 = tl.where(i0 == 0, x0, tl.where(i0 == 1, x1, x2))
                v1 = tl.where(i1 == 3, x3, tl.where(i1 == 2, x2, x1))
                vty = val_ptr.dtype.element_ty
                vdst = val_ptr + rows * stride_v + grp * 2
                tl.store(vdst + 0, v0.to(vty), mask=ok)
                tl.store(vdst + 1, v1.to(vty), mask=ok)
                code = tl.where(ok, i0 | (i1 << 2), 0)
                byte = byte | (code << (4 * half))
        if WRITE_COMPRESSED:
            tl.store(meta_ptr + rows * stride_m + pairs, byte.to(tl.uint8), mask=row_ok & (pairs * 2 < n_groups))

    @triton.jit
    def _decompress24_kernel(val_ptr, meta_ptr, grad_ptr, out_ptr, n_rows, n_groups,
                             stride_v, stride_m, stride_g, stride_o,
                             MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        pairs = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P))[None, :]
        row_ok = rows < n_rows
        byte = tl.load(meta_ptr + rows * stride_m + pairs, mask=row_ok & (pairs * 2 < n_groups), other=0).to(tl.int32)
        for half in tl.static_range(2):
            grp = pairs * 2 + half
            ok = row_ok & (grp < n_groups)
            code = (byte >> (4 * half)) & 15
            i0 = code & 3
            i1 = code >> 2
            vsrc = val_ptr + rows * stride_v + grp * 2
            v0 = _upcast(tl.load(vsrc + 0, mask=ok, other=0.0))
            v1 = _upcast(tl.load(vsrc + 1, mask=ok, other=0.0))
            if MODE == 1:
                v0 = v0 * v0
                v1 = v1 * v1
            if MODE == 2:
                gsrc = grad_ptr + rows * stride_g + grp * 4
                v0 = 2.0 * v0 * _upcast(tl.load(gsrc + i0, mask=ok, other=0.0))
                v1 = 2.0 * v1 * _upcast(tl.load(gsrc + i1, mask=ok, other=0.0))
            dst = out_ptr + rows * stride_o + grp * 4
            ty = out_ptr.dtype.element_ty
            for pos in tl.static_range(4):
                o = tl.where(i0 == pos, v0, tl.where(i1 == pos, v1, 0.0))
                tl.store(dst + pos, o.to(ty), mask=ok)


_BLOCK_R = 16
_BLOCK_P = 32


def _grid(n_rows: int, n_groups: int):
    return (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(max(1, (n_groups + 1) // 2), _BLOCK_P))


def sparsify24_triton(x: torch.Tensor, relu2: bool = False, write_dense: bool = True,
                      write_compressed: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton version of sparsify24_reference; outputs not asked for come back as None."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use sparsify24_reference")
    n, width = x.shape
    _check_width(width)
    if x.stride(1) != 1:
        x = x.contiguous()
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
        RELU2=relu2, WRITE_DENSE=write_dense, WRITE_COMPRESSED=write_compressed, BLOCK_R=_BLOCK_R, BLOCK_P=_BLOCK_P)
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
        if grad.stride(1) != 1:
            grad = grad.contiguous()
    out = torch.empty(n, width, dtype=grad.dtype if grad is not None else values.dtype, device=values.device)
    if n == 0:
        return out
    g = grad if grad is not None else values
    _decompress24_kernel[_grid(n, width // 4)](
        values, meta, g, out, n, width // 4, values.stride(0), meta.stride(0), g.stride(0), out.stride(0),
        MODE=mode, BLOCK_R=_BLOCK_R, BLOCK_P=_BLOCK_P)
    return out


# ---------------------------------------------------------------------------------------- dispatch

def _use_triton(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


def sparsify24(x: torch.Tensor, relu2: bool = False, write_dense: bool = True, write_compressed: bool = True):
    """2:4-sparsify the rows of x [N, F] (see the module doc); Triton on GPU, torch on CPU."""
    if _use_triton(x):
        return sparsify24_triton(x, relu2, write_dense, write_compressed)
    dense, values, meta = sparsify24_reference(x, relu2)
    return (dense if write_dense else None, values if write_compressed else None, meta if write_compressed else None)


def decompress24(values: torch.Tensor, meta: torch.Tensor, width: int, mode: int = DECOMPRESS_VALUES,
                 grad: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton(values):
        return decompress24_triton(values, meta, width, mode, grad)
    return decompress24_reference(values, meta, width, mode, grad)
