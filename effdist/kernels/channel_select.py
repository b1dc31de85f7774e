"""Per-token channel selection: gather the selected channels, apply the activation there, scatter.

Used by Mixture-of-Channels (SwiGLU: keep SiLU(G)⊙U on the top-K gate channels) and by top-k ReLU
FFNs (keep act(H) on the k largest channels). Every row (token) has the same number of slots
K; ``idx[n, j]`` is the channel of slot j of row n, or -1 for an unused slot (under tensor
parallelism a rank only owns some of a token's global top-K, see effdist.model.ffn.selection).
Channels within a row are distinct, so scatters need no atomics.

Activations (``act``):
  "swiglu": src is [N, 2W] = [gate | up] (megatron's fused fc1 layout per TP rank);
            z = SiLU(g)·u,  sel_a = g, sel_b = u;
  "relu":   src is [N, W];  z = relu(h),  sel_a = h;
  "relu2":  src is [N, W];  z = relu(h)², sel_a = h.
Three operations, each a Triton kernel beside a torch reference:
  select_activate     src, idx -> (dense z [N, W], sel_a [N, K], sel_b [N, K] | None)
  scatter_activated   sel_a, sel_b, idx -> dense z (rebuilds the forward output for backward)
  select_activate_backward  dz, sel_a, sel_b, idx -> dsrc (zero outside the selected channels)
Math runs in fp32 and is rounded to the tensor dtype once.

A selection that is a plain top-K of one row (MoC and top-k on one tensor-parallel rank: the fused
kernel of effdist.kernels.topk_select) can be kept as a bit mask instead of indices: ``mask[n]`` holds
⌈W/32⌉ int32 words, bit c % 32 of word c // 32 set where channel c is kept, and the selected values sit
in column order (slot j of a row is its j-th kept channel). That is 4·⌈W/32⌉ bytes a row instead of
2K (W/8 against 2 · 0.1875 W for MoC), and its two backward-side kernels walk each row densely, in chunks:
  scatter_activated_masked        sel_a, sel_b, mask -> dense z (every element written: no memset)
  select_activate_backward_masked dz, sel_a, sel_b, mask -> dsrc (read and written densely, no memset)
instead of scattering K slots into a zeroed tensor (gathers of dz and scattered stores, at a fifth of
HBM bandwidth on an H100).
"""

from __future__ import annotations

import torch

from effdist.kernels._common import HAVE_TRITON, compute_dtype, rowmajor, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from effdist.kernels._common import upcast

ACTIVATIONS = {"swiglu": 0, "relu": 1, "relu2": 2}


def _act_code(act: str) -> int:
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; valid: {', '.join(ACTIVATIONS)}") from None


def _src_width(act: str, width: int) -> int:
    return 2 * width if act == "swiglu" else width


# ---------------------------------------------------------------------------------------- reference

def _activate_reference(a: torch.Tensor, b: torch.Tensor | None, act: str) -> torch.Tensor:
    a = a.to(compute_dtype(a.dtype))
    if act == "swiglu":
        return a * torch.sigmoid(a) * b.to(a.dtype)
    if act == "relu":
        return a.clamp_min(0)
    return a.clamp_min(0).square()


def select_activate_reference(src: torch.Tensor, idx: torch.Tensor, width: int, act: str):
    _act_code(act)
    valid = idx >= 0
    safe = idx.long().clamp_min(0)
    a = torch.where(valid, torch.gather(src, 1, safe), torch.zeros((), dtype=src.dtype))
    b = None
    if act == "swiglu":
        b = torch.where(valid, torch.gather(src, 1, safe + width), torch.zeros((), dtype=src.dtype))
    z = scatter_activated_reference(a, b, idx, width, act)
    return z, a, b


def scatter_activated_reference(sel_a: torch.Tensor, sel_b: torch.Tensor | None, idx: torch.Tensor, width: int,
                                act: str) -> torch.Tensor:
    valid = idx >= 0
    z = torch.where(valid, _activate_reference(sel_a, sel_b, act), 0.0).to(sel_a.dtype)
    # Unused slots write a zero into an extra column that is cut off afterwards.
    target = torch.where(valid, idx.long(), width)
    out = torch.zeros(sel_a.shape[0], width + 1, dtype=sel_a.dtype, device=sel_a.device)
    return out.scatter_(1, target, z)[:, :width]


def select_activate_backward_reference(dz: torch.Tensor, sel_a: torch.Tensor, sel_b: torch.Tensor | None,
                                       idx: torch.Tensor, width: int, act: str) -> torch.Tensor:
    valid = idx >= 0
    safe = idx.long().clamp_min(0)
    ct = compute_dtype(dz.dtype)
    g = torch.where(valid, torch.gather(dz, 1, safe), torch.zeros((), dtype=dz.dtype)).to(ct)
    a = sel_a.to(ct)
    target = torch.where(valid, idx.long(), _src_width(act, width))
    out = torch.zeros(dz.shape[0], _src_width(act, width) + 1, dtype=dz.dtype, device=dz.device)
    if act == "swiglu":
        s = torch.sigmoid(a)
        da = g * sel_b.to(ct) * s * (1 + a * (1 - s))
        db = g * a * s
        out.scatter_(1, target, da.to(dz.dtype))
        out.scatter_(1, torch.where(valid, target + width, 2 * width), db.to(dz.dtype))
    elif act == "relu":
        out.scatter_(1, target, (g * (a > 0)).to(dz.dtype))
    else:
        out.scatter_(1, target, (2 * g * a.clamp_min(0)).to(dz.dtype))
    return out[:, :-1]


# -------------------------------------------------------------------------------- bit-mask references

MASK_WORD_BITS = 32


def mask_words(width: int) -> int:
    """int32 words per row of a channel bit mask."""
    return -(-width // MASK_WORD_BITS)


def pack_mask_reference(keep: torch.Tensor) -> torch.Tensor:
    """keep [N, W] bool -> mask [N, ⌈W/32⌉] int32 (bit c % 32 of word c // 32 is channel c)."""
    n, width = keep.shape
    padded = torch.zeros(n, mask_words(width) * MASK_WORD_BITS, dtype=torch.int64, device=keep.device)
    padded[:, :width] = keep.to(torch.int64)
    weights = torch.ones(MASK_WORD_BITS, dtype=torch.int64, device=keep.device) << torch.arange(MASK_WORD_BITS,
                                                                                              device=keep.device)
    words = (padded.view(n, -1, MASK_WORD_BITS) * weights).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # two's complement


def unpack_mask_reference(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of pack_mask_reference: [N, ⌈W/32⌉] int32 -> [N, W] bool."""
    shifts = torch.arange(MASK_WORD_BITS, device=mask.device)
    bits = (mask.to(torch.int64)[:, :, None] >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :width].bool()


def mask_to_index(mask: torch.Tensor, width: int, slots: int) -> torch.Tensor:
    """The same selection as channel indices in column order, [N, slots] int64, -1 in unused slots."""
    keep = unpack_mask_reference(mask, width)
    slot = torch.where(keep, keep.long().cumsum(1) - 1, slots)  # dropped channels go to a spare slot
    idx = torch.full((mask.shape[0], slots + 1), -1, dtype=torch.int64, device=mask.device)
    cols = torch.arange(width, device=mask.device).expand(mask.shape[0], width)
    return idx.scatter_(1, slot, cols)[:, :slots]


def scatter_activated_masked_reference(sel_a, sel_b, mask, width: int, act: str) -> torch.Tensor:
    return scatter_activated_reference(sel_a, sel_b, mask_to_index(mask, width, sel_a.shape[1]), width, act)


def select_activate_backward_masked_reference(dz, sel_a, sel_b, mask, width: int, act: str) -> torch.Tensor:
    idx = mask_to_index(mask, width, sel_a.shape[1])
    return select_activate_backward_reference(dz, sel_a, sel_b, idx, width, act)


# (columns per chunk, num_warps) of the masked kernels, one row per program: the fastest of the sweep on an H100
# (tools/bench_topk_select.py --parts backward, docs/results/bench_topk_select_mask_chunks_h100.json: backward +
# rebuild at 16k rows of llama-350m's and llama-1b's widths). Eight row elements a thread; SwiGLU, which loads
# twice the selected values, gains from two warps sharing a wider chunk, ReLU from one warp on a narrower one.
MASKED_CHUNKS = {"swiglu": (512, 2), "relu": (256, 1), "relu2": (256, 1)}


def masked_tile_config(width: int, act: str = "swiglu") -> tuple[int, int, int]:
    """(rows per program, columns per chunk, num_warps) of the masked kernels: one row per program, walked in
    chunks (never wider than the row rounded up to a power of two, nor narrower than one mask word)."""
    block_w, warps = MASKED_CHUNKS[act]
    row = max(MASK_WORD_BITS, 1 << max(0, width - 1).bit_length())
    return 1, min(block_w, row), max(1, warps * min(block_w, row) // block_w)


def row_tile_config(rows: int, width: int, per_thread: int = 64) -> tuple[int, int, int]:
    """(rows per program, BLOCK_W, num_warps) of the kernels that hold whole rows in registers (the top-K selection
    in training): about `per_thread` row elements per thread, two rows per program up to
    4096 wide. BLOCK_W is at least one mask word."""
    block_w = max(MASK_WORD_BITS, 1 << max(0, width - 1).bit_length())
    per_program = 2 if block_w <= 4096 else 1
    return per_program, block_w, max(1, min(16, per_program * block_w // (32 * per_thread)))


# ---------------------------------------------------------------------------------------- triton

if HAVE_TRITON:

    @triton.jit
    def _activate(a, b, ACT: tl.constexpr):
        if ACT == 0:
            z = a * tl.sigmoid(a) * b
        elif ACT == 1:
            z = tl.maximum(a, 0.0)
        else:
            r = tl.maximum(a, 0.0)
            z = r * r
        return z

    @triton.jit
    def _load_selected(a_ptr, b_ptr, offsets, mask, ACT: tl.constexpr):
        """The saved selected values at `offsets` in the compute dtype: a, and b for swiglu (a again otherwise)."""
        a = upcast(tl.load(a_ptr + offsets, mask=mask, other=0.0))
        b = a
        if ACT == 0:
            b = upcast(tl.load(b_ptr + offsets, mask=mask, other=0.0))
        return a, b

    @triton.jit
    def _activation_grads(g, a, b, ACT: tl.constexpr):
        """The gradients at a and b (b: swiglu's up value; unused otherwise) of _activate, given g at z."""
        if ACT == 0:
            s = tl.sigmoid(a)
            da = g * b * s * (1.0 + a * (1.0 - s))
            db = g * a * s
        elif ACT == 1:
            da = tl.where(a > 0.0, g, 0.0)
            db = da
        else:
            da = 2.0 * g * tl.maximum(a, 0.0)
            db = da
        return da, db

    @triton.jit
    def _slot_tile(idx_ptr, n_rows, n_slots, stride_idx, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """This program's [BLOCK_R, BLOCK_K] tile of slots, as every kernel here walks it: row offsets
        (int64, [R, 1]), slot offsets ([1, K]), which slots lie inside idx, each slot's channel (int64,
        -1 where unused) and which slots are in use (inside idx with a channel)."""
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        slots = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K))[None, :]
        in_range = (rows < n_rows) & (slots < n_slots)
        ch = tl.load(idx_ptr + rows * stride_idx + slots, mask=in_range, other=-1).to(tl.int64)
        valid = in_range & (ch >= 0)
        return rows, slots, in_range, ch, valid

    @triton.jit
    def _select_activate_kernel(src_ptr, idx_ptr, z_ptr, a_ptr, b_ptr, n_rows, n_slots, width,
                                stride_src, stride_idx, stride_z, stride_sel,
                                ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, slots, in_range, ch, valid = _slot_tile(idx_ptr, n_rows, n_slots, stride_idx, BLOCK_R, BLOCK_K)
        a = tl.load(src_ptr + rows * stride_src + ch, mask=valid, other=0.0)
        tl.store(a_ptr + rows * stride_sel + slots, a, mask=in_range)
        b = a
        if ACT == 0:
            b = tl.load(src_ptr + rows * stride_src + width + ch, mask=valid, other=0.0)
            tl.store(b_ptr + rows * stride_sel + slots, b, mask=in_range)
        z = _activate(upcast(a), upcast(b), ACT)
        tl.store(z_ptr + rows * stride_z + ch, z.to(z_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _scatter_activated_kernel(a_ptr, b_ptr, idx_ptr, z_ptr, n_rows, n_slots,
                                  stride_sel, stride_idx, stride_z,
                                  ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, slots, in_range, ch, valid = _slot_tile(idx_ptr, n_rows, n_slots, stride_idx, BLOCK_R, BLOCK_K)
        a, b = _load_selected(a_ptr, b_ptr, rows * stride_sel + slots, valid, ACT)
        z = _activate(a, b, ACT)
        tl.store(z_ptr + rows * stride_z + ch, z.to(z_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _select_activate_backward_kernel(dz_ptr, a_ptr, b_ptr, idx_ptr, dsrc_ptr, n_rows, n_slots, width,
                                         stride_dz, stride_sel, stride_idx, stride_dsrc,
                                         ACT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        rows, slots, in_range, ch, valid = _slot_tile(idx_ptr, n_rows, n_slots, stride_idx, BLOCK_R, BLOCK_K)
        g = upcast(tl.load(dz_ptr + rows * stride_dz + ch, mask=valid, other=0.0))
        a, b = _load_selected(a_ptr, b_ptr, rows * stride_sel + slots, valid, ACT)
        da, db = _activation_grads(g, a, b, ACT)
        ty = dsrc_ptr.dtype.element_ty
        dst = dsrc_ptr + rows * stride_dsrc + ch
        tl.store(dst, da.to(ty), mask=valid)
        if ACT == 0:
            tl.store(dst + width, db.to(ty), mask=valid)


    @triton.jit
    def pack_keep(keep, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """[ROWS, BLOCK_W] bool -> [ROWS, BLOCK_W // 32] int32 mask words (bit c % 32 of word c // 32)."""
        bits = tl.reshape(keep.to(tl.int32), (ROWS, BLOCK_W // 32, 32)) << tl.arange(0, 32)[None, None, :]
        return tl.sum(bits, axis=2)  # distinct bits: the sum is their OR (bit 31 wraps to the sign, as intended)

    @triton.jit
    def _masked_chunk(mask_ptr, r64, row_ok, start, base, width, n_words, stride_mask,
                      ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """Columns [start, start + BLOCK_W) of ROWS rows of a masked selection: the column offsets ([1, BLOCK_W]),
        which lie inside the rows, which are kept, each kept channel's slot (`base`, the row's kept channels left
        of `start`, plus its rank in the chunk), and `base` for the next chunk."""
        cols = start + tl.arange(0, BLOCK_W)
        valid = row_ok[:, None] & (cols < width)[None, :]
        words_at = start // 32 + tl.arange(0, BLOCK_W // 32)
        words = tl.load(mask_ptr + r64 * stride_mask + words_at[None, :],
                        mask=row_ok[:, None] & (words_at < n_words)[None, :], other=0)
        bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
        kept = tl.reshape(bits, (ROWS, BLOCK_W))
        keep = (kept != 0) & valid
        slot = base[:, None] + tl.cumsum(kept, axis=1) - 1
        return cols[None, :], valid, keep, slot, base + tl.sum(kept, axis=1)

    @triton.jit
    def _masked_rows(n_rows, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        return rows.to(tl.int64)[:, None], row_ok, tl.zeros((ROWS,), dtype=tl.int32)

    # The two masked kernels walk each row in chunks of BLOCK_W columns, carrying the count of kept channels so
    # far: a chunk's registers stay small (a whole 5632-wide row per program, the first version, spilled: backward +
    # rebuild 2.15 ms against the index kernels' 1.15 ms for MoC at llama-1b on an H100; in 512-column chunks
    # 0.67 ms), and every load and store of dZ, dsrc and z is a contiguous row segment.
    @triton.jit
    def _scatter_activated_masked_kernel(a_ptr, b_ptr, mask_ptr, z_ptr, n_rows, width, n_words,
                                         stride_sel, stride_mask, stride_z,
                                         ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        r64, row_ok, base = _masked_rows(n_rows, ROWS)
        for start in range(0, width, BLOCK_W):
            cols, valid, keep, slot, base = _masked_chunk(mask_ptr, r64, row_ok, start, base, width, n_words,
                                                          stride_mask, ROWS, BLOCK_W)
            a, b = _load_selected(a_ptr, b_ptr, r64 * stride_sel + slot, keep, ACT)
            z = tl.where(keep, _activate(a, b, ACT), 0.0)
            tl.store(z_ptr + r64 * stride_z + cols, z.to(z_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _select_activate_backward_masked_kernel(dz_ptr, a_ptr, b_ptr, mask_ptr, dsrc_ptr, n_rows, width, n_words,
                                                stride_dz, stride_sel, stride_mask, stride_dsrc,
                                                ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        r64, row_ok, base = _masked_rows(n_rows, ROWS)
        ty = dsrc_ptr.dtype.element_ty
        for start in range(0, width, BLOCK_W):
            cols, valid, keep, slot, base = _masked_chunk(mask_ptr, r64, row_ok, start, base, width, n_words,
                                                          stride_mask, ROWS, BLOCK_W)
            g = upcast(tl.load(dz_ptr + r64 * stride_dz + cols, mask=valid, other=0.0))
            a, b = _load_selected(a_ptr, b_ptr, r64 * stride_sel + slot, keep, ACT)
            da, db = _activation_grads(g, a, b, ACT)
            dst = dsrc_ptr + r64 * stride_dsrc + cols
            tl.store(dst, tl.where(keep, da, 0.0).to(ty), mask=valid)
            if ACT == 0:
                tl.store(dst + width, tl.where(keep, db, 0.0).to(ty), mask=valid)


_BLOCK_R = 8
_BLOCK_K = 128


def _grid(n_rows: int, n_slots: int):
    return (triton.cdiv(n_rows, _BLOCK_R), triton.cdiv(max(n_slots, 1), _BLOCK_K))


def select_activate_triton(src: torch.Tensor, idx: torch.Tensor, width: int, act: str):
    code = _act_code(act)
    src, idx = rowmajor(src), rowmajor(idx)
    n, k = idx.shape
    z = torch.zeros(n, width, dtype=src.dtype, device=src.device)
    a = torch.empty(n, k, dtype=src.dtype, device=src.device)
    b = torch.empty(n, k, dtype=src.dtype, device=src.device) if act == "swiglu" else None
    if n and k:
        _select_activate_kernel[_grid(n, k)](src, idx, z, a, b if b is not None else a, n, k, width,
                                             src.stride(0), idx.stride(0), z.stride(0), a.stride(0),
                                             ACT=code, BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K)
    return z, a, b


def scatter_activated_triton(sel_a: torch.Tensor, sel_b: torch.Tensor | None, idx: torch.Tensor, width: int,
                             act: str) -> torch.Tensor:
    code = _act_code(act)
    sel_a, idx = rowmajor(sel_a), rowmajor(idx)
    sel_b = rowmajor(sel_b) if sel_b is not None else sel_a
    n, k = idx.shape
    z = torch.zeros(n, width, dtype=sel_a.dtype, device=sel_a.device)
    if n and k:
        _scatter_activated_kernel[_grid(n, k)](sel_a, sel_b, idx, z, n, k, sel_a.stride(0), idx.stride(0), z.stride(0),
                                               ACT=code, BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K)
    return z


def select_activate_backward_triton(dz: torch.Tensor, sel_a: torch.Tensor, sel_b: torch.Tensor | None,
                                    idx: torch.Tensor, width: int, act: str) -> torch.Tensor:
    code = _act_code(act)
    dz, sel_a, idx = rowmajor(dz), rowmajor(sel_a), rowmajor(idx)
    sel_b = rowmajor(sel_b) if sel_b is not None else sel_a
    n, k = idx.shape
    dsrc = torch.zeros(n, _src_width(act, width), dtype=dz.dtype, device=dz.device)
    if n and k:
        _select_activate_backward_kernel[_grid(n, k)](dz, sel_a, sel_b, idx, dsrc, n, k, width, dz.stride(0),
                                                      sel_a.stride(0), idx.stride(0), dsrc.stride(0),
                                                      ACT=code, BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K)
    return dsrc


def _check_mask(mask: torch.Tensor, sel_a: torch.Tensor, width: int) -> None:
    if mask.dtype != torch.int32 or mask.dim() != 2 or mask.shape != (sel_a.shape[0], mask_words(width)):
        raise ValueError(f"mask {mask.dtype} {tuple(mask.shape)}: expected int32 [{sel_a.shape[0]}, "
                         f"{mask_words(width)}] for width {width}")


def scatter_activated_masked_triton(sel_a, sel_b, mask, width: int, act: str,
                                    config: tuple[int, int, int] | None = None) -> torch.Tensor:
    code = _act_code(act)
    _check_mask(mask, sel_a, width)
    sel_a, mask = rowmajor(sel_a), rowmajor(mask)
    sel_b = rowmajor(sel_b) if sel_b is not None else sel_a
    n = sel_a.shape[0]
    z = torch.empty(n, width, dtype=sel_a.dtype, device=sel_a.device)
    if n:
        rows, block_w, warps = config or masked_tile_config(width, act)
        _scatter_activated_masked_kernel[(triton.cdiv(n, rows),)](
            sel_a, sel_b, mask, z, n, width, mask_words(width), sel_a.stride(0), mask.stride(0), z.stride(0),
            ACT=code, ROWS=rows, BLOCK_W=block_w, num_warps=warps)
    return z


def select_activate_backward_masked_triton(dz, sel_a, sel_b, mask, width: int, act: str,
                                           config: tuple[int, int, int] | None = None) -> torch.Tensor:
    code = _act_code(act)
    _check_mask(mask, sel_a, width)
    dz, sel_a, mask = rowmajor(dz), rowmajor(sel_a), rowmajor(mask)
    sel_b = rowmajor(sel_b) if sel_b is not None else sel_a
    n = dz.shape[0]
    dsrc = torch.empty(n, _src_width(act, width), dtype=dz.dtype, device=dz.device)
    if n:
        rows, block_w, warps = config or masked_tile_config(width, act)
        _select_activate_backward_masked_kernel[(triton.cdiv(n, rows),)](
            dz, sel_a, sel_b, mask, dsrc, n, width, mask_words(width), dz.stride(0), sel_a.stride(0),
            mask.stride(0), dsrc.stride(0), ACT=code, ROWS=rows, BLOCK_W=block_w, num_warps=warps)
    return dsrc


# ---------------------------------------------------------------------------------------- dispatch

def select_activate(src, idx, width, act):
    return (select_activate_triton if use_triton(src) else select_activate_reference)(src, idx, width, act)


def scatter_activated(sel_a, sel_b, idx, width, act):
    return (scatter_activated_triton if use_triton(sel_a) else scatter_activated_reference)(sel_a, sel_b, idx, width, act)


def select_activate_backward(dz, sel_a, sel_b, idx, width, act):
    fn = select_activate_backward_triton if use_triton(dz) else select_activate_backward_reference
    return fn(dz, sel_a, sel_b, idx, width, act)


def scatter_activated_masked(sel_a, sel_b, mask, width, act):
    fn = scatter_activated_masked_triton if use_triton(sel_a) else scatter_activated_masked_reference
    return fn(sel_a, sel_b, mask, width, act)


def select_activate_backward_masked(dz, sel_a, sel_b, mask, width, act):
    fn = select_activate_backward_masked_triton if use_triton(dz) else select_activate_backward_masked_reference
    return fn(dz, sel_a, sel_b, mask, width, act)
