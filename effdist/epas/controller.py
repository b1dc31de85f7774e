"""The EPAS controller: switches this rank's layers to the scheduled region at each optimizer step
and keeps the Wq/Wk rows of sharing layers, and their optimizer state, exactly as they were.

Why rows need keeping: a sharing layer's Wq/Wk live inside the fused ``linear_qkv`` weight, whose
V rows still train. Their gradient is exactly zero, but AdamW would still move them (weight decay,
and the momentum they had before switching) and decay their moments.

With effdist's MasterWeightAdamW on its fused kernel (the GPU default) the optimizer itself leaves them
alone: the controller hands it the V rows as the only trainable pieces of that weight
(`MasterWeightAdamW.freeze_rows`), so AdamW neither reads nor writes the Wq/Wk rows of the weight, its
master copy or its moments, and nothing is copied back.

With other optimizers (torch's AdamW, DeepSpeed's), when a layer joins the region the controller takes
one snapshot of those rows (model weight, fp32 master weight, exp_avg, exp_avg_sq, ...) and sets the
rows' Adam moments to zero: with a zero gradient they then stay exactly zero, and AdamW's update of the
rows is exactly zero apart from weight decay, so after every optimizer step only the weight and master
rows are copied back. The moments taken at the switch go back into the optimizer if the layer leaves
the region. Memory: the snapshot of the frozen rows (about 2/3 of a layer's linear_qkv, per tensor).
Adam's per-tensor ``step`` counter still advances: it is shared with the V rows of the same tensor.

Call protocol (the trainer): ``begin_step(step)`` before the step's microbatches,
``scale_shared_qk_grads()`` between the gradient reduction and the gradient norm,
``after_optimizer_step(optimizer)`` right after the optimizer step, ``state_dict()`` into
checkpoints and ``load_state_dict()`` after the checkpoint (model + optimizer) has been loaded.
Give the optimizer to the constructor (or ``attach_optimizer``) so the snapshot includes its state;
without it, only a fresh run's first step can be reconstructed and a resumed run raises.

epas.mode adaptive (effdist.epas.adaptive): at a probe step ``begin_step`` also switches the candidate
layers to probing, and ``after_optimizer_step`` sums their similarity statistics over all ranks, lets global
rank 0 decide whether they join and broadcasts that; the decided join steps are the controller's state
(``state_dict()["adaptive"]``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from effdist.config import Config
from effdist.epas.adaptive import AdaptiveSchedule, Log, agree_on_growth, print_on_rank_zero
from effdist.epas.schedule import (
    blend_factors,
    boundary_needs_qk,
    check_schedule,
    final_region_size,
    layers_of_region,
    qk_uses,
    sharing_layers,
)
from effdist.model.shared_qk import (
    EpasError,
    apply_region,
    epas_layers,
    pop_exported_qk,
    qk_context_shape,
    qkv_row_blocks,
    value_block,
)
from effdist.protocols import ContextExtras, TensorSpec
from effdist.runtime.grads import accumulated_grad

# 2: adds the "adaptive" entry (epas.mode adaptive) and schedule.similarity_threshold; version 1 states
# (progressive and fixed runs) load unchanged.
STATE_VERSION = 2
LOADABLE_VERSIONS = (1, 2)


def _row_blocks(layer) -> tuple[int, int, int]:
    """(query groups, heads per group, head dim) of this rank's shard of the layer's linear_qkv."""
    attention = layer.self_attention
    groups = attention.num_query_groups_per_partition
    return groups, attention.num_attention_heads_per_partition // groups, attention.hidden_size_per_attention_head


def _value_row_pieces(layer) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A function giving the V rows, one contiguous view per query group, of a tensor shaped like the
    layer's linear_qkv weight: what still trains while the layer shares."""
    blocks = _row_blocks(layer)
    return lambda t: list(value_block(t, *blocks).unbind(0))


def _qk_rows_view(layer) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function giving the Q and K rows (a view) of a tensor shaped like the layer's linear_qkv weight."""
    groups, heads_per_group, head_dim = _row_blocks(layer)
    return lambda t: qkv_row_blocks(t, groups, heads_per_group, head_dim)[:, : heads_per_group + 1]


def _optimizer_tensors(optimizer, param: torch.nn.Parameter) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """(the fp32 tensor the optimizer updates for `param`, its state tensors shaped like it, its step)."""
    if hasattr(optimizer, "master_of") and hasattr(optimizer, "inner"):  # effdist.train.optim.MasterWeightAdamW
        master = optimizer.master_of(param)
        state = optimizer.inner.state.get(master, {})
    elif isinstance(optimizer, torch.optim.Optimizer):
        master = param
        state = optimizer.state.get(param, {})
    else:
        raise EpasError(f"EpasController cannot keep the optimizer state of a {type(optimizer).__name__}: use a "
                        "torch.optim optimizer or effdist.train.optim.MasterWeightAdamW")
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape}
    step = float(state["step"]) if "step" in state else 0.0
    return master, tensors, step


class _FrozenRows:
    """The Wq/Wk rows of one sharing layer's linear_qkv weight, kept as they were when it switched."""

    def __init__(self, layer_index: int, layer):
        self.layer_index = layer_index
        self.param: torch.nn.Parameter = layer.self_attention.linear_qkv.weight
        self.rows = _qk_rows_view(layer)
        self.value_pieces = _value_row_pieces(layer)
        # True once the optimizer itself leaves the rows alone (MasterWeightAdamW.freeze_rows): no restore.
        self.left_alone_by_optimizer = False
        # Rows rebuilt for an optimizer first seen after a step, not yet handed to it.
        self.reconstructed = False
        self.param_rows = self.rows(self.param.detach()).clone()
        self.optimizer_rows: Optional[dict[str, Optional[torch.Tensor]]] = None
        self.master_rows: Optional[torch.Tensor] = None

    def ask_optimizer_to_leave_rows_alone(self, optimizer) -> bool:
        freeze = getattr(optimizer, "freeze_rows", None)
        self.left_alone_by_optimizer = bool(freeze is not None and freeze(self.param, self.value_pieces))
        return self.left_alone_by_optimizer

    @torch.no_grad()
    def snapshot_optimizer(self, optimizer) -> None:
        if self.ask_optimizer_to_leave_rows_alone(optimizer):
            return
        master, state, _ = _optimizer_tensors(optimizer, self.param)
        self.master_rows = None if master is self.param else self.rows(master.detach()).clone()
        # No state yet: the rows' state will be created as zeros, and with their zero gradient it stays so.
        self.optimizer_rows = {k: self.rows(v).clone() for k, v in state.items()}
        for tensor in state.values():
            self.rows(tensor).zero_()

    def reconstruct_fresh_optimizer(self, optimizer) -> None:
        """For an optimizer seen only after its first step: the pre-step state was no state at all and
        the master copy was made from the model weight (what MasterWeightAdamW and torch.optim do)."""
        master, _, step = _optimizer_tensors(optimizer, self.param)
        if step > 1:
            raise EpasError(
                f"layer {self.layer_index} shared Q/K during a step of an optimizer whose state existed before "
                "that step, and the controller had no snapshot of it, so its Wq/Wk rows cannot be restored "
                "exactly. Give the optimizer to the controller before the first step: "
                "EpasController(cfg, model_chunks, optimizer=optimizer) or controller.attach_optimizer(optimizer)")
        self.master_rows = None if master is self.param else self.param_rows.to(master.dtype)
        self.optimizer_rows = {}
        self.reconstructed = True

    @torch.no_grad()
    def restore(self, optimizer) -> None:
        """Undo weight decay on the rows; their Adam moments are zero and stayed so (zero gradient)."""
        if self.left_alone_by_optimizer:
            return
        master, _, _ = _optimizer_tensors(optimizer, self.param)
        self.rows(self.param).copy_(self.param_rows)
        if master is not self.param:
            self.rows(master).copy_(self.master_rows)

    @torch.no_grad()
    def release(self, optimizer) -> None:
        """The layer leaves the region: its Wq/Wk train again, from the moments they had when it joined."""
        if self.left_alone_by_optimizer:
            optimizer.unfreeze_rows(self.param)
            return
        if optimizer is None or not self.optimizer_rows:
            return
        _, state, _ = _optimizer_tensors(optimizer, self.param)
        for name, tensor in state.items():
            saved = self.optimizer_rows.get(name)
            if saved is not None:
                self.rows(tensor).copy_(saved)


class EpasController:
    """One EPAS decision per optimizer step, identical on all ranks (a pure function of the step, or, in
    adaptive mode, of the step and the decisions rank 0 broadcast). The trainer drives it as a
    effdist.protocols.StepHook."""

    # StepHook: the checkpoint key of its state (what every EPAS checkpoint holds; effdist.infer reads the
    # trained region from it) and the metrics.jsonl field of begin_step's region size.
    name = "epas"
    begin_step_metric = "epas_region"

    def __init__(self, cfg: Config, model_chunks: list[torch.nn.Module], optimizer=None, log: Optional[Log] = None):
        if not cfg.epas.enabled:
            raise EpasError("EpasController needs epas.enabled = true (and the model built with it)")
        check_schedule(cfg.epas, cfg.model.num_layers)
        self.cfg = cfg
        self.num_layers = cfg.model.num_layers
        self.model_chunks = list(model_chunks)
        self._layers = epas_layers(self.model_chunks)
        if not self._layers:
            raise EpasError("the model chunks have no EPAS layers: build them with epas.enabled = true")
        bad = [i for i in self._layers if not 0 <= i < self.num_layers]
        if bad:
            raise EpasError(f"layer indices {bad} lie outside model.num_layers = {self.num_layers}")
        self._optimizer = None
        self._frozen: dict[int, _FrozenRows] = {}
        self._region: frozenset[int] = frozenset()
        self._blending: dict[int, float] = {}
        self._step: Optional[int] = None
        self._switched = False
        self._first_step_of_process = True
        # epas.mode adaptive: the decided joins, this step's probing candidates, the probes decided so far.
        self._adaptive = AdaptiveSchedule(cfg.epas, self.num_layers) if cfg.epas.mode == "adaptive" else None
        self._probing: tuple[int, ...] = ()
        self._probe_step: Optional[int] = None
        self._probes: list[dict[str, Any]] = []
        self._step_metrics: dict[str, Any] = {}
        self._last_layout: Optional[tuple[frozenset[int], ...]] = None  # (sharing, in transition, probing) last step
        self._log = log if log is not None else print_on_rank_zero
        apply_region(self.model_chunks, self._region)
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ queries
    @property
    def region(self) -> int:
        """Number of sharing layers in the whole model (all ranks) at the current step."""
        return len(self._region)

    @property
    def sharing_layers(self) -> frozenset[int]:
        """Global indices of the sharing layers in the whole model at the current step."""
        return self._region

    @property
    def blending(self) -> dict[int, float]:
        """Layers in transition at the current step -> weight of the incoming Q/K (epas.transition_steps)."""
        return dict(self._blending)

    @property
    def probing(self) -> tuple[int, ...]:
        """epas.mode adaptive: the candidate layers measuring their Q/K similarity during the current step
        (deepest first; empty outside probe steps and once the step's decision is made)."""
        return self._probing

    @property
    def qk_consumers(self) -> frozenset[int]:
        """Layers that use the Q/K of the layer before them at the current step (sharing, in transition or
        probing): a pipeline boundary in front of one of them carries Q/K."""
        return self._region | self._blending.keys() | frozenset(self._probing)

    @property
    def switched_this_step(self) -> bool:
        """The sharing, transition or probing layers differ from the previous step's (always true at the
        first step of a process), so e.g. the pipeline executor must redo which boundaries carry Q/K."""
        return self._switched

    @property
    def join_steps(self) -> dict[int, int]:
        """epas.mode adaptive: layer -> the step from which it shares, as decided so far (empty otherwise)."""
        return dict(self._adaptive.joins) if self._adaptive is not None else {}

    @property
    def probes(self) -> list[dict[str, Any]]:
        """epas.mode adaptive: every decided probe, oldest first: {step, layers, similarity, grow, joins_at}."""
        return [dict(p) for p in self._probes]

    def step_metrics(self) -> dict[str, Any]:
        """Extra metrics of the current step for the trainer's record (after after_optimizer_step): on an
        adaptive probe step ``epas_similarity`` (the cosine of each candidate, deepest first),
        ``epas_probed_layers`` and ``epas_grow``; otherwise nothing."""
        return dict(self._step_metrics)

    @property
    def step(self) -> Optional[int]:
        return self._step

    # ------------------------------------------------------------------ the step protocol
    def attach_optimizer(self, optimizer) -> None:
        """Snapshot the optimizer rows of the layers already sharing; later switches snapshot them too."""
        if self._optimizer is not None and optimizer is not self._optimizer:
            raise EpasError("EpasController already keeps the rows of another optimizer")
        self._optimizer = optimizer
        for frozen in self._frozen.values():
            if frozen.optimizer_rows is None:
                frozen.snapshot_optimizer(optimizer)

    def begin_step(self, step: int) -> int:
        """Switch this rank's layers to the region of optimizer step `step`; returns the region size.

        Call only between optimizer steps (never between microbatches of one step).
        """
        self._step_metrics = {}
        if self._adaptive is not None:
            # A probe whose step got no optimizer update (non-finite) decides nothing: dropped here.
            self._probe_step = None
            region = self._adaptive.sharing_layers(step)
            blending = self._adaptive.blend_factors(step)
            probing = self._adaptive.candidates(step)
        else:
            region = sharing_layers(self.cfg.epas, self.num_layers, step)
            blending = blend_factors(self.cfg.epas, self.num_layers, step)
            probing = ()
        layout = (region, frozenset(blending), frozenset(probing))
        self._switched = layout != self._last_layout or self._first_step_of_process
        self._first_step_of_process = False
        self._last_layout = layout
        # Probing layers always start the step with empty statistics (apply_region clears them).
        if region != self._region:
            self._log(self._region_announcement(step, region))
        if region != self._region or blending != self._blending or probing or self._probing:
            self._switch(region, blending, probing)
        self._probe_step = step if probing else None
        self._step = step
        return len(region)

    def _region_announcement(self, step: int, region: frozenset[int]) -> str:
        """One console line when the sharing layers change (steps counted from 1, as on the console;
        layers from 0, as in the config)."""
        final = final_region_size(self.cfg.epas, self.num_layers)
        if not region:
            return f"EPAS: from step {step + 1} no layer shares Q/K: region 0 of {final}"
        first, last = min(region), max(region)
        layers = f"layer {first} shares" if first == last else f"layers {first}\u2013{last} share"
        done = " (final)" if len(region) == final else ""
        return f"EPAS: from step {step + 1} {layers} Q/K: region {len(region)} of {final}{done}"

    @torch.no_grad()
    def scale_shared_qk_grads(self) -> None:
        """epas.anchor_grad = mean: divide the Wq/Wk rows of the weight gradient of each layer whose Q/K
        others use by the number of uses (effdist.epas.schedule.qk_uses). Call once per step, after the
        gradients are reduced over data-parallel ranks and before the gradient norm; a no-op for "sum".
        Every rank computes the same counts from the global region, so tensor and pipeline ranks agree."""
        if self.cfg.epas.anchor_grad != "mean":
            return
        for index, uses in qk_uses(self.num_layers, self._region, self._blending).items():
            layer = self._layers.get(index)
            if layer is None:
                continue
            linear = layer.self_attention.linear_qkv
            rows = _qk_rows_view(layer)
            for param in (linear.weight, getattr(linear, "bias", None)):
                if param is None:
                    continue
                grad = accumulated_grad(param)
                if grad is not None:
                    rows(grad).div_(uses)

    def after_backward(self) -> None:
        """The StepHook point after the gradient reduction (effdist.protocols): scale_shared_qk_grads."""
        self.scale_shared_qk_grads()

    def boundary_extras(self, chunk_layers: Sequence[Sequence[int]]) -> ContextExtras:
        """For the pipeline executor: send the anchor's packed Q/K across every boundary whose next chunk
        starts with a layer that uses it (`qk_consumers`, read again at every step). `chunk_layers`: the
        global layer indices of each chunk, in chunk order."""
        return qk_boundary_extras(lambda: self.qk_consumers, chunk_layers, self.model_chunks[0].config)

    def after_optimizer_step(self, optimizer) -> None:
        """Put back the Wq/Wk rows (weight, master weight, optimizer state) of the sharing layers."""
        if self._optimizer is None:
            self._optimizer = optimizer
            for frozen in self._frozen.values():
                if frozen.optimizer_rows is None:
                    frozen.reconstruct_fresh_optimizer(optimizer)
        elif optimizer is not self._optimizer:
            raise EpasError("after_optimizer_step got a different optimizer than the one attached")
        for frozen in self._frozen.values():
            frozen.restore(optimizer)
            if frozen.reconstructed:
                # Put right once; from the next step on the optimizer leaves the rows alone where it can.
                frozen.reconstructed = False
                frozen.ask_optimizer_to_leave_rows_alone(optimizer)
        if self._probe_step is not None:
            self._decide_probe()

    def _decide_probe(self) -> None:
        """The probe step's optimizer update is done: every rank sums the candidates' statistics, rank 0
        decides, all switch (from the next step on) as it broadcast."""
        step, layers = self._probe_step, self._probing
        local = torch.zeros(len(layers), 3, dtype=torch.float64, device=self._device())
        for row, index in enumerate(layers):
            layer = self._layers.get(index)
            stats = layer.self_attention.probe_stats if layer is not None else None
            if stats is not None:
                local[row] = stats.to(local.device)
        threshold = self.cfg.epas.similarity_threshold
        similarity, grow = agree_on_growth(local, threshold)
        joins_at = self._adaptive.grow(step, layers) if grow else None
        probe = {"step": step, "layers": list(layers), "similarity": similarity, "grow": grow, "joins_at": joins_at}
        self._probes.append(probe)
        self._step_metrics = {"epas_similarity": similarity, "epas_probed_layers": list(layers), "epas_grow": grow}
        self._probe_step = None
        self._switch(self._region, self._blending, ())  # probing off: nothing measures until the next probe
        shown = ", ".join(f"{c:.4f}" for c in similarity)
        self._log(f"epas probe at step {step}: layers {list(layers)} cosine [{shown}] vs threshold {threshold}: " +
                  (f"grow (they share from step {joins_at})" if grow else "stay"))

    def _device(self) -> torch.device:
        for chunk in self.model_chunks:
            for param in chunk.parameters():
                return param.device
        return torch.device("cpu")

    def close(self) -> None:
        """Make every layer dense again and hand the sharing layers' Wq/Wk rows back to the optimizer, which
        updates them again from the moments they had when they joined. For a controller dropped while its
        model and optimizer live on (e.g. a benchmark switching regions): otherwise the optimizer would
        go on leaving those rows alone."""
        self._switch(frozenset(), {})

    def _switch(self, region: frozenset[int], blending: dict[int, float], probing: tuple[int, ...] = ()) -> None:
        apply_region(self.model_chunks, region, blending, probing)
        self._blending = dict(blending)
        self._probing = tuple(probing)
        for index in list(self._frozen):
            if index not in region:
                self._frozen.pop(index).release(self._optimizer)
        for index in sorted(region):
            if index in self._layers and index not in self._frozen:
                frozen = _FrozenRows(index, self._layers[index])
                if self._optimizer is not None:
                    frozen.snapshot_optimizer(self._optimizer)
                self._frozen[index] = frozen
        self._region = region

    # ------------------------------------------------------------------ checkpointing
    def _schedule_signature(self) -> dict[str, Any]:
        e = self.cfg.epas
        return {"mode": e.mode, "start_step": e.start_step, "interval": e.interval, "group_size": e.group_size,
                "final_region": e.final_region, "direction": e.direction, "transition_steps": e.transition_steps,
                "similarity_threshold": e.similarity_threshold, "anchor_grad": e.anchor_grad}

    def state_dict(self) -> dict[str, Any]:
        state = {"version": STATE_VERSION, "step": self._step, "region": len(self._region),
                 "sharing_layers": sorted(self._region), "num_layers": self.num_layers,
                 "schedule": self._schedule_signature()}
        if self._adaptive is not None:
            state["adaptive"] = {**self._adaptive.state_dict(), "probes": self.probes}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the region of a checkpoint; call after the model and optimizer were loaded.

        progressive / fixed: the saved region must be what this config's schedule gives at the saved step: a
        resumed run with another schedule would switch layers the checkpoint never trained that way.
        adaptive: the saved join steps must be ones this config's probes could have decided by the saved step,
        and give the saved region at that step; they are restored, so the run continues the same region
        (a new epas.similarity_threshold applies to the probes still to come).
        """
        if state.get("version") not in LOADABLE_VERSIONS:
            raise EpasError(f"EPAS controller state version {state.get('version')!r} is not one of {LOADABLE_VERSIONS}")
        if state["num_layers"] != self.num_layers:
            raise EpasError(f"the EPAS state was saved for {state['num_layers']} layers, this model has {self.num_layers}")
        saved = frozenset(state["sharing_layers"])
        step = state["step"]
        at = "before its first step" if step is None else f"at step {step + 1}"  # steps counted from 1, as on the console
        saved_mode = state.get("schedule", {}).get("mode", "progressive")
        if (saved_mode == "adaptive") != (self._adaptive is not None):
            raise EpasError(f"the checkpoint was trained with epas.mode = {saved_mode}, this config has "
                            f"{self.cfg.epas.mode}: resume with the mode the run was trained with (its schedule "
                            f"{state.get('schedule')}), or start a new run from the weights")
        joins: dict[int, int] = {}
        if self._adaptive is not None:
            adaptive_state = state.get("adaptive") or {}
            joins = AdaptiveSchedule.joins_from_state(adaptive_state)
            try:
                self._adaptive.check_joins(joins, step)
            except ValueError as e:
                raise EpasError(f"checkpoint EPAS join steps {joins} (schedule {state.get('schedule')}) do not fit "
                                f"this config's adaptive schedule {self._schedule_signature()} {at}: {e}. Resume "
                                "with the epas settings the run was trained with, or start a new run from the "
                                "weights") from None
            expected = frozenset(layer for layer, joined in joins.items() if step is not None and joined <= step)
            what = f"its join steps {joins}"
        else:
            expected = frozenset() if step is None else sharing_layers(self.cfg.epas, self.num_layers, step)
            what = f"this config's schedule {self._schedule_signature()}"
        if saved != expected:
            raise EpasError(
                f"checkpoint EPAS region {at} is {sorted(saved)} (schedule {state.get('schedule')}), but "
                f"{what} gives {sorted(expected)} at that step. Resume "
                "with the epas settings the run was trained with, or start a new run from the weights")
        saved_transition = state.get("schedule", {}).get("transition_steps", 0)
        if saved_transition != self.cfg.epas.transition_steps:
            raise EpasError(f"the checkpoint was trained with epas.transition_steps = {saved_transition}, this config "
                            f"has {self.cfg.epas.transition_steps}: resume with the value the run was trained with "
                            f"(--set epas.transition_steps={saved_transition}), or start a new run from the weights")
        if self._adaptive is not None:
            self._adaptive.joins = dict(joins)
            self._probes = [dict(p) for p in (state.get("adaptive") or {}).get("probes", [])]
            blending = {} if step is None else self._adaptive.blend_factors(step)
        else:
            blending = {} if step is None else blend_factors(self.cfg.epas, self.num_layers, step)
        self._probe_step = None
        self._step_metrics = {}
        self._switch(saved, blending)
        self._step = step
        self._first_step_of_process = True


def qk_boundary_extras(qk_consumers: Callable[[], Iterable[int]], chunk_layers: Sequence[Sequence[int]],
                       config) -> ContextExtras:
    """The pipeline boundary extras of EPAS: the packed Q/K (one tensor, megatron's ``context``) crosses the
    boundary in front of chunk c whenever its first layer is in ``qk_consumers()`` (asked at every step).
    `config` is a chunk's megatron TransformerConfig (heads, groups, head size, TP, sequence parallelism)."""
    tp = config.tensor_model_parallel_size

    def specs(boundary: int, hidden: TensorSpec) -> tuple[TensorSpec, ...]:
        if not boundary_needs_qk(frozenset(qk_consumers()), chunk_layers[boundary + 1][0]):
            return ()
        # Under sequence parallelism the hidden states are split along the sequence, Q/K are not.
        seq = hidden.shape[0] * (tp if config.sequence_parallel else 1)
        return (TensorSpec(qk_context_shape(config, seq, hidden.shape[1]), hidden.dtype),)

    return ContextExtras(specs, pop_exported_qk)


def set_region(model_chunks: Iterable[torch.nn.Module], num_sharing_layers: int, *, num_layers: Optional[int] = None,
               direction: str = "deep_to_shallow") -> frozenset[int]:
    """Run a trained EPAS model with any region length 0..num_layers-1 (inference, evaluation).

    `num_layers` defaults to the layers found in `model_chunks`, which must then be the whole model.
    Returns the sharing layers.
    """
    chunks = list(model_chunks)
    if num_layers is None:
        found = sorted(epas_layers(chunks))
        if not found or found != list(range(found[-1] + 1)):
            raise EpasError("set_region: these chunks do not hold a whole model; pass num_layers=")
        num_layers = len(found)
    layers = layers_of_region(num_sharing_layers, num_layers, direction)
    apply_region(chunks, layers)
    return layers
