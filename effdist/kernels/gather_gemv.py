"""Gather-GEMV: matrix-vector products that read only the weight rows of a token's active FFN channels.

Sparse-FFN decode (effdist.infer.ffn) keeps a few channels per token; the weights are stored with one
contiguous row per FFN channel (fc1's gate/up rows as trained, fc2 transposed to [F, H]), so a
token's active channels are a set of rows to read and nothing else. Two operations, each a Triton
kernel beside the plain-torch reference it is tested against (tests/test_kernels_gather_gemv.py):

  gather_rows_combine(coef [B, S], idx [B, S], weight [F, H], count [B] | None) -> [B, H]
      out[b] = sum over slots s < count[b] with idx[b, s] >= 0 of coef[b, s] * weight[idx[b, s]]
      (the down projection over the active columns of W_down: weight = W_downᵀ)
  gather_rows_matvec(x [B, H], idx [B, K], weight [F, H], gate [B, K] | None) -> [B, K]
      u[b, k] = weight[idx[b, k]] · x[b]; with `gate`: SiLU(gate) * u, u rounded to x's dtype first
      (MoC: the up projection at the selected channels only, fused with the gated product)
  compact_active(z [B, F], max_active) -> (coef [B, S], idx [B, S], count [B])
      the non-zero entries of each row moved to its first count[b] slots, in channel order (fixed
      shapes and no host synchronisation, so a decode step stays capturable as a CUDA graph)

Accumulation is fp32 (the references: fp64 for fp64 inputs), rounded to the output dtype once. A slot with idx -1
(or at/after count) contributes nothing. The combine kernel splits each row's slots over several
programs when the batch is small (a GEMV on a few rows otherwise leaves most of the GPU idle); their
fp32 partial sums are added in a fixed order, so results are deterministic.
"""

from __future__ import annotations

from typing import Optional

import torch

from effdist.kernels._common import HAVE_TRITON, compute_dtype, rowmajor, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from effdist.kernels._common import upcast


def _check(idx: torch.Tensor, weight: torch.Tensor, rows: int, name: str) -> None:
    if idx.dim() != 2 or idx.shape[0] != rows:
        raise ValueError(f"idx has shape {tuple(idx.shape)}, expected [{rows}, slots] for {name}")
    if weight.dim() != 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected [channels, features] for {name}")


# ---------------------------------------------------------------------------------------- reference

def _slot_mask(idx: torch.Tensor, count: Optional[torch.Tensor]) -> torch.Tensor:
    valid = idx >= 0
    if count is not None:
        valid &= torch.arange(idx.shape[1], device=idx.device)[None, :] < count.to(torch.long)[:, None]
    return valid


def gather_rows_combine_reference(coef: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                                  count: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check(idx, weight, coef.shape[0], "gather_rows_combine")
    ct = compute_dtype(coef.dtype)
    valid = _slot_mask(idx, count)
    c = torch.where(valid, coef.to(ct), torch.zeros((), dtype=ct, device=coef.device))
    rows = weight[idx.long().clamp_min(0)].to(ct)  # [B, S, H]: only the active rows, one copy per token
    return torch.bmm(c.unsqueeze(1), rows).squeeze(1).to(coef.dtype)


def gather_rows_matvec_reference(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                                 gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    _check(idx, weight, x.shape[0], "gather_rows_matvec")
    ct = compute_dtype(x.dtype)
    valid = idx >= 0
    rows = weight[idx.long().clamp_min(0)].to(ct)  # [B, K, H]
    u = torch.bmm(rows, x.to(ct).unsqueeze(-1)).squeeze(-1)
    if gate is not None:
        g = gate.to(ct)
        u = g * torch.sigmoid(g) * u.to(x.dtype).to(ct)
    return torch.where(valid, u, torch.zeros((), dtype=ct, device=x.device)).to(x.dtype)


def compact_active(z: torch.Tensor, max_active: Optional[int] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zero entries of each row of z [B, F], moved to the row's first slots in channel order:
    (coef [B, S], idx [B, S] int32 with -1 in unused slots, count [B] int32), S = max_active or F.
    `max_active` must bound every row's non-zero count (e.g. F/2 after 2:4 selection)."""
    b, width = z.shape
    slots = width if max_active is None else max_active
    active = z != 0
    count = active.sum(dim=1, dtype=torch.int32)
    # A row's j-th active channel goes to slot j; inactive ones to a spare column cut off below.
    target = torch.where(active, active.cumsum(dim=1) - 1, slots)
    channels = torch.arange(width, device=z.device, dtype=torch.int32).expand(b, width)
    idx = torch.full((b, slots + 1), -1, dtype=torch.int32, device=z.device).scatter_(1, target, channels)[:, :slots]
    coef = torch.zeros(b, slots + 1, dtype=z.dtype, device=z.device).scatter_(1, target, z)[:, :slots]
    return coef, idx, count


# ---------------------------------------------------------------------------------------- triton

if HAVE_TRITON:

    @triton.jit
    def _gather_rows_combine_kernel(coef_ptr, idx_ptr, count_ptr, w_ptr, part_ptr, n_rows, n_slots, n_features,
                                    stride_coef, stride_idx, stride_w, stride_part_split, stride_part_row,
                                    HAS_COUNT: tl.constexpr, SPLIT: tl.constexpr,
                                    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        feat = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        split = tl.program_id(2)
        if HAS_COUNT:
            used = tl.minimum(tl.load(count_ptr + row).to(tl.int32), n_slots)
        else:
            used = n_slots
        # This program's share of the row's used slots (a whole number of BLOCK_S blocks).
        per_split = tl.cdiv(tl.cdiv(used, SPLIT), BLOCK_S) * BLOCK_S
        start = split * per_split
        end = tl.minimum(start + per_split, used)
        feat_ok = feat < n_features
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            slots = s0 + tl.arange(0, BLOCK_S)
            in_use = slots < end
            ch = tl.load(idx_ptr + row * stride_idx + slots, mask=in_use, other=-1).to(tl.int64)
            live = in_use & (ch >= 0)
            c = upcast(tl.load(coef_ptr + row * stride_coef + slots, mask=live, other=0.0))
            w = tl.load(w_ptr + ch[:, None] * stride_w + feat[None, :], mask=live[:, None] & feat_ok[None, :],
                        other=0.0)
            acc += tl.sum(c[:, None] * upcast(w), axis=0)
        tl.store(part_ptr + split * stride_part_split + row * stride_part_row + feat, acc, mask=feat_ok)

    @triton.jit
    def _gather_rows_matvec_kernel(x_ptr, idx_ptr, w_ptr, gate_ptr, out_ptr, n_rows, n_slots, n_features,
                                   stride_x, stride_idx, stride_w, stride_gate, stride_out,
                                   GATED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        in_range = slots < n_slots
        ch = tl.load(idx_ptr + row * stride_idx + slots, mask=in_range, other=-1).to(tl.int64)
        live = in_range & (ch >= 0)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for h0 in range(0, n_features, BLOCK_H):
            feat = h0 + tl.arange(0, BLOCK_H)
            feat_ok = feat < n_features
            x = upcast(tl.load(x_ptr + row * stride_x + feat, mask=feat_ok, other=0.0))
            w = tl.load(w_ptr + ch[:, None] * stride_w + feat[None, :], mask=live[:, None] & feat_ok[None, :],
                        other=0.0)
            acc += tl.sum(upcast(w) * x[None, :], axis=1)
        ty = out_ptr.dtype.element_ty
        if GATED:
            g = upcast(tl.load(gate_ptr + row * stride_gate + slots, mask=live, other=0.0))
            # u is rounded to the activation dtype first, as the dense up projection hands it over.
            acc = g * tl.sigmoid(g) * upcast(acc.to(ty))
        tl.store(out_ptr + row * stride_out + slots, tl.where(live, acc, 0.0).to(ty), mask=in_range)


_COMBINE_BLOCK_S = 16
_COMBINE_BLOCK_H = 128
_MATVEC_BLOCK_K = 8
_MATVEC_BLOCK_H = 256
# Programs the combine kernel aims for (a few per SM of a large GPU) before it splits rows' slots.
_TARGET_PROGRAMS = 1024


def combine_splits(rows: int, slots: int, features: int) -> int:
    """How many programs share one row's slots: enough to fill the GPU at small batches, at most one
    BLOCK_S block each, a power of two."""
    programs = rows * triton.cdiv(features, _COMBINE_BLOCK_H)
    want = max(1, _TARGET_PROGRAMS // max(programs, 1))
    most = max(1, triton.cdiv(slots, _COMBINE_BLOCK_S))
    return min(triton.next_power_of_2(want), triton.next_power_of_2(most), 64)


def gather_rows_combine_triton(coef: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                               count: Optional[torch.Tensor] = None, split: Optional[int] = None) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use gather_rows_combine_reference")
    _check(idx, weight, coef.shape[0], "gather_rows_combine")
    coef, idx, weight = rowmajor(coef), rowmajor(idx), rowmajor(weight)
    rows, slots = idx.shape
    features = weight.shape[1]
    split = split or combine_splits(rows, slots, features)
    parts = torch.zeros(split, rows, features, dtype=torch.float32, device=coef.device)
    if rows and slots and features:
        grid = (rows, triton.cdiv(features, _COMBINE_BLOCK_H), split)
        _gather_rows_combine_kernel[grid](coef, idx, count if count is not None else idx, weight, parts, rows, slots,
                                          features, coef.stride(0), idx.stride(0), weight.stride(0), parts.stride(0),
                                          parts.stride(1), HAS_COUNT=count is not None, SPLIT=split,
                                          BLOCK_S=_COMBINE_BLOCK_S, BLOCK_H=_COMBINE_BLOCK_H)
    return (parts[0] if split == 1 else parts.sum(dim=0)).to(coef.dtype)


def gather_rows_matvec_triton(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                              gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use gather_rows_matvec_reference")
    _check(idx, weight, x.shape[0], "gather_rows_matvec")
    x, idx, weight = rowmajor(x), rowmajor(idx), rowmajor(weight)
    gate = rowmajor(gate) if gate is not None else None
    rows, slots = idx.shape
    features = weight.shape[1]
    out = torch.empty(rows, slots, dtype=x.dtype, device=x.device)
    if rows and slots:
        grid = (rows, triton.cdiv(slots, _MATVEC_BLOCK_K))
        _gather_rows_matvec_kernel[grid](x, idx, weight, gate if gate is not None else x, out, rows, slots, features,
                                         x.stride(0), idx.stride(0), weight.stride(0),
                                         gate.stride(0) if gate is not None else 0, out.stride(0),
                                         GATED=gate is not None, BLOCK_K=_MATVEC_BLOCK_K, BLOCK_H=_MATVEC_BLOCK_H)
    return out


# ---------------------------------------------------------------------------------------- dispatch

def gather_rows_combine(coef, idx, weight, count=None):
    """Triton on CUDA tensors, the torch reference elsewhere (see the module doc)."""
    fn = gather_rows_combine_triton if use_triton(coef) else gather_rows_combine_reference
    return fn(coef, idx, weight, count)


def gather_rows_matvec(x, idx, weight, gate=None):
    fn = gather_rows_matvec_triton if use_triton(x) else gather_rows_matvec_reference
    return fn(x, idx, weight, gate)
