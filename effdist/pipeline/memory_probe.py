"""Measured activation memory of one pipeline rank over time.

What is counted: every tensor autograd saves for backward while an F action runs (a saved-tensor hook), plus
the output gradients a deferred weight-gradient GEMM keeps alive from B until its W (`hold`). A storage is
counted once, when first seen, and uncounted when the last tensor object that was saved (or held) through this
probe dies -- i.e. when B releases the graph (input-gradient part) or W runs (weight-gradient part). Parameters
and buffers of the model are never counted. Tensors are attributed to the (chunk, microbatch) being run.

Two categories, as the simulator and memory_model.py count them:
* ``layers``: saved while megatron's TransformerBlock runs (forward pre/post hooks mark that), except inside its
  final norm -- the decoder layers, and under full recompute the layer inputs its checkpoint function keeps;
* ``other``: embedding, rotary tables, final norm, output layer, loss.

Units. One unit is the activation of one microbatch on one plain 1F1B stage, i.e. the ``layers`` bytes of one
microbatch through the whole model divided by pp. The executor measures that from microbatch 0 of every chunk
(summed over the pipeline ranks). ``b_frees`` is the fraction of a chunk's ``layers`` bytes its B released (the
rest waited for W): the simulator takes it as its `b_frees` argument.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Iterator, Optional

import torch

LAYERS, OTHER = "layers", "other"


@dataclass
class _Storage:
    nbytes: int
    category: str
    owner: Hashable
    live: int = 0


@dataclass
class OwnerStats:
    """Bytes attributed to one (chunk, microbatch): after its forward, and left after its B."""

    forward_bytes: dict[str, int] = field(default_factory=lambda: {LAYERS: 0, OTHER: 0})
    after_b_bytes: Optional[dict[str, int]] = None


class ActivationProbe:
    """Counts the activation bytes one rank holds; see the module docstring."""

    def __init__(self) -> None:
        self._storages: dict[int, _Storage] = {}
        self._level = {LAYERS: 0, OTHER: 0}
        self.peak = {LAYERS: 0, OTHER: 0, "total": 0}
        self.owners: dict[Hashable, OwnerStats] = {}
        self._excluded: set[int] = set()
        self._owner: Optional[Hashable] = None
        self._in_layer = 0
        self._hook_handles: list = []

    # ------------------------------------------------------------------ setup
    def watch(self, modules: Iterable[torch.nn.Module], block_types: tuple[type, ...],
              excluded_child: str = "final_layernorm") -> None:
        """Exclude the modules' parameters and buffers; count what is saved during the forward of each
        `block_types` module as ``layers``, except inside its child named `excluded_child`."""
        modules = list(modules)
        self.exclude_model_state(modules)
        for module in modules:
            for sub in module.modules():
                if isinstance(sub, block_types):
                    self._hook_handles.append(sub.register_forward_pre_hook(self._enter_layer))
                    self._hook_handles.append(sub.register_forward_hook(self._leave_layer))
                    child = getattr(sub, excluded_child, None)
                    if isinstance(child, torch.nn.Module):
                        self._hook_handles.append(child.register_forward_pre_hook(self._leave_layer))
                        self._hook_handles.append(child.register_forward_hook(self._enter_layer))

    def exclude_model_state(self, modules: Iterable[torch.nn.Module]) -> None:
        """Never count the storages of these modules' parameters, buffers and DDP gradient buffers (main_grad).
        Call again when they may have moved (after wrapping in DDP)."""
        excluded = set()
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                excluded.add(t.untyped_storage().data_ptr())
                grad = getattr(t, "main_grad", None)
                if grad is not None:
                    excluded.add(grad.untyped_storage().data_ptr())
        self._excluded = excluded

    def close(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()

    def _enter_layer(self, *_):
        self._in_layer += 1

    def _leave_layer(self, *_):
        self._in_layer -= 1

    # ------------------------------------------------------------------ per step
    def reset(self) -> None:
        """Start a new step: peaks and per-owner statistics restart; tensors still alive keep being counted."""
        self.peak = {LAYERS: self._level[LAYERS], OTHER: self._level[OTHER], "total": self.level_total}
        self.owners = {}

    @property
    def level_total(self) -> int:
        return self._level[LAYERS] + self._level[OTHER]

    def level(self, category: str) -> int:
        return self._level[category]

    def live_storages(self) -> int:
        return len(self._storages)

    # ------------------------------------------------------------------ counting
    @contextlib.contextmanager
    def forward(self, owner: Hashable) -> Iterator[None]:
        """Count what autograd saves while this block runs (the F of `owner`)."""
        self.owners.setdefault(owner, OwnerStats())
        self._owner, self._in_layer = owner, 0
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            self._owner = None

    def after_backward_input(self, owner: Hashable) -> None:
        """Record what is left of `owner` once its B finished (what W still needs)."""
        stats = self.owners.get(owner)
        if stats is not None:
            left = {LAYERS: 0, OTHER: 0}
            for s in self._storages.values():
                if s.owner == owner:
                    left[s.category] += s.nbytes
            stats.after_b_bytes = left

    def hold(self, owner: Hashable, tensors: Iterable[torch.Tensor], category: str = LAYERS) -> None:
        """Count tensors kept for `owner` outside autograd (output gradients waiting for W)."""
        for t in tensors:
            self._register(t, owner, category)

    def _pack(self, tensor: torch.Tensor):
        if self._owner is not None:
            self._register(tensor, self._owner, LAYERS if self._in_layer > 0 else OTHER)
        return tensor

    def _register(self, tensor: torch.Tensor, owner: Hashable, category: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or storage.nbytes() == 0:
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = _Storage(storage.nbytes(), category, owner)
            self._storages[key] = entry
            self._level[category] += entry.nbytes
            stats = self.owners.get(owner)
            if stats is not None and owner == self._owner:
                stats.forward_bytes[category] += entry.nbytes
            self._update_peak()
        entry.live += 1
        weakref.finalize(tensor, self._release, key, entry)

    def _release(self, key: int, entry: _Storage) -> None:
        entry.live -= 1
        if entry.live == 0 and self._storages.get(key) is entry:
            del self._storages[key]
            self._level[entry.category] -= entry.nbytes

    def _update_peak(self) -> None:
        for c in (LAYERS, OTHER):
            self.peak[c] = max(self.peak[c], self._level[c])
        self.peak["total"] = max(self.peak["total"], self.level_total)

    # ------------------------------------------------------------------ summaries
    def layer_bytes_of(self, owner: Hashable) -> int:
        stats = self.owners.get(owner)
        return stats.forward_bytes[LAYERS] if stats else 0

    def b_frees(self) -> Optional[float]:
        """Fraction of the ``layers`` bytes of split-backward owners released by B (None if there were none)."""
        forward = left = 0
        for stats in self.owners.values():
            if stats.after_b_bytes is not None and stats.forward_bytes[LAYERS] > 0:
                forward += stats.forward_bytes[LAYERS]
                left += stats.after_b_bytes[LAYERS]
        if forward == 0 or left > forward:
            # Nothing split, or B created more than it freed (full recompute re-creates layer activations in B,
            # and W keeps them): the simulator's fraction model does not apply.
            return None
        return 1.0 - left / forward


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
