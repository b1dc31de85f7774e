"""Decode steps with little host overhead: one CUDA graph per attended length bucket.

One decode step of a 16-layer model is a few hundred small kernels; launched one by one from Python
the host, not the GPU, sets the pace at small batches. A CUDA graph replays them with one launch.
A graph has fixed shapes, but the number of cache slots a step attends over grows by one per token,
so a step attends over the filled slots rounded up to a *bucket* (``bucket`` slots, 128 by default):
the cache's additive mask hides the slots not written yet. One graph is captured per bucket the
first time it is needed, and reused for every step, and every later generation, in that bucket.

The graphs read and write only the cache's fixed tensors (K/V, tokens, positions, slot, mask),
so they belong to one `KVCache`: reuse the cache (and this runner) to reuse them.

On CPU, or with ``cuda_graphs=False``, steps run eagerly over exactly the filled slots.
"""

from __future__ import annotations

import warnings

import torch

from effdist.infer.cache import KVCache, SharingPlan
from effdist.infer.model import InferenceModel


class DecodeRunner:
    """Runs `InferenceModel.decode_step` on one cache: eagerly, or by replaying bucketed CUDA graphs."""

    def __init__(self, model: InferenceModel, cache: KVCache, reuse_attention: bool = True,
                 cuda_graphs: bool | None = None, bucket: int = 128):
        if bucket <= 0:
            raise ValueError(f"bucket = {bucket}: must be a positive number of cache slots")
        self.model = model
        self.cache = cache
        self.plan: SharingPlan = cache.plan
        self.reuse_attention = reuse_attention
        self.cuda_graphs = cache.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and cache.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the cache on a CUDA device")
        self.bucket = bucket
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def attend_len(self) -> int:
        """Slots the next step attends over: exactly the filled ones (eager) or their bucket (graphs)."""
        needed = self.cache.length + 1
        if not self.cuda_graphs:
            return needed
        return min(self.cache.max_len, -(-needed // self.bucket) * self.bucket)

    def step(self) -> torch.Tensor:
        """Logits [batch, padded_vocab] of the next token; the cache is written but not advanced. With
        graphs the tensor is the graph's output buffer: read it before the next step."""
        if self.cache.length >= self.cache.max_len:
            raise ValueError(f"the KV cache is full ({self.cache.max_len} slots)")
        length = self.attend_len()
        if not self.cuda_graphs:
            return self.model.decode_step(self.cache, self.plan, length, self.reuse_attention)
        entry = self._graphs.get(length)
        if entry is None:
            try:
                entry = self._capture(length)
            except RuntimeError as e:  # e.g. an op that cannot be captured in this build: stay correct, be slower
                warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly instead",
                              RuntimeWarning, stacklevel=2)
                self.cuda_graphs = False
                return self.model.decode_step(self.cache, self.plan, self.cache.length + 1, self.reuse_attention)
            self._graphs[length] = entry
        graph, logits = entry
        graph.replay()
        return logits

    @property
    def captured_lengths(self) -> list[int]:
        return sorted(self._graphs)

    def _capture(self, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up outside the graph (lazy cuBLAS/Triton initialisation must not happen during capture).
        # It is a real step: it writes this step's K/V into the cache and unmasks its slot; the replay
        # below writes the very same values again, so running it twice is harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode_step(self.cache, self.plan, length, self.reuse_attention)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model.decode_step(self.cache, self.plan, length, self.reuse_attention)
        return graph, logits
