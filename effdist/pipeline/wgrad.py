"""Linear layers whose weight-gradient GEMM can be deferred: the B/W split of zero-bubble schedules.

A linear layer's backward does two GEMMs: the input gradient ``dX = dY @ W`` (needed at once by the previous
layer and, through P2P, by the previous pipeline stage) and the weight gradient ``dW = dY^T @ X`` (needed only by
the optimizer). Zero-bubble schedules run the first in their B action and the second later, in W, to fill bubbles.

megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` computes both inside one autograd Function, so
autograd's generic input/weight split would run the weight GEMM twice. `SplitColumnParallelLinear` and
`SplitRowParallelLinear` are megatron's Column/RowParallelLinear with their matmul replaced by
`_LinearWithDeferrableWgrad`: the same forward and input-gradient arithmetic (same ops, same order, so the result
is bit-identical for any TP size, with or without sequence parallelism), and a weight gradient that is either

* computed at once and returned through autograd, exactly like megatron (no `WeightGradStore.deferring` block is
  open: pp=1 training, BW actions of 1F1B / interleaved), or
* queued in `WEIGHT_GRAD_STORE` under the (chunk, microbatch) key of the open `deferring` block (a B action) and
  computed by `WeightGradStore.run(key)` (the W action).

Where a deferred gradient goes. megatron DDP accumulates ``param.grad`` into ``param.main_grad`` in a hook on the
parameter's grad accumulator. A deferred gradient never passes through autograd, so W adds it to
``param.main_grad`` itself -- the very ``main_grad.add_(grad)`` the hook would do, so the sum is bit-identical --
and to ``param.grad`` when there is no DDP wrapper. This keeps DDP's bookkeeping consistent only when DDP does not
overlap its gradient reduction with backward (``overlap_grad_reduce=False``, what effdist uses): with overlap on,
DDP would reduce a bucket before its W ran; the executor refuses that combination.

Everything else (norm weights, embedding, output layer, biases) gets its gradient during B through autograd.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.utils import get_tensor_model_parallel_group_if_none, prepare_input_tensors_for_wgrad_compute

from effdist.model.spec import LinearImpl
from effdist.runtime.distributed import all_gather_single, reduce_scatter_single


class WeightGradError(RuntimeError):
    """Deferred weight gradients were left over, run twice, or queued without a key."""


class WeightGradStore:
    """Deferred weight-gradient GEMMs, grouped by a key (the executor uses (chunk, microbatch)).

    The store is process-global (autograd may run backward functions on a device thread, so thread-local state
    would not be seen there). `on_defer(key, tensors)` is called with the tensors a queued GEMM keeps alive beyond
    B (its input and output gradient), so memory accounting can count them.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, list[Callable[[], None]]] = {}
        self._key: Optional[Hashable] = None
        self.on_defer: Optional[Callable[[Hashable, tuple[torch.Tensor, ...]], None]] = None

    @contextlib.contextmanager
    def deferring(self, key: Hashable) -> Iterator[None]:
        """Within this block, split linears queue their weight GEMM under `key` instead of running it."""
        if self._key is not None:
            raise WeightGradError(f"deferring({key!r}) opened inside deferring({self._key!r}); B actions do not nest")
        self._key = key
        try:
            yield
        finally:
            self._key = None

    @property
    def is_deferring(self) -> bool:
        return self._key is not None

    def put(self, work: Callable[[], None], held: tuple[torch.Tensor, ...] = ()) -> None:
        if self._key is None:
            raise WeightGradError("a weight gradient was queued outside a deferring() block")
        self._pending.setdefault(self._key, []).append(work)
        if self.on_defer is not None and held:
            self.on_defer(self._key, held)

    def run(self, key: Hashable) -> int:
        """Run (and forget) every GEMM queued under `key`, in the order they were queued; returns how many."""
        works = self._pending.pop(key, None)
        if works is None:
            raise WeightGradError(f"W for {key!r}: nothing was queued under this key (its B did not run, ran as a fused "
                                  "BW, or its W already ran)")
        with torch.no_grad():  # as inside autograd's backward
            for work in works:
                work()
        return len(works)

    def has(self, key: Hashable) -> bool:
        return key in self._pending

    def pending_keys(self) -> list[Hashable]:
        return list(self._pending)

    def clear(self) -> None:
        """Drop everything queued (after a failed step)."""
        self._pending.clear()
        self._key = None


WEIGHT_GRAD_STORE = WeightGradStore()


@dataclass(frozen=True)
class _ManualTarget:
    """Where a weight gradient computed outside autograd is added: the parameter, or some rows of it."""

    param: torch.nn.Parameter
    rows: Optional[torch.Tensor] = None  # row indices into param (forward_rows), or None for the whole weight

    def accumulate(self, grad: torch.Tensor) -> None:
        main_grad = getattr(self.param, "main_grad", None)
        with torch.no_grad():
            if main_grad is not None:
                # What megatron DDP's grad-accumulator hook does with param.grad: main_grad.add_(grad).
                if self.rows is None:
                    main_grad.add_(grad)
                else:
                    main_grad.index_add_(0, self.rows, grad.to(main_grad.dtype))
                return
            if self.rows is not None:
                full = torch.zeros_like(self.param)
                full.index_add_(0, self.rows, grad.to(full.dtype))
                grad = full
            if self.param.grad is None:
                self.param.grad = torch.zeros_like(self.param)
            self.param.grad.add_(grad)


def _gather_sequence(input_: torch.Tensor, tp_group) -> torch.Tensor:
    """All-gather along the sequence dimension (what megatron does for sequence-parallel linears)."""
    size = list(input_.size())
    size[0] *= tp_group.size()
    out = torch.empty(size, dtype=input_.dtype, device=input_.device)
    all_gather_single(out, input_.contiguous(), group=tp_group)
    return out


def _weight_grad(input_: torch.Tensor, grad_output: torch.Tensor, sequence_parallel: bool, tp_group,
                 fp8=None) -> torch.Tensor:
    total_input = _gather_sequence(input_, tp_group) if sequence_parallel else input_
    grad_output, total_input = prepare_input_tensors_for_wgrad_compute(grad_output, total_input)
    if fp8 is not None:
        return fp8.grad_weight(grad_output, total_input)
    return grad_output.t().matmul(total_input)


class _LinearWithDeferrableWgrad(torch.autograd.Function):
    """megatron's linear Function (non-fused path) with a weight gradient that can wait for the W action.

    `target` is None when the weight gradient may flow through autograd (the weight is the layer's own parameter
    and no fused accumulation was requested); then an immediate gradient is returned like megatron's. Otherwise
    it is a `_ManualTarget` and the gradient is always added there directly.

    `fp8`: an `effdist.model.fp8.Fp8Gemm` (train.precision=fp8) runs the three GEMMs, one at a time, with the
    casts torchao's fused FP8 backward would use (the same numbers: tests/test_fp8.py); None: the dtype's matmuls.
    """

    @staticmethod
    def forward(ctx, input_, weight, bias, target, deferrable, allreduce_dgrad, sequence_parallel, tp_group,
                param=None, fp8=None):
        # `param`: the parameter a row-subset `weight` was taken from; an input only so that the output requires
        # grad when the parameter does (its gradient is accumulated by `target`, never returned).
        ctx.save_for_backward(input_, weight)
        ctx.use_bias = bias is not None
        ctx.target = target
        # The parameter object itself: what ctx.saved_tensors gives back may be an alias without main_grad.
        ctx.deferred_target = target if target is not None else (_ManualTarget(weight) if deferrable else None)
        ctx.allreduce_dgrad = allreduce_dgrad
        ctx.sequence_parallel = sequence_parallel
        ctx.tp_group = tp_group
        ctx.fp8 = fp8
        total_input = _gather_sequence(input_, tp_group) if sequence_parallel else input_
        output = fp8.output(total_input, weight) if fp8 is not None else torch.matmul(total_input, weight.t())
        if bias is not None:
            output = output + bias
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        tp_group = ctx.tp_group
        store = WEIGHT_GRAD_STORE
        defer = ctx.deferred_target is not None and store.is_deferring

        fp8 = ctx.fp8
        grad_input = fp8.grad_input(grad_output, weight) if fp8 is not None else grad_output.matmul(weight)
        handle = None
        if ctx.allreduce_dgrad:
            handle = dist.all_reduce(grad_input, group=tp_group, async_op=True)
        if ctx.sequence_parallel:
            sub_grad_input = torch.empty(list(input_.size()), dtype=input_.dtype, device=input_.device)
            handle = reduce_scatter_single(sub_grad_input, grad_input, group=tp_group, async_op=True)

        grad_weight = None
        if defer:
            target = ctx.deferred_target
            sequence_parallel = ctx.sequence_parallel

            def work(input_=input_, grad_output=grad_output):
                target.accumulate(_weight_grad(input_, grad_output, sequence_parallel, tp_group, fp8))

            # What the queued GEMM keeps alive until W: the output gradient, and the input (already counted as
            # saved by the forward, unless full recompute re-created it during this backward).
            store.put(work, held=(grad_output, input_))
        elif ctx.target is not None:
            ctx.target.accumulate(_weight_grad(input_, grad_output, ctx.sequence_parallel, tp_group, fp8))
        elif ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(input_, grad_output, ctx.sequence_parallel, tp_group, fp8)

        grad_bias = None
        if ctx.use_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(dim=0)
        if handle is not None:
            handle.wait()
        if ctx.sequence_parallel:
            grad_input = sub_grad_input
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _fp8_gemm(layer):
    """The layer's FP8 GEMMs (train.precision=fp8: build_gpt puts an Fp8Gemm on the TransformerConfig), or None."""
    return getattr(layer.config, "effdist_fp8_gemm", None)


def _is_own_leaf(layer: torch.nn.Module, weight: torch.Tensor) -> bool:
    return weight is getattr(layer, "weight", None) and weight.is_leaf


def _split_forward_impl(layer, parent_impl, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                        sequence_parallel, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, **rest):
    if not weight.requires_grad or grad_output_buffer is not None or rest:
        # Frozen weights and megatron's embedding-wgrad deferral keep megatron's own Function.
        return parent_impl(input=input, weight=weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                           allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                           grad_output_buffer=grad_output_buffer, wgrad_deferral_limit=wgrad_deferral_limit,
                           tp_group=tp_group, **rest)
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    own = _is_own_leaf(layer, weight)
    # A weight computed from something else (not a leaf parameter) must get its gradient through autograd now.
    deferrable = own
    target = _ManualTarget(weight) if own and gradient_accumulation_fusion else None
    return _LinearWithDeferrableWgrad.apply(input, weight, bias, target, deferrable, allreduce_dgrad,
                                            sequence_parallel, tp_group, None, _fp8_gemm(layer))


class SplitColumnParallelLinear(ColumnParallelLinear):
    """megatron's ColumnParallelLinear whose weight gradient can be deferred to the W action."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _split_forward_impl(self, super()._forward_impl, input, weight, *args, **kwargs)

    def forward_rows(self, input_: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor]):
        """The layer applied with a subset of its output rows, ``rows(weight)`` (EPAS: the V rows of linear_qkv).

        The weight gradient of those rows goes into the same rows of the full weight's gradient (deferred like any
        other), the other rows get none. Returns ``(output, output_bias)`` like forward.
        """
        if self.allreduce_dgrad or self.sequence_parallel or self.explicit_expert_comm or self.disable_grad_reduce:
            input_parallel = input_
        else:
            input_parallel = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        weight_rows = rows(self.weight.detach())
        index = rows(torch.arange(self.weight.shape[0], device=self.weight.device).view(-1, 1)).reshape(-1)
        if index.numel() != weight_rows.shape[0]:
            raise ValueError(f"forward_rows: rows() must select whole rows; it kept {weight_rows.shape[0]} rows of the "
                             f"weight but {index.numel()} row indices")
        bias = None
        if self.bias is not None and not self.skip_bias_add:
            bias = rows(self.bias.unsqueeze(-1)).reshape(-1)
        output = _LinearWithDeferrableWgrad.apply(
            input_parallel, weight_rows, bias, _ManualTarget(self.weight, index) if self.weight.requires_grad else None,
            self.weight.requires_grad, self.allreduce_dgrad,
            False if self.explicit_expert_comm else self.sequence_parallel,
            get_tensor_model_parallel_group_if_none(self.tp_group), self.weight, _fp8_gemm(self))
        if self.gather_output:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        output_bias = rows(self.bias.unsqueeze(-1)).reshape(-1) if self.skip_bias_add and self.bias is not None else None
        return output, output_bias


class SplitRowParallelLinear(RowParallelLinear):
    """megatron's RowParallelLinear whose weight gradient can be deferred to the W action."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _split_forward_impl(self, super()._forward_impl, input, weight, *args, **kwargs)


SPLIT_LINEARS = LinearImpl(column=SplitColumnParallelLinear, row=SplitRowParallelLinear, runs_fp8=True)
