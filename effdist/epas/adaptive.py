"""Adaptive EPAS (``epas.mode: adaptive``): the region grows only when the layers about to join compute
Q/K similar enough to the Q/K they would share.

Probe steps are the steps at which progressive mode would grow: ``start_step``, then every ``interval``
steps, while the region (counting decided joins) is below its maximum ``final_region``. During a probe step
the next ``group_size`` layers from the deep end (the *candidates*) run as dense layers, bit for bit, and
in addition each accumulates, without autograd, three sums over its post-RoPE packed Q/K ``own`` and the
packed Q/K ``incoming`` it would share, that of the future anchor (the last layer before the group):
``[own . incoming, own . own, incoming . incoming]`` (fp64, summed over the step's microbatches).
`EpasSelfAttention` does that when ``probing`` (set by `apply_region`); a candidate whose next layer is
also a candidate passes the anchor's Q/K on, as a sharing layer would, instead of exporting its own.

After the probe step's optimizer update the controller sums these statistics over all ranks (data-parallel
ranks saw other data, tensor-parallel ranks hold other heads, pipeline ranks without the layer add zeros),
``cos = dot / sqrt(own2 * incoming2)`` per candidate, and global rank 0 alone decides ``grow = every
candidate's cos >= similarity_threshold`` and broadcasts the decision, so all ranks switch at the same
step boundary: with ``grow`` the group joins at step ``s + 1 + transition_steps`` (blending before that as
in progressive mode), otherwise the region stays and the next probe is ``interval`` steps later.

The region is no longer a function of the step: `AdaptiveSchedule.joins` (layer -> join step) is the
state, checkpointed by the controller.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Optional, Sequence

import torch

from effdist.config import EpasConfig
from effdist.epas.schedule import final_region_size
# The statistic is computed inside the attention during a probe step, so it lives with it (re-exported here).
from effdist.model.shared_qk import CHUNK, STATS, qk_similarity_stats  # noqa: F401


def cosine(stats: torch.Tensor | Sequence[float]) -> float:
    """Cosine similarity from ``[dot, own2, incoming2]``; NaN when either side is all zeros (never grows)."""
    dot, own2, incoming2 = (float(x) for x in stats)
    if own2 <= 0.0 or incoming2 <= 0.0:
        return float("nan")
    return dot / math.sqrt(own2 * incoming2)


def agree_on_growth(local_stats: torch.Tensor, threshold: float) -> tuple[list[float], bool]:
    """Sum the per-candidate statistics ``[n, 3]`` over every rank, then let global rank 0 decide whether the
    group grows (every candidate's cosine >= `threshold`) and broadcast that decision (an int tensor).

    Every rank must call this at the same point (the controller does, after the probe step's optimizer
    update). Without an initialised process group the same code runs without communication.
    Returns (the cosine of each candidate, the decision).
    """
    import torch.distributed as dist

    stats = local_stats.detach().to(torch.float64).reshape(-1, STATS).clone()
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(stats)  # world group, SUM
    similarities = [cosine(row) for row in stats.cpu()]
    decision = torch.zeros(1, dtype=torch.int64, device=stats.device)
    if not distributed or dist.get_rank() == 0:
        decision[0] = int(bool(similarities) and all(c >= threshold for c in similarities))
    if distributed:
        dist.broadcast(decision, src=0)
    return similarities, bool(decision.item())


# ---------------------------------------------------------------------- the schedule with decided joins

class AdaptiveSchedule:
    """Probe steps, candidates and the region of an adaptive run, from the joins decided so far.

    Pure bookkeeping (no communication): `grow` records a decision, the rest reads it. deep_to_shallow only.
    """

    def __init__(self, epas: EpasConfig, num_layers: int):
        if epas.mode != "adaptive":
            raise ValueError(f"AdaptiveSchedule needs epas.mode = 'adaptive', got {epas.mode!r}")
        self.epas = epas
        self.num_layers = num_layers
        self.final = final_region_size(epas, num_layers)
        self.joins: dict[int, int] = {}  # layer -> first step at which it shares

    # ------------------------------------------------------------------ reading
    def is_probe_step(self, step: int) -> bool:
        e = self.epas
        return step >= e.start_step and (step - e.start_step) % e.interval == 0

    def candidates(self, step: int) -> tuple[int, ...]:
        """The layers probing during `step`, deepest first (empty: not a probe step, or the region is full)."""
        decided = len(self.joins)
        if not self.is_probe_step(step) or decided >= self.final or any(j > step for j in self.joins.values()):
            return ()
        n = min(self.epas.group_size, self.final - decided)
        top = self.num_layers - decided  # the shallowest layer of the decided region
        return tuple(range(top - 1, top - 1 - n, -1))

    def sharing_layers(self, step: int) -> frozenset[int]:
        return frozenset(layer for layer, joins in self.joins.items() if joins <= step)

    def blend_factors(self, step: int) -> dict[int, float]:
        """Layers in transition during `step` -> weight of the incoming Q/K, as `schedule.blend_factors`."""
        span = self.epas.transition_steps
        return {layer: (step - joins + span + 1) / (span + 1) for layer, joins in sorted(self.joins.items())
                if joins - span <= step < joins}

    def join_step_after_probe(self, probe_step: int) -> int:
        return probe_step + 1 + self.epas.transition_steps

    # ------------------------------------------------------------------ deciding
    def grow(self, probe_step: int, layers: Sequence[int]) -> int:
        """The probe of `probe_step` said yes: `layers` (its candidates) join; returns their join step."""
        expected = self.candidates(probe_step)
        if tuple(layers) != expected:
            raise ValueError(f"step {probe_step}: layers {list(layers)} are not this step's candidates "
                             f"{list(expected)}")
        joins = self.join_step_after_probe(probe_step)
        for layer in layers:
            self.joins[layer] = joins
        return joins

    # ------------------------------------------------------------------ checkpoints
    def check_joins(self, joins: dict[int, int], step: Optional[int]) -> None:
        """Raise ValueError unless `joins` is what this config's probes could have decided by (the end of)
        optimizer step `step` (None: no step ran yet)."""
        if not joins:
            return
        if step is None:
            raise ValueError(f"join steps {joins} saved before any step ran")
        order = sorted(joins, reverse=True)  # deepest first: the order in which layers join
        if order != list(range(self.num_layers - 1, self.num_layers - 1 - len(order), -1)):
            raise ValueError(f"layers {sorted(joins)} are not the deepest {len(order)} layers")
        if len(order) > self.final:
            raise ValueError(f"{len(order)} layers joined; epas.final_region allows {self.final}")
        size = self.epas.group_size
        previous = None
        for start in range(0, len(order), size):
            group = order[start:start + size]
            if len(group) < size and len(order) != self.final:
                raise ValueError(f"layers {group} joined as a group smaller than epas.group_size = {size} before "
                                 "the region was full")
            steps = {joins[layer] for layer in group}
            joined = min(steps)
            if len(steps) != 1 or (previous is not None and joined <= previous):
                raise ValueError(f"join steps {[joins[layer] for layer in group]} of layers {group}: a group of "
                                 f"epas.group_size = {size} layers joins at one step, after the group below it")
            probe = joined - 1 - self.epas.transition_steps
            if not self.is_probe_step(probe) or probe > step:
                raise ValueError(f"layers {group} join at step {joined}, which no probe step of this schedule up to "
                                 f"step {step} decides")
            previous = joined

    def state_dict(self) -> dict[str, Any]:
        return {"joins": [[layer, joins] for layer, joins in sorted(self.joins.items())]}

    @staticmethod
    def joins_from_state(state: dict[str, Any]) -> dict[int, int]:
        return {int(layer): int(joins) for layer, joins in state.get("joins", [])}


def print_on_rank_zero(message: str) -> None:
    """The controller's default log: one line on global rank 0 (stderr, as the trainer's log)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(f"[effdist] {message}", file=sys.stderr, flush=True)


Log = Callable[[str], None]
