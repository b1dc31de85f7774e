"""LM head + cross-entropy, vocab-parallel, without fp32 logits: two Triton kernels (per-row
statistics; the logits' gradient written in place) beside their plain-torch references, and the
autograd function that runs them around the LM-head GEMMs.

megatron's stock loss takes the LM head's logits [T, V/tp] (activation dtype), makes an fp32 copy,
subtracts the max, exponentiates and normalises it in place and keeps that fp32 softmax for the
backward: 4 bytes per logit kept, 2 more in flight, about ten fp32 passes. Here:

* forward: logits = hidden @ W^T (the same GEMM), then one kernel reads each row once and writes its
  log-sum-exp and its target logit (fp32, one number per token each);
* backward: one kernel turns the logits into their gradient ``(softmax - onehot) * dloss`` in place
  (in the activation dtype, which is what the stock path casts its fp32 gradient to before the
  GEMMs), then dhidden = dlogits @ W and dW = dlogits^T @ hidden (the same GEMMs).

Memory: by default the logits (2 bytes per logit in bf16) are kept from forward to backward. With
``chunk_tokens`` the logits are computed ``chunk_tokens`` tokens at a time and recomputed in the
backward, so no [T, V] tensor ever exists (one more LM-head GEMM; worth it only when memory binds).

Tensor parallelism (vocab-parallel LM head): each rank holds logits for its vocab slice
``[vocab_start, vocab_start + V/tp)``. The per-row log-sum-exp is combined over the TP group (an
all-reduce MAX of the local log-sum-exps, then an all-reduce SUM of the rescaled sums and of the
target logit, which only the rank owning the label has); the gradient needs only the global
log-sum-exp. Labels outside [0, vocab) contribute a target logit of 0, as in megatron's stock path.
"""

import functools

import torch
import torch.distributed as dist

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton keep the reference path
    triton = None

_BLOCK_V = 4096


# ---------------------------------------------------------------------------------------- references

def cross_entropy_stats_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` [T, V]: (log-sum-exp, logit of the label or 0 when the label is outside
    [0, V)), both fp32 [T]. ``labels`` are local to this vocab slice."""
    lf = logits.float()
    vocab = lf.shape[-1]
    inside = (labels >= 0) & (labels < vocab)
    target = lf.gather(-1, torch.where(inside, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(lf, dim=-1), torch.where(inside, target, torch.zeros((), dtype=lf.dtype, device=lf.device))


def cross_entropy_grad_reference(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                                 grad: torch.Tensor) -> torch.Tensor:
    """d loss / d logits = (softmax - onehot(label)) * dloss per row, in the logits' dtype."""
    lf = logits.float()
    vocab = lf.shape[-1]
    inside = (labels >= 0) & (labels < vocab)
    d = torch.exp(lf - lse.unsqueeze(-1)) * grad.unsqueeze(-1)
    onehot = torch.zeros_like(d).scatter_(-1, torch.where(inside, labels, 0).unsqueeze(-1),
                                          inside.to(d.dtype).unsqueeze(-1))
    return (d - onehot * grad.unsqueeze(-1)).to(logits.dtype)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss of ``hidden`` [T, h] through the LM head ``weight`` [V, h] (TP = 1): logits in the
    activation dtype, loss in fp32 (megatron's stock semantics), by plain autograd."""
    lse, target = cross_entropy_stats_reference(hidden @ weight.t(), labels)
    return lse - target


# ---------------------------------------------------------------------------------------- triton

@functools.cache
def _kernels():
    """The Triton kernels, decorated on first use (Triton reads TRITON_INTERPRET at decoration)."""

    @triton.jit
    def stats(logits_ptr, labels_ptr, lse_ptr, target_ptr, row_stride, vocab, vocab_start, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        cols = tl.arange(0, BLOCK)
        # Online log-sum-exp over blocks of the row: one read of every logit.
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        s = tl.sum(tl.exp(x - m), axis=0)
        for start in range(BLOCK, vocab, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        tl.store(lse_ptr + row, m + tl.log(s))
        label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
        inside = (label >= 0) & (label < vocab)
        target = tl.load(base + tl.where(inside, label, 0)).to(tl.float32)
        tl.store(target_ptr + row, tl.where(inside, target, 0.0))

    @triton.jit
    def grad_in_place(logits_ptr, labels_ptr, lse_ptr, grad_ptr, row_stride, vocab, vocab_start,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        lse = tl.load(lse_ptr + row)
        g = tl.load(grad_ptr + row)
        label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            d = tl.exp(x - lse) * g
            d = tl.where(cols == label, d - g, d)
            tl.store(base + cols, d.to(logits_ptr.dtype.element_ty), mask=mask)

    return stats, grad_in_place


def _check_rows(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"cross-entropy kernels take row-major [tokens, vocab] logits, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}")


def cross_entropy_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
                        use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit) per row, fp32; ``labels`` global, this slice starting at ``vocab_start``."""
    _check_rows(logits, labels)
    if use_triton is None:
        use_triton = logits.is_cuda
    if not use_triton:
        return cross_entropy_stats_reference(logits, labels - vocab_start)
    rows, vocab = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        stats_kernel, _ = _kernels()
        stats_kernel[(rows,)](logits, labels.contiguous(), lse, target, logits.stride(0), vocab, vocab_start,
                              BLOCK=_BLOCK_V, num_warps=8)
    return lse, target


def cross_entropy_grad_(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, grad: torch.Tensor,
                        vocab_start: int = 0, use_triton: bool | None = None) -> torch.Tensor:
    """Overwrite ``logits`` with d loss / d logits = (softmax - onehot) * grad (rows: tokens); returns it."""
    _check_rows(logits, labels)
    if use_triton is None:
        use_triton = logits.is_cuda
    if not use_triton:
        return logits.copy_(cross_entropy_grad_reference(logits, lse, labels - vocab_start, grad))
    rows, vocab = logits.shape
    if rows:
        _, grad_kernel = _kernels()
        grad_kernel[(rows,)](logits, labels.contiguous(), lse.contiguous(), grad.float().contiguous(),
                             logits.stride(0), vocab, vocab_start, BLOCK=_BLOCK_V, num_warps=8)
    # A kernel's write is invisible to autograd's version counter; make it count as the in-place op it is.
    torch.autograd.graph.increment_version(logits)
    return logits


# ---------------------------------------------------------------------------------------- LM head + loss

def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def combine_over_tp(lse_local: torch.Tensor, target_local: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The global log-sum-exp and target logit from every rank's vocab-slice statistics."""
    if _tp_size(group) == 1:
        return lse_local, target_local
    lse_max = lse_local.clone()
    dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(lse_local - lse_max), target_local])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return lse_max + torch.log(sums[0]), sums[1]


def _chunks(tokens: int, chunk_tokens: int | None) -> list[tuple[int, int]]:
    if chunk_tokens is None or chunk_tokens >= tokens:
        return [(0, tokens)]
    return [(a, min(a + chunk_tokens, tokens)) for a in range(0, tokens, chunk_tokens)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start, chunk_tokens, use_triton):
        tokens = hidden.shape[0]
        chunks = _chunks(tokens, chunk_tokens)
        lse_local = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        target_local = torch.empty_like(lse_local)
        logits = None
        for a, b in chunks:
            logits = torch.matmul(hidden[a:b], weight.t())
            lse_local[a:b], target_local[a:b] = cross_entropy_stats(logits, labels[a:b], vocab_start, use_triton)
        lse, target = combine_over_tp(lse_local, target_local, group)
        keep_logits = len(chunks) == 1
        saved = (hidden, weight, labels, lse) + ((logits,) if keep_logits else ())
        ctx.save_for_backward(*saved)
        ctx.chunks, ctx.vocab_start, ctx.use_triton = chunks, vocab_start, use_triton
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse, *kept = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_loss = grad_loss.float().contiguous()
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = None
        for a, b in ctx.chunks:
            # The kept logits are overwritten by their gradient (no second [T, V] buffer): a second backward
            # through this graph fails in autograd's saved-tensor version check.
            logits = kept[0] if kept else torch.matmul(hidden[a:b], weight.t())
            dlogits = cross_entropy_grad_(logits, lse[a:b], labels[a:b], grad_loss[a:b], ctx.vocab_start,
                                          ctx.use_triton)
            if need_hidden:
                torch.matmul(dlogits, weight, out=grad_hidden[a:b])
            if need_weight:
                part = torch.matmul(dlogits.t(), hidden[a:b])
                if len(ctx.chunks) == 1:
                    grad_weight = part
                elif grad_weight is None:
                    grad_weight = part.float()
                else:
                    grad_weight += part
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, tp_group=None,
                         vocab_start: int = 0, chunk_tokens: int | None = None,
                         use_triton: bool | None = None) -> torch.Tensor:
    """Per-token cross-entropy (fp32 [T]) of ``hidden`` [T, h] through this rank's LM-head slice
    ``weight`` [V/tp, h] (rows ``vocab_start ...``), labels [T] global token ids.

    ``tp_group``: the tensor-parallel group the vocab is split over (None: not split). The caller
    hands in ``hidden`` as the LM head sees it (all-gathered under sequence parallelism) and owns
    the gradient reduction of ``hidden`` over TP (megatron's copy-to / gather-from-sequence-parallel
    region functions do it). ``chunk_tokens``: see the module docstring. ``use_triton`` defaults to
    ``hidden.is_cuda``; it only chooses how the statistics and the logits' gradient are computed.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [tokens, h] and [vocab slice, h]")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens = {chunk_tokens}; use a positive count or None")
    if use_triton is None:
        use_triton = hidden.is_cuda
    if use_triton and triton is None:
        raise RuntimeError("linear_cross_entropy(use_triton=True) needs the triton package")
    return _LinearCrossEntropy.apply(hidden, weight, labels.reshape(-1), tp_group, vocab_start, chunk_tokens,
                                     use_triton)
