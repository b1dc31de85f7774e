"""The small compatibility layer megatron-core needs to run without CUDA.

megatron-core 0.16 is written for GPUs: many modules allocate with
``device=torch.cuda.current_device()`` and its tensor-parallel RNG tracker forks the CUDA generator.
Everything else it does (TP layers, parallel_state, dist_checkpointing) works on CPU with gloo.
This module neutralises exactly those two assumptions, and nothing more:

1. ``torch.cuda.current_device()`` returns ``torch.device("cpu")``, so allocations land on the CPU,
   and ``torch.cuda.synchronize()`` (called by dist_checkpointing before host copies) does nothing;
2. the RNG tracker forks the CPU generator instead of the CUDA one (dropout inside TP regions and
   activation recompute then stay reproducible on CPU).

It is installed only when effdist runs on the CPU (runtime.setup picks that), and
`uninstall()` restores every patched attribute, so tests can check both states. Code paths that
still hard-code ``device="cuda"`` (megatron's optimizer wrappers, its clip_grads, its pipeline
schedules) are not used by effdist on CPU: effdist uses torch AdamW, its own grad-norm and its own
pipeline executor there.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_PATCHES: list[tuple[Any, str, Any]] = []


def _patch(owner: Any, name: str, value: Any) -> None:
    _PATCHES.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _make_cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker API over the CPU generator: named states, forked in and out."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CPURNGStatesTracker


def is_installed() -> bool:
    return bool(_PATCHES)


def install() -> None:
    """Make megatron-core usable on a machine without CUDA. Idempotent."""
    if _PATCHES:
        return
    from megatron.core.tensor_parallel import random as mrandom

    _patch(torch.cuda, "current_device", _cpu_current_device)
    # dist_checkpointing synchronises the device before copying tensors to host; nothing to wait for.
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    tracker_cls = _make_cpu_tracker_class()
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER", tracker_cls())
    _patch(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    # Recompute (CheckpointFunction) saves and restores "the CUDA RNG state" around the recomputed
    # forward; on CPU that state is the CPU generator's, already handled by torch.get/set_rng_state.
    _patch(mrandom, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # initialize_rng_tracker would replace our tracker with a CUDA one.
    _patch(mrandom, "initialize_rng_tracker", lambda *a, **k: None)


def uninstall() -> None:
    """Undo install(), restoring every patched attribute in reverse order."""
    while _PATCHES:
        owner, name, value = _PATCHES.pop()
        setattr(owner, name, value)


@contextlib.contextmanager
def installed():
    """Scope the compatibility layer to a block (used by tests)."""
    already = is_installed()
    install()
    try:
        yield
    finally:
        if not already:
            uninstall()
