"""Which decoder layers share Q/K at a given optimizer step: a pure function of the step.

Progressive (the paper's method): dense until ``start_step``; then ``group_size`` layers switch to
sharing at ``start_step`` and another group every ``interval`` steps, until the region holds
``final_region`` layers. The region grows from the deep end (deep_to_shallow, default: the last
layers share first) or, as an ablation, from layer 1 upward (shallow_to_deep). "fixed" holds the
final region from ``start_step`` on. Layer 0 never shares: it has no previous layer.

With ``transition_steps`` T > 0 (an effdist extension), a layer that joins the region at step t
blends during steps t-T .. t-1: its Q/K are ``(1 - a) * own + a * incoming`` with a = (step - t + T + 1) /
(T + 1), and the layers sharing below it receive that blend, so a switch no longer replaces the Q/K of
the whole run below the new anchor in one step. The region itself is unchanged by T.

Being a pure function of (config, step), every rank computes the same region with no
communication, and a resumed run recomputes it from its step.

"adaptive" grows at the same probe steps only when the layers about to join are measured similar enough
to the Q/K they would share; its region depends on those measurements, so it is not a function of the
step: effdist.epas.adaptive.AdaptiveSchedule (driven by the EpasController) holds it, and the pure
functions below that give a region or a join step refuse that mode.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from effdist.config import ConfigError, EpasConfig, epas_final_region

MODES = ("progressive", "fixed", "adaptive")


def final_region_size(epas: EpasConfig, num_layers: int) -> int:
    """epas.final_region as a layer count (it may be given as a fraction of num_layers)."""
    # One definition of the count, shared with config validation.
    return epas_final_region(SimpleNamespace(epas=epas, model=SimpleNamespace(num_layers=num_layers)))


def check_schedule(epas: EpasConfig, num_layers: int) -> None:
    """Raise ConfigError naming the field if this schedule cannot run on `num_layers` layers."""
    if epas.mode not in MODES:
        raise ConfigError(f"epas.mode = {epas.mode!r}: valid: progressive, fixed, adaptive")
    threshold = epas.similarity_threshold
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
            or not -1.0 < threshold <= 1.0):
        raise ConfigError(f"epas.similarity_threshold = {threshold!r}: must be a number in (-1, 1], the cosine "
                          "similarity of a candidate layer's Q/K with its future anchor's at or above which "
                          "epas.mode = adaptive lets it join (e.g. 0.5)")
    if epas.direction not in ("deep_to_shallow", "shallow_to_deep"):
        raise ConfigError(f"epas.direction = {epas.direction!r}: valid: deep_to_shallow, shallow_to_deep")
    if epas.interval <= 0:
        raise ConfigError(f"epas.interval = {epas.interval!r}: must be a positive number of steps between growths")
    if epas.group_size <= 0:
        raise ConfigError(f"epas.group_size = {epas.group_size!r}: must be a positive number of layers")
    if not isinstance(epas.transition_steps, int) or epas.transition_steps < 0:
        raise ConfigError(f"epas.transition_steps = {epas.transition_steps!r}: must be a whole number of steps >= 0 "
                          "(0 switches each layer at once, as in the paper)")
    if epas.start_step < 0:
        raise ConfigError(f"epas.start_step = {epas.start_step!r}: must be >= 0")
    if epas.mode == "adaptive":
        if epas.direction != "deep_to_shallow":
            raise ConfigError(f"epas.direction = {epas.direction!r}: epas.mode = adaptive grows the region from the "
                              "deep end only; use deep_to_shallow (or mode progressive for the ablation)")
        if epas.transition_steps >= epas.interval:
            raise ConfigError(f"epas.transition_steps = {epas.transition_steps!r}: with epas.mode = adaptive it must "
                              f"be below epas.interval = {epas.interval} (a group joins before the next probe "
                              "measures the layers above it); lower it or raise epas.interval")
    if epas.final_region <= 0:
        raise ConfigError(f"epas.final_region = {epas.final_region!r}: must be a layer count >= 1 or a fraction "
                          "in (0, 1)")
    if epas.final_region >= 1 and not float(epas.final_region).is_integer():
        raise ConfigError(f"epas.final_region = {epas.final_region!r}: a count must be a whole number of layers "
                          "(or give a fraction in (0, 1))")
    final = final_region_size(epas, num_layers)
    if final == 0:
        raise ConfigError(f"epas.final_region = {epas.final_region!r} of {num_layers} layers rounds down to 0 "
                          "sharing layers; raise the fraction or give a count")
    if final > num_layers - 1:
        raise ConfigError(f"epas.final_region = {epas.final_region!r} = {final} sharing layers; at most "
                          f"num_layers-1 = {num_layers - 1} (layer 0 has no previous layer to share Q/K with)")


def _not_adaptive(epas: EpasConfig, what: str) -> None:
    if epas.mode == "adaptive":
        raise ValueError(f"{what}: with epas.mode = adaptive the region depends on measured Q/K similarity, not on "
                         "the step alone; ask the EpasController (sharing_layers, blending, state_dict()['adaptive'])")


def region_size(epas: EpasConfig, num_layers: int, step: int) -> int:
    """Number of sharing layers during optimizer step `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step = {step}: optimizer steps are counted from 0")
    _not_adaptive(epas, "region_size")
    final = final_region_size(epas, num_layers)
    if step < epas.start_step:
        return 0
    if epas.mode == "fixed":
        return final
    groups = (step - epas.start_step) // epas.interval + 1
    return min(final, groups * epas.group_size)


def layers_of_region(size: int, num_layers: int, direction: str = "deep_to_shallow") -> frozenset[int]:
    """The `size` sharing layers: the deepest ones (deep_to_shallow) or layers 1..size (shallow_to_deep)."""
    if not 0 <= size <= num_layers - 1:
        raise ValueError(f"region size {size}: must lie in [0, num_layers-1 = {num_layers - 1}] (layer 0 never shares)")
    if direction == "deep_to_shallow":
        return frozenset(range(num_layers - size, num_layers))
    if direction == "shallow_to_deep":
        return frozenset(range(1, size + 1))
    raise ValueError(f"direction = {direction!r}: valid: deep_to_shallow, shallow_to_deep")


def sharing_layers(cfg_epas: EpasConfig, num_layers: int, step: int) -> frozenset[int]:
    """Global indices (0-based) of the layers that share Q/K during optimizer step `step`."""
    if not cfg_epas.enabled:
        return frozenset()
    check_schedule(cfg_epas, num_layers)
    return layers_of_region(region_size(cfg_epas, num_layers, step), num_layers, cfg_epas.direction)


def join_step(epas: EpasConfig, num_layers: int, layer: int) -> int | None:
    """The first step at which `layer` shares (None: never, it is outside the final region)."""
    _not_adaptive(epas, "join_step")
    final = final_region_size(epas, num_layers)
    if epas.direction == "deep_to_shallow":
        order = num_layers - 1 - layer  # 0 for the deepest layer, the first to join
    else:
        order = layer - 1
    if not 0 <= order < final:
        return None
    if epas.mode == "fixed":
        return epas.start_step
    return epas.start_step + (order // epas.group_size) * epas.interval


def blend_factors(epas: EpasConfig, num_layers: int, step: int) -> dict[int, float]:
    """Layers in transition during `step` -> the weight a of the incoming Q/K (0 < a < 1); empty when
    transition_steps is 0. Layers already sharing are not listed (they use the incoming Q/K alone)."""
    if not epas.enabled:
        return {}
    _not_adaptive(epas, "blend_factors")
    if epas.transition_steps == 0:
        return {}
    check_schedule(epas, num_layers)
    span = epas.transition_steps
    out = {}
    for layer in range(1, num_layers):
        joins = join_step(epas, num_layers, layer)
        if joins is not None and joins - span <= step < joins:
            out[layer] = (step - joins + span + 1) / (span + 1)
    return out


def qk_uses(num_layers: int, sharing: frozenset[int], blending: dict[int, float]) -> dict[int, float]:
    """Layers that compute Q/K which others use -> how many times their Q/K are used, counting their own
    attention: 1 + each layer sharing them (1 each) or blending them in (its weight a), on down the run
    below them (a sharing layer under a blending one uses the blend, so it counts a as well)."""
    uses = {}
    for layer in range(num_layers):
        if layer in sharing:
            continue
        weight, total, below = 1.0, 1.0, layer + 1
        while below < num_layers and (below in sharing or below in blending):
            weight *= 1.0 if below in sharing else blending[below]
            total += weight
            below += 1
        if total > 1.0:
            uses[layer] = total
    return uses


def steps_to_final_region(epas: EpasConfig, num_layers: int) -> int:
    """The first step at which the region reaches its final size."""
    _not_adaptive(epas, "steps_to_final_region")
    final = final_region_size(epas, num_layers)
    if epas.mode == "fixed":
        return epas.start_step
    return epas.start_step + (math.ceil(final / epas.group_size) - 1) * epas.interval


def boundary_needs_qk(qk_consumers: frozenset[int] | set[int], first_layer_of_next_chunk: int) -> bool:
    """Whether the Q/K of the layer before a pipeline-chunk boundary must cross it.

    It must exactly when the next chunk's first layer uses the incoming Q/K: it shares (reusing the Q/K
    of the layer before it, which the previous chunk exported or passed on from its own anchor) or it
    is in transition (`blend_factors`). `qk_consumers` is the set of such layers.
    """
    return first_layer_of_next_chunk in qk_consumers


def describe_plan(epas: EpasConfig, num_layers: int, total_steps: int) -> str:
    """One line for the start of a run: when sharing starts, where it grows to, and whether this run
    gets there. Steps are counted from 1, as on the console (optimizer step s runs as console step s+1)."""
    final = final_region_size(epas, num_layers)
    start = epas.start_step + 1
    of = f"{final} of {num_layers} layers"
    if epas.mode == "adaptive":
        return (f"EPAS (adaptive): from step {start}, every {epas.interval} steps, the next {epas.group_size} "
                f"layer(s) join if their Q/K cosine reaches {epas.similarity_threshold}; at most {of}")
    reach = steps_to_final_region(epas, num_layers) + 1
    if epas.mode == "fixed":
        plan = f"EPAS: {of} share Q/K from step {start}"
    else:
        plan = (f"EPAS: sharing Q/K starts at step {start} and grows by {epas.group_size} layer(s) every "
                f"{epas.interval} steps to region {final} ({of}) at step {reach}")
    if reach > total_steps:
        last = region_size(epas, num_layers, total_steps - 1) if total_steps > 0 else 0
        plan += (f"; this run has train.steps = {total_steps}, so it ends at region {last} without reaching it "
                 "(lower epas.interval or epas.start_step, or raise train.steps)")
    return plan
