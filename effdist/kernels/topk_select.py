"""Exact per-row top-k by threshold search, without sorting: the channels a token keeps in MoC / top-k FFNs.

    topk_select(scores [N, W], k) -> (idx [N, k] int32, values [N, k])

idx holds each row's k largest scores' channels in increasing channel order (ties at the k-th value go
to the lower channel), values the scores there. torch.topk over a whole row sorts its way to the
answer (a radix select with several kernel launches, 24 us for one 5632-wide row on an H200, most of
a sparse FFN's decode time); this kernel keeps whole rows in registers and finds the k-th largest
value by bisection over the value's bits (ordered as integers: 16 rounds for bf16, 19 for fp16, 32 for
fp32), each round a count per row; or, for bf16 rows one per program, by two 8-bit radix histograms (the
k-th largest key's high byte, then its low byte: `method="radix"`, 1.4-1.8x slower than the bisection on
an H100). The kept channels are then those above the threshold plus the first ties, compacted to slots
with a prefix sum.
One program handles ROWS rows at once, so that the bisection's reductions of several rows overlap.

Beside the Triton kernel: a torch reference (stable sort), the definition the kernel is tested against.
"""

from __future__ import annotations

import torch

from effdist.kernels._common import HAVE_TRITON, rowmajor, use_triton
from effdist.kernels.channel_select import row_tile_config

if HAVE_TRITON:
    import triton
    import triton.language as tl


def _check(scores: torch.Tensor, k: int) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected [rows, channels]")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k = {k} must lie in [1, {scores.shape[1]}] (the row width)")


def topk_select_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check(scores, k)
    # A stable descending sort keeps equal scores in channel order: ties go to the lower channel.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    idx = order.sort(dim=1).values
    return idx.to(torch.int32), scores.gather(1, idx)


if HAVE_TRITON:
    from effdist.kernels.channel_select import _activate, pack_keep

    @triton.jit
    def _topk_keep(raw, valid, k, KEY_BITS: tl.constexpr, ROWS: tl.constexpr, WAYS: tl.constexpr):
        """Which entries of a [ROWS, BLOCK_W] tile are among their row's k largest (ties to the lower
        column) and each kept entry's slot (its rank in column order among the kept). WAYS 4: the
        threshold search splits its range in four a round (see _four_way_round)."""
        # Order-preserving integer keys: fp32 bits, negatives flipped; the top KEY_BITS bits hold all of a
        # bf16 (16) / fp16 (19) value.
        bits = raw.to(tl.float32).to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) >> (32 - KEY_BITS)
        # Largest t with count(key >= t) >= k, by bisection over [lo, hi] (int64 only for fp32, whose range
        # is 2^32 wide: int64 compares over the whole tile cost twice as much).
        if KEY_BITS == 32:
            lo = tl.full((ROWS,), -(1 << (KEY_BITS - 1)), tl.int64)
            hi = tl.full((ROWS,), (1 << (KEY_BITS - 1)) - 1, tl.int64)
        else:
            lo = tl.full((ROWS,), -(1 << (KEY_BITS - 1)), tl.int32)
            hi = tl.full((ROWS,), (1 << (KEY_BITS - 1)) - 1, tl.int32)
        if WAYS == 4:
            for _ in range((KEY_BITS + 1) // 2):
                lo, hi = _four_way_round(key, valid, k, lo, hi)
        else:
            for _ in range(KEY_BITS):
                mid = lo + (hi - lo + 1) // 2
                count = tl.sum((valid & (key >= mid[:, None])).to(tl.int32), axis=1)
                take = count >= k
                lo = tl.where(take, mid, lo)
                hi = tl.where(take, hi, mid - 1)
        return _keep_from_threshold(key, valid, lo, k)

    @triton.jit
    def _four_way_round(key, valid, k, lo, hi):
        """One round of a four-way search for the largest t in [lo, hi] with count(key >= t) >= k: three
        thresholds split the range into quarters (each at most ceil(span / 4) keys, so KEY_BITS / 2 rounds end
        it), and their three counts go through ONE row reduction, packed 21 bits apart in an int64 (a row holds
        fewer than 2^21 entries). The bisection's cost is its KEY_BITS reductions across the program's warps,
        not its compares: this halves them for three times the compares."""
        span = hi - lo + 1
        t1 = lo + (span + 3) // 4
        t2 = lo + (2 * span + 3) // 4
        t3 = lo + (3 * span + 3) // 4
        packed = ((valid & (key >= t1[:, None])).to(tl.int64)
                  + ((valid & (key >= t2[:, None])).to(tl.int64) << 21)
                  + ((valid & (key >= t3[:, None])).to(tl.int64) << 42))
        total = tl.sum(packed, axis=1)
        c1 = total & 0x1FFFFF
        c2 = (total >> 21) & 0x1FFFFF
        c3 = total >> 42
        new_lo = tl.where(c3 >= k, t3, tl.where(c2 >= k, t2, tl.where(c1 >= k, t1, lo)))
        new_hi = tl.where(c3 >= k, hi, tl.where(c2 >= k, t3 - 1, tl.where(c1 >= k, t2 - 1, t1 - 1)))
        return new_lo.to(lo.dtype), new_hi.to(hi.dtype)

    @triton.jit
    def _keep_from_threshold(key, valid, lo, k):
        """The entries above the row's threshold `lo` plus the first ties, and their slots."""
        greater = valid & (key > lo[:, None])
        need = k - tl.sum(greater.to(tl.int32), axis=1)
        tie = valid & (key == lo[:, None])
        keep = greater | (tie & (tl.cumsum(tie.to(tl.int32), axis=1) <= need[:, None]))
        slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1
        return keep, slot

    @triton.jit
    def _digit_threshold(digit, member, need):
        """Over the entries of one row that are `member`s, the largest 8-bit digit d with count(digit >= d) >=
        need, and the count of members whose digit is above it. One histogram instead of 8 bisection rounds."""
        bins = tl.arange(0, 256)
        # Entries that are not members count in bin 0 and are taken off again (no histogram mask needed).
        hist = tl.histogram(tl.where(member, digit, 0), 256)
        hist = hist - tl.where(bins == 0, tl.sum((~member).to(tl.int32)), 0)
        at_or_above = tl.sum(hist) - tl.cumsum(hist) + hist  # count(digit >= b) for every bin b
        d = tl.sum((at_or_above >= need).to(tl.int32)) - 1
        above = tl.sum(tl.where(bins > d, hist, 0))
        return d, above

    @triton.jit
    def _topk_keep_radix(raw, valid, k, BLOCK_W: tl.constexpr):
        """_topk_keep for one bf16 row ([1, BLOCK_W]) by two 8-bit radix histograms: the k-th largest key's high
        byte, then its low byte among the keys with that high byte."""
        bits = raw.to(tl.float32).to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) >> 16
        u = tl.reshape(key + 32768, (BLOCK_W,))  # 0 .. 65535, in the same order
        ok = tl.reshape(valid, (BLOCK_W,))
        high, above = _digit_threshold(u >> 8, ok, k)
        low, _ = _digit_threshold(u & 255, ok & ((u >> 8) == high), k - above)
        lo = tl.zeros((1,), tl.int32) + (high * 256 + low - 32768)  # the row's threshold key, as a [ROWS] vector
        return _keep_from_threshold(key, valid, lo, k)

    @triton.jit
    def _topk_select_kernel(s_ptr, idx_ptr, val_ptr, n_rows, width, k, stride_s, stride_idx, stride_val,
                            KEY_BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr, RADIX: tl.constexpr,
                            WAYS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_W)
        valid = (rows < n_rows)[:, None] & (cols < width)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        raw = tl.load(s_ptr + r64 * stride_s + cols[None, :], mask=valid, other=0.0)
        if RADIX:
            keep, slot = _topk_keep_radix(raw, valid, k, BLOCK_W)
        else:
            keep, slot = _topk_keep(raw, valid, k, KEY_BITS, ROWS, WAYS)
        tl.store(idx_ptr + r64 * stride_idx + slot, (cols[None, :] + tl.zeros_like(slot)).to(idx_ptr.dtype.element_ty),
                 mask=keep)
        tl.store(val_ptr + r64 * stride_val + slot, raw, mask=keep)

    @triton.jit
    def _topk_select_activate_kernel(src_ptr, z_ptr, a_ptr, b_ptr, idx_ptr, n_rows, width, k,
                                     stride_src, stride_z, stride_sel, stride_idx,
                                     ACT: tl.constexpr, KEY_BITS: tl.constexpr, ROWS: tl.constexpr,
                                     BLOCK_W: tl.constexpr, RADIX: tl.constexpr, MASK: tl.constexpr,
                                     WAYS: tl.constexpr):
        """MASK: idx_ptr receives the selection as bit-mask words (effdist.kernels.channel_select) instead of
        channel indices."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_W)
        valid = (rows < n_rows)[:, None] & (cols < width)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        a = tl.load(src_ptr + r64 * stride_src + cols[None, :], mask=valid, other=0.0)
        if RADIX:
            keep, slot = _topk_keep_radix(a, valid, k, BLOCK_W)
        else:
            keep, slot = _topk_keep(a, valid, k, KEY_BITS, ROWS, WAYS)
        b = a
        if ACT == 0:  # swiglu: the up half of the row, read whole (it is contiguous; the gathers were not)
            b = tl.load(src_ptr + r64 * stride_src + width + cols[None, :], mask=valid, other=0.0)
            tl.store(b_ptr + r64 * stride_sel + slot, b, mask=keep)
        tl.store(a_ptr + r64 * stride_sel + slot, a, mask=keep)
        if MASK:
            words_at = tl.arange(0, BLOCK_W // 32)
            tl.store(idx_ptr + r64 * stride_idx + words_at[None, :], pack_keep(keep, ROWS, BLOCK_W),
                     mask=(rows < n_rows)[:, None] & (words_at * 32 < width)[None, :])
        else:
            tl.store(idx_ptr + r64 * stride_idx + slot,
                     (cols[None, :] + tl.zeros_like(slot)).to(idx_ptr.dtype.element_ty), mask=keep)
        # The dense activation in one pass: zeros off the kept channels (no separate memset).
        z = tl.where(keep, _activate(a.to(tl.float32), b.to(tl.float32), ACT), 0.0)
        tl.store(z_ptr + r64 * stride_z + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=valid)


_KEY_BITS = {torch.bfloat16: 16, torch.float16: 19, torch.float32: 32}

# How the threshold is found: "bisect" (KEY_BITS rounds of a count per row), "radix" (two 8-bit histograms;
# bf16 rows, one row per program: 1.4-1.8x slower than bisection on an H100) or "bisect4" (KEY_BITS / 2 rounds of
# three counts in one reduction; `ffn.select_method: bisect4`, not yet timed: tools/gpu_h100_suite.sh select4).
# All three select the same channels.
SELECT_METHODS = ("bisect", "radix", "bisect4")
DEFAULT_SELECT_METHOD = "bisect"


def _ways(method: str | None) -> int:
    """Ranges per round of the threshold search: 4 for "bisect4", else 2 (unused by radix)."""
    return 4 if method == "bisect4" else 2


def _use_radix(method: str | None, dtype: torch.dtype, rows_per_program: int) -> bool:
    method = method or DEFAULT_SELECT_METHOD
    if method not in SELECT_METHODS:
        raise ValueError(f"method = {method!r}: choose one of {', '.join(SELECT_METHODS)}")
    if method == "radix" and (dtype != torch.bfloat16 or rows_per_program != 1):
        raise ValueError(f"method = 'radix' takes bf16 rows one per program, not {dtype} with {rows_per_program} "
                         "rows per program; use method='bisect'")
    return method == "radix"


def topk_select_config(rows: int, width: int, method: str = "bisect") -> tuple[int, int, int]:
    """(ROWS, BLOCK_W, num_warps): one row per program with many warps when there are few rows
    (decode), several rows per program otherwise (training), about 32 row elements per thread. The radix
    search takes one row per program (its histograms are a row's): in training about 64 row elements per
    thread, as the bisection's best, until tools/bench_topk_select.py has swept it on a GPU."""
    block_w = triton.next_power_of_2(width)
    if rows <= 256:
        return 1, block_w, max(4, min(16, block_w // 512))
    if method == "radix":
        return 1, block_w, max(1, min(16, block_w // 2048))
    # Training: about 64 row elements per thread, two rows per program up to 4096 wide (the layout of the masked
    # kernels of channel_select too). On an H100 (tools/bench_topk_select.py, 16k rows) this took MoC's 350m
    # select+activate from 0.88 to 0.64 ms, top-k's from 0.82 to 0.55 ms and MoC's 1b from 1.62 to 1.28 ms against
    # the earlier 32 per thread.
    return row_tile_config(rows, width)


def _launch(rows: int, width: int, dtype: torch.dtype, method: str) -> tuple[tuple[int, int, int], str]:
    """(launch configuration, method) of a dispatched call: radix where asked for and the rows are bf16, else
    bisection (four-way where asked for)."""
    if method not in ("radix", "bisect4") or (method == "radix" and dtype != torch.bfloat16):
        method = "bisect"
    return topk_select_config(rows, width, method), method


def topk_select_triton(scores: torch.Tensor, k: int, config: tuple[int, int, int] | None = None,
                       method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed; use topk_select_reference")
    _check(scores, k)
    if scores.dtype not in _KEY_BITS:
        raise ValueError(f"topk_select_triton takes bf16/fp16/fp32 scores, not {scores.dtype}")
    scores = rowmajor(scores)
    rows, width = scores.shape
    idx = torch.empty(rows, k, dtype=torch.int32, device=scores.device)
    values = torch.empty(rows, k, dtype=scores.dtype, device=scores.device)
    if rows:
        per_program, block_w, warps = config or topk_select_config(rows, width)
        radix = _use_radix(method, scores.dtype, per_program)
        _topk_select_kernel[(triton.cdiv(rows, per_program),)](
            scores, idx, values, rows, width, k, scores.stride(0), idx.stride(0), values.stride(0),
            KEY_BITS=_KEY_BITS[scores.dtype], ROWS=per_program, BLOCK_W=block_w, RADIX=radix, WAYS=_ways(method),
            num_warps=warps)
    return idx, values


def topk_select(scores: torch.Tensor, k: int, method: str = "bisect") -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA tensors (bf16/fp16/fp32), the torch reference elsewhere (see the module doc); `method`
    "radix" for bf16 (with its own launch configuration), bisection otherwise: the same channels."""
    if use_triton(scores) and scores.dtype in _KEY_BITS:
        return topk_select_triton(scores, k, *_launch(scores.shape[0], scores.shape[1], scores.dtype, method))
    return topk_select_reference(scores, k)


# ---------------------------------------------------------------------------------------- fused with the activation

def topk_select_activate_reference(src: torch.Tensor, k: int, width: int, act: str,
                                   idx_dtype: torch.dtype = torch.int32, as_mask: bool = False):
    """effdist.kernels.channel_select.select_activate at the top-k channels of src's first `width`
    columns (the gate for "swiglu", the pre-activation otherwise): (z [N, W], sel_a, sel_b | None, idx).
    With `as_mask` the last is the selection as bit-mask words (channel_select.pack_mask_reference)."""
    from effdist.kernels.channel_select import pack_mask_reference, select_activate_reference

    idx, _ = topk_select_reference(src[:, :width], k)
    z, a, b = select_activate_reference(src, idx, width, act)
    if as_mask:
        keep = torch.zeros(src.shape[0], width, dtype=torch.bool, device=src.device).scatter_(1, idx.long(), True)
        return z, a, b, pack_mask_reference(keep)
    return z, a, b, idx.to(idx_dtype)


def topk_select_activate_triton(src: torch.Tensor, k: int, width: int, act: str,
                                idx_dtype: torch.dtype = torch.int32, config: tuple[int, int, int] | None = None,
                                method: str | None = None, as_mask: bool = False):
    from effdist.kernels.channel_select import _act_code, _src_width, mask_words

    code = _act_code(act)
    if src.dim() != 2 or src.shape[1] != _src_width(act, width):
        raise ValueError(f"src has shape {tuple(src.shape)}, expected [rows, {_src_width(act, width)}] for {act}")
    _check(src[:, :width], k)
    src = rowmajor(src)
    n = src.shape[0]
    z = torch.empty(n, width, dtype=src.dtype, device=src.device)
    a = torch.empty(n, k, dtype=src.dtype, device=src.device)
    b = torch.empty(n, k, dtype=src.dtype, device=src.device) if act == "swiglu" else None
    if as_mask:
        idx = torch.empty(n, mask_words(width), dtype=torch.int32, device=src.device)
    else:
        idx = torch.empty(n, k, dtype=idx_dtype, device=src.device)
    if n:
        per_program, block_w, warps = config or topk_select_config(n, width)
        radix = _use_radix(method, src.dtype, per_program)
        _topk_select_activate_kernel[(triton.cdiv(n, per_program),)](
            src, z, a, b if b is not None else a, idx, n, width, k, src.stride(0), z.stride(0), a.stride(0),
            idx.stride(0), ACT=code, KEY_BITS=_KEY_BITS[src.dtype], ROWS=per_program,
            BLOCK_W=max(block_w, 32) if as_mask else block_w, RADIX=radix, MASK=as_mask, WAYS=_ways(method),
            num_warps=warps)
    return z, a, b, idx


def topk_select_activate(src: torch.Tensor, k: int, width: int, act: str, idx_dtype: torch.dtype = torch.int32,
                         method: str = "bisect", as_mask: bool = False):
    """Top-k selection and select_activate in one kernel on CUDA (bf16/fp16/fp32); the references elsewhere.
    `method` "radix" for bf16 (with its own launch configuration), bisection otherwise: the same channels.
    `as_mask`: the selection comes back as bit-mask words (effdist.kernels.channel_select) instead of indices."""
    if use_triton(src) and src.dtype in _KEY_BITS:
        return topk_select_activate_triton(src, k, width, act, idx_dtype,
                                           *_launch(src.shape[0], width, src.dtype, method), as_mask=as_mask)
    return topk_select_activate_reference(src, k, width, act, idx_dtype, as_mask)
