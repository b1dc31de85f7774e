"""The KV cache of one batched generation, allocated once for the whole generation.

A non-sharing (anchor) layer keeps K and V; a sharing layer keeps only V: it attends with its
anchor's keys, so storing its own would duplicate them. Each tensor is ``[batch, kv_heads,
max_len, head_dim]`` and is written in place one slot at a time (no per-step concatenation).

Besides K/V the cache holds the small per-step inputs of a decode step as tensors with fixed
addresses (`tokens`, `positions`, `slot`, `bias`), so that a step can be captured once as a CUDA
graph and replayed: the host only changes what those tensors hold.

* ``slot``: the cache index the next token is written to (the same for every sequence: prompts
  are left-padded to one length).
* ``positions``: the RoPE position of the next token of each sequence (its count of real tokens so
  far, so left padding does not shift positions).
* ``bias``: additive attention mask over cache slots, 0 for written real tokens, -inf for padding
  and for slots not written yet; a decode step may attend over more slots than are filled (a CUDA
  graph is captured for a fixed length) and the bias hides the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharingPlan:
    """Which layers share Q/K for one generation, and the anchor each one reuses.

    The anchor of a sharing layer is the last non-sharing layer above it; an anchor whose next layer
    shares computes the attention probabilities once for all of its sharing layers in decode.
    """

    num_layers: int
    sharing: frozenset[int]

    def __post_init__(self):
        if 0 in self.sharing:
            raise ValueError("layer 0 cannot share Q/K: it has no layer above it")
        bad = sorted(i for i in self.sharing if not 0 < i < self.num_layers)
        if bad:
            raise ValueError(f"sharing layers {bad} lie outside the model's layers 1..{self.num_layers - 1}")

    @classmethod
    def for_region(cls, num_layers: int, region: int, direction: str = "deep_to_shallow") -> "SharingPlan":
        """The `region` sharing layers of an EPAS model (deepest first, as trained by default)."""
        from effdist.epas.schedule import layers_of_region

        return cls(num_layers, layers_of_region(region, num_layers, direction))

    @classmethod
    def dense(cls, num_layers: int) -> "SharingPlan":
        return cls(num_layers, frozenset())

    @property
    def region(self) -> int:
        return len(self.sharing)

    def shares(self, layer: int) -> bool:
        return layer in self.sharing

    def anchor_of(self, layer: int) -> int:
        while layer in self.sharing:
            layer -= 1
        return layer

    def has_sharers(self, layer: int) -> bool:
        """Layer `layer` is an anchor whose attention probabilities sharing layers reuse."""
        return layer not in self.sharing and (layer + 1) in self.sharing

    @property
    def anchors(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.sharing]


def kv_cache_bytes(plan: SharingPlan, batch: int, length: int, kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes of the K/V tensors for `length` positions: K for the anchor layers, V for every layer."""
    per_tensor = batch * kv_heads * length * head_dim * torch.empty((), dtype=dtype).element_size()
    return per_tensor * (len(plan.anchors) + plan.num_layers)


SLOT_ALIGNMENT = 64


class KVCache:
    """Preallocated K (anchor layers only) and V (every layer) for `batch` sequences of at least
    `max_len` slots (rounded up to a multiple of 64, so that rows of the mask and of K/V start at
    aligned addresses, which fused attention kernels need)."""

    def __init__(self, plan: SharingPlan, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        self.plan = plan
        self.batch, self.max_len = batch, -(-max_len // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        shape = (batch, kv_heads, self.max_len, head_dim)
        # Zero-filled: slots not yet written are masked, but must hold finite numbers (0 x NaN = NaN).
        self.keys: list[torch.Tensor | None] = [
            None if plan.shares(i) else torch.zeros(shape, dtype=dtype, device=self.device)
            for i in range(plan.num_layers)]
        self.values: list[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=self.device)
                                           for _ in range(plan.num_layers)]
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.bias = torch.full((batch, 1, 1, self.max_len), float("-inf"), dtype=dtype, device=self.device)
        # Slots filled so far (host copy of `slot`, to pick how many slots a step attends over).
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the K/V tensors as allocated (max_len slots)."""
        tensors = [t for t in self.keys if t is not None] + self.values
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_for(self, length: int) -> int:
        """Bytes the K/V of `length` slots occupy."""
        return kv_cache_bytes(self.plan, self.batch, length, self.kv_heads, self.head_dim, self.dtype)

    def fits(self, plan: SharingPlan, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.plan == plan and self.batch == batch and self.max_len >= max_len and self.dtype == dtype
                and self.device == torch.device(device))

    def reset(self, prompt_valid: torch.Tensor) -> None:
        """Start a generation whose left-padded prompt has `prompt_valid` [batch, prompt_len] (True = real token)."""
        batch, length = prompt_valid.shape
        if batch != self.batch:
            raise ValueError(f"this cache holds {self.batch} sequences, the prompt batch has {batch}")
        if length >= self.max_len:
            raise ValueError(f"prompt of {length} slots leaves no room in a cache of {self.max_len}")
        self.bias.fill_(float("-inf"))
        self.bias[:, 0, 0, :length].masked_fill_(prompt_valid.to(self.device), 0.0)
        self.positions.copy_(prompt_valid.sum(dim=1))
        self.slot.fill_(length)
        self.length = length

    def advance(self) -> None:
        """After a decode step wrote slot `length`: the next token goes to the next slot and position."""
        self.slot.add_(1)
        self.positions.add_(1)
        self.length += 1
