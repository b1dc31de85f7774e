"""Keep a dense activation out of the autograd graph when a compact form of it is already saved.

A sparse FFN hands its down projection (a megatron RowParallelLinear, or whatever linear class the
pipeline executor substitutes) a dense intermediate Z, and that linear saves Z for its weight
gradient. When Z is a cheap function of tensors the FFN saves anyway (the K selected values and
their indices, or the 2:4-compressed activation), storing Z as well would undo the memory saving.
`save_compactly` intercepts exactly that one saved tensor and stores a recipe instead: the compact
tensors (passed through any saved-tensor hooks already active outside, e.g. an activation
offloader or a memory probe) and a function that rebuilds Z from them when backward needs it.
Every other saved tensor passes through unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch


def _outer_hooks():
    """The saved-tensor hooks active before ours (only the innermost pair runs, so we chain them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return None
    try:
        return top(False)
    except TypeError:  # older signature without the tracing flag
        return top()


class _Compact:
    __slots__ = ("parts", "rebuild")

    def __init__(self, parts, rebuild):
        self.parts = parts
        self.rebuild = rebuild


class _Plain:
    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


def _identity(t: torch.Tensor) -> tuple:
    """What tells a saved tensor is `target` itself (or an identical view of it), without holding it."""
    return (t.device, t.dtype, tuple(t.shape), t.stride(), t.data_ptr())


@contextlib.contextmanager
def save_compactly(target: torch.Tensor, parts: Sequence[torch.Tensor],
                   rebuild: Callable[[Sequence[torch.Tensor]], torch.Tensor]):
    """Within the block, an op that saves `target` for backward saves `parts` instead and gets
    `rebuild(parts)` back in backward. `rebuild` must return a tensor equal to `target`."""
    outer = _outer_hooks()
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    # Every tensor saved in the block keeps a reference to `pack` (autograd stores the hook pair with it) until
    # backward frees it: `pack` must not hold `target`, or the dense tensor it replaces lives as long as the graph.
    wanted = _identity(target)
    del target

    def pack(t: torch.Tensor):
        if _identity(t) == wanted:
            stored = tuple(outer_pack(p) if outer_pack else p for p in parts)
            return _Compact(stored, rebuild)
        if outer_pack:
            return _Plain(outer_pack(t))
        # A saved non-leaf that holds its own grad_fn would make a reference cycle: keep its data
        # only. Leaves (parameters) stay as they are: linears set attributes on them in backward.
        return _Plain(t if t.grad_fn is None else t.detach())

    def unpack(obj):
        if isinstance(obj, _Compact):
            restored = [outer_unpack(p) if outer_unpack else p for p in obj.parts]
            return obj.rebuild(restored)
        return outer_unpack(obj.packed) if outer_unpack else obj.packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
