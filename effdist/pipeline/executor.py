"""Runs a pipeline Schedule on real ranks: the action list of this rank, front to back.

* ``F(c, m)`` runs model chunk c on microbatch m. Chunk 0 reads the tokens; any other chunk reads what chunk
  c-1 produced: from P2P, or handed over in memory when both chunks live on this rank (the turn of a V). The
  output -- a tuple (hidden states, *extras) -- goes to chunk c+1 the same way. The last chunk computes the loss:
  sum over tokens of (per-token loss x loss_mask), divided by the token count of the whole global batch for
  backward, so gradients equal the pp=1 path's (effdist.train.trainer._forward_backward).
* ``B(c, m)`` back-propagates the gradient of chunk c's outputs to its inputs and sends the input gradients to
  chunk c-1. The weight-gradient GEMMs of the split linears (wgrad.py) are queued, not run.
* ``W(c, m)`` runs those queued GEMMs.  ``BW(c, m)`` is a B whose weight gradients are computed on the spot.

Transfers are posted in the order of p2p.CommPlan (batched isend/irecv, receives posted as early as that order
allows, waited for just before use), which cannot deadlock with gloo or NCCL. The memory probe counts the
activation bytes this rank holds over time (memory_probe.py) and reports per-rank peaks in the simulator's unit.
With `record_timeline` on, a StepRecorder (timeline.py) times every action of the step; `timeline()` returns them.

Extras crossing a boundary (EPAS sends the anchor layer's Q/K beside the hidden states) are described by a
`BoundaryExtras` object given to `Pipeline.set_boundary_extras`; its `specs` are asked again at every step,
so what crosses a boundary may change between optimizer steps. At the start of every step the ranks compare a
hash of the boundary signatures (one tiny all-reduce) and all raise the same clear error if they disagree.
"""

from __future__ import annotations

import contextlib
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from effdist.model.gpt import gpt_chunk_builder
from effdist.pipeline.chunks import ChunkLayout, build_model_chunks, chunk_layout
from effdist.pipeline.ir import BW, B, F, W, Action, Schedule
from effdist.pipeline.memory_probe import LAYERS, ActivationProbe
from effdist.pipeline.p2p import (
    ACTIVATION,
    GRADIENT,
    CommPlan,
    PipelineCommError,
    Signature,
    StepTransfers,
    check_tensors,
    describe_signature,
)
from effdist.pipeline.schedules import build_schedule, check_untied_embeddings
from effdist.pipeline.simulate import Timing
from effdist.pipeline.timeline import StepRecorder
from effdist.pipeline.wgrad import SPLIT_LINEARS, WEIGHT_GRAD_STORE
from effdist.protocols import NO_EXTRAS, BoundaryExtras, ContextExtras, PipelineError, TensorSpec
from effdist.runtime.distributed import all_gather_single

__all__ = ["Pipeline", "PipelineError", "PipelineCommError", "BoundaryExtras", "ContextExtras", "TensorSpec",
           "build_pipeline"]


# PipelineError, BoundaryExtras, ContextExtras and NO_EXTRAS are the boundary interface (effdist.protocols),
# which features implement without importing the executor; imported here, where they have always been found.


# ---------------------------------------------------------------------------------------------- pipeline

@dataclass
class _StepState:
    microbatches: Sequence[dict]
    tokens_in_global_batch: float
    signatures: list[Signature]
    transfers: StepTransfers
    inputs: dict
    outputs: dict
    local: dict
    freed: set
    loss_sum: torch.Tensor
    received: dict = field(default_factory=dict)  # action -> its incoming P2P tensors, taken just before it runs


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def _free_data(t: torch.Tensor) -> None:
    """Release the memory of a sent output whose graph must survive until B (megatron's trick)."""
    t.data = torch.empty((1,), device=t.device, dtype=t.dtype)


def _run_backward(tensors: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], freed: bool) -> None:
    if not tensors:
        return
    if not freed:
        torch.autograd.backward(list(tensors), list(grads))
        return
    # torch.autograd.backward checks grad shapes against the (freed) data; the engine checks against the graph.
    from torch.autograd.variable import Variable

    Variable._execution_engine.run_backward(tuple(tensors), tuple(grads), False, False, (), allow_unreachable=True,
                                            accumulate_grad=True)


class Pipeline:
    """One rank's part of a pipeline: its model chunks and the executor of its action lists.

    Trainer protocol: `model_chunks` (unwrapped, forward order) -> wrap each in megatron DDP ->
    `set_wrapped_chunks(ddp_chunks)` -> per step ``forward_backward(microbatches, tokens_in_global_batch)`` ->
    `memory_metrics()`. Set `record_timeline` (on every rank of the pipeline) to time each action of the following
    steps; `timeline()` gives the last recorded step.
    """

    def __init__(self, *, schedule_name: str, layout: ChunkLayout, chunks: Sequence[torch.nn.Module], pp_rank: int,
                 group, global_ranks: Sequence[int], device: torch.device, dtype: torch.dtype, hidden_size: int,
                 tp: int = 1, sequence_parallel: bool = False, timeout_s: float = 600.0, chunks_per_rank: int = 2,
                 measure_memory: bool = True):
        self.schedule_name = schedule_name
        self.layout = layout
        self.pp = layout.placement.pp
        self.pp_rank = pp_rank
        self.chunk_ids = layout.chunks_of(pp_rank)
        if len(chunks) != len(self.chunk_ids):
            raise PipelineError(f"pipeline rank {pp_rank} holds chunks {list(self.chunk_ids)} but got {len(chunks)} models")
        self.model_chunks = list(chunks)
        self._run = dict(zip(self.chunk_ids, self.model_chunks))
        self._raw = dict(zip(self.chunk_ids, self.model_chunks))
        self.group = group
        self.global_ranks = list(global_ranks)
        self.device = device
        self.dtype = dtype
        self.hidden_size = hidden_size
        self.tp = tp
        self.sequence_parallel = sequence_parallel
        self.timeout_s = timeout_s
        self.chunks_per_rank = chunks_per_rank
        self.extras: BoundaryExtras = NO_EXTRAS
        self._schedules: dict[int, Schedule] = {}
        self._fixed_schedule: Optional[Schedule] = None
        self._plans: dict[int, CommPlan] = {}
        # The probe's saved-tensor hooks cost Python time per saved tensor: switch `measure_memory` off for
        # timing runs (memory_metrics then keeps the last measured step's values).
        self.measure_memory = measure_memory
        self.probe: Optional[ActivationProbe] = None
        if measure_memory:
            self.probe = ActivationProbe()
            from megatron.core.transformer.transformer_block import TransformerBlock

            self.probe.watch(self.model_chunks, (TransformerBlock,))
        self._probing = False
        self._p2p_warm = False
        self._metrics: dict[str, Any] = {}
        self.last_schedule: Optional[Schedule] = None
        # Per-action timing (timeline.py); off by default: it adds a barrier and a device synchronize per step.
        self.record_timeline = False
        self._timeline: Optional[list[Timing]] = None

    # ------------------------------------------------------------------ configuration
    def set_wrapped_chunks(self, wrapped: Sequence[torch.nn.Module]) -> None:
        """Run the forwards through these wrappers (megatron DDP) of `model_chunks`, in the same order."""
        if len(wrapped) != len(self.model_chunks):
            raise PipelineError(f"set_wrapped_chunks: got {len(wrapped)} modules for {len(self.model_chunks)} chunks")
        for w, raw in zip(wrapped, self.model_chunks):
            if _unwrap(w) is not raw:
                raise PipelineError("set_wrapped_chunks: the wrappers must wrap pipeline.model_chunks, in order")
            ddp_cfg = getattr(w, "ddp_config", None)
            if ddp_cfg is not None and getattr(ddp_cfg, "overlap_grad_reduce", False):
                raise PipelineError("megatron DDP with overlap_grad_reduce=True would reduce gradients before the "
                                    "deferred weight-gradient (W) actions ran; wrap the chunks with "
                                    "overlap_grad_reduce=False")
        self._run = dict(zip(self.chunk_ids, wrapped))

    def set_boundary_extras(self, extras: Optional[BoundaryExtras]) -> None:
        """What crosses chunk boundaries besides the hidden states, from the next step on (None: nothing)."""
        self.extras = extras or NO_EXTRAS

    def set_schedule(self, schedule: Optional[Schedule]) -> None:
        """Run this exact Schedule (any microbatch count must then match it); None goes back to generating
        `schedule_name` for each step's microbatch count."""
        if schedule is not None:
            schedule.validate()
            if schedule.placement.rank_of_chunk != self.layout.placement.rank_of_chunk:
                raise PipelineError(f"schedule {schedule.name} places chunks as {schedule.placement.rank_of_chunk}, but "
                                    f"this pipeline's chunks were built for {self.layout.placement.rank_of_chunk}")
        self._fixed_schedule = schedule

    def schedule_for(self, microbatches: int) -> Schedule:
        if self._fixed_schedule is not None:
            if self._fixed_schedule.num_microbatches != microbatches:
                raise PipelineError(f"the fixed schedule {self._fixed_schedule.name} has "
                                    f"{self._fixed_schedule.num_microbatches} microbatches; this step has {microbatches}")
            return self._fixed_schedule
        if microbatches not in self._schedules:
            cpr = self.chunks_per_rank if self.schedule_name == "interleaved" else 2
            schedule = build_schedule(self.schedule_name, self.pp, microbatches, chunks_per_rank=cpr)
            if schedule.placement.rank_of_chunk != self.layout.placement.rank_of_chunk:
                raise PipelineError(f"{self.schedule_name} with {microbatches} microbatches places chunks differently "
                                    "from the chunks this pipeline was built with")
            self._schedules[microbatches] = schedule
        return self._schedules[microbatches]

    def _plan(self, schedule: Schedule) -> CommPlan:
        key = id(schedule)
        if key not in self._plans:
            self._plans[key] = CommPlan.build(schedule, self.pp_rank)
        return self._plans[key]

    # ------------------------------------------------------------------ signatures
    def hidden_spec(self, microbatch: dict) -> TensorSpec:
        mb, seq = microbatch["tokens"].shape
        if self.sequence_parallel:
            seq //= self.tp
        return TensorSpec((seq, mb, self.hidden_size), self.dtype)

    def _signatures(self, hidden: TensorSpec) -> list[Signature]:
        return [(hidden,) + tuple(self.extras.specs(b, hidden)) for b in range(self.layout.num_chunks - 1)]

    def _agree_on_signatures(self, signatures: list[Signature], schedule: Schedule) -> None:
        """Every rank must expect the same tensors at every boundary; otherwise all raise the same error."""
        text = repr((schedule.name, schedule.num_microbatches, self.record_timeline,
                     [[(s.shape, str(s.dtype), s.requires_grad) for s in sig] for sig in signatures]))
        h = zlib.crc32(text.encode())
        t = torch.tensor([h, -h], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) == -int(t[1]):
            return
        views: list = [None] * self.pp
        dist.all_gather_object(views, (schedule.name, schedule.num_microbatches,
                                       [describe_signature(s) for s in signatures], self.record_timeline),
                               group=self.group)
        lines = []
        for b in range(len(signatures)):
            seen = {r: v[2][b] if b < len(v[2]) else "-" for r, v in enumerate(views)}
            if len(set(seen.values())) > 1:
                lines.append(f"boundary {b} -> {b + 1}: " + "; ".join(f"rank {r} expects {s}" for r, s in seen.items()))
        if lines:
            raise PipelineCommError("pipeline ranks disagree about what crosses the chunk boundaries this step: "
                                    + " | ".join(lines)
                                    + ". BoundaryExtras.specs must give the same answer on every rank.")
        raise PipelineCommError("pipeline ranks disagree about this step: "
                                + " | ".join(f"rank {r} runs {v[0]} with {v[1]} microbatches, record_timeline={v[3]}"
                                             for r, v in enumerate(views))
                                + ". Every rank must run the same schedule and microbatch count, and set "
                                "record_timeline alike.")

    # ------------------------------------------------------------------ one step
    def forward_backward(self, microbatches: Sequence[dict], tokens_in_global_batch: float) -> torch.Tensor:
        """Forward and backward of this step's microbatches; returns this rank's summed (unnormalised) loss:
        the sum over microbatches of (per-token loss x loss_mask) on the rank holding the last chunk, 0 elsewhere."""
        if not microbatches:
            raise PipelineError("forward_backward got no microbatches")
        shapes = {tuple(mb["tokens"].shape) for mb in microbatches}
        if len(shapes) != 1:
            raise PipelineError(f"all microbatches of a step must have one shape; got {sorted(shapes)}")
        schedule = self.schedule_for(len(microbatches))
        self.last_schedule = schedule
        hidden = self.hidden_spec(microbatches[0])
        signatures = self._signatures(hidden)
        self._agree_on_signatures(signatures, schedule)
        plan = self._plan(schedule)
        if not self._p2p_warm:
            self._warm_up_p2p(plan, hidden)
            self._p2p_warm = True
        recorder = StepRecorder(self.pp_rank, self.device, self.group) if self.record_timeline else None
        if recorder is not None:
            self._timeline = None
            recorder.begin()  # a barrier of the pipeline group: every rank's time origin (timeline.py)

        store = WEIGHT_GRAD_STORE
        if store.pending_keys():
            store.clear()  # left over from a step that failed
        self._probing = self.probe is not None and self.measure_memory
        if self._probing:
            self.probe.exclude_model_state(self.model_chunks)
            self.probe.reset()
            store.on_defer = self.probe.hold
        transfers = StepTransfers(plan, signatures, self.group, self.global_ranks, self.device,
                                  self.timeout_s)
        state = _StepState(microbatches, tokens_in_global_batch, signatures, transfers, {}, {}, {}, set(),
                           torch.zeros((), dtype=torch.float32, device=self.device))
        actions = schedule.actions[self.pp_rank]
        position = -1
        try:
            transfers.advance()
            for position, action in enumerate(actions):
                incoming = plan.recv_for.get(action)
                if incoming is not None:
                    # Before the action starts: a wait for the peer is idle time in a recorded timeline, as in
                    # the simulator, not part of the action.
                    state.received[action] = transfers.take(incoming)
                if recorder is None:
                    self._execute(action, schedule, state)
                else:
                    recorder.start()
                    self._execute(action, schedule, state)
                    recorder.stop(action)
                transfers.advance()
                self._release_sent(state)
            position = len(actions)
            transfers.finish()
            leftover = store.pending_keys()
            if leftover:
                raise PipelineError(f"weight gradients of {leftover} were queued by B but no W ran them")
        except PipelineCommError as e:
            self._abandon(state)
            raise PipelineCommError(f"{e} [schedule {schedule.name}, action position {position}]") from e
        except Exception as e:
            self._abandon(state)
            where = (f"action {actions[position]} (position {position} of {len(actions)})" if 0 <= position < len(actions)
                     else "the end of the step")
            raise PipelineError(f"pipeline rank {self.pp_rank}, schedule {schedule.name}: {where} failed: "
                                f"{type(e).__name__}: {e}") from e
        finally:
            store.on_defer = None
        if self._probing:
            self._collect_memory_metrics(state)
        if recorder is not None:
            self._timeline = recorder.timings()
        return state.loss_sum

    def timeline(self) -> list[Timing]:
        """This rank's actions of the last step run with `record_timeline` on, in execution order: Timing(action,
        rank, start, end), seconds since the step start (see timeline.py; `timeline.gather_timings` collects all
        ranks')."""
        if self._timeline is None:
            raise PipelineError("no recorded step: set pipeline.record_timeline = True on every pipeline rank, then "
                                "run forward_backward")
        return list(self._timeline)

    def _warm_up_p2p(self, plan: CommPlan, hidden: TensorSpec) -> None:
        """One exchange with every peer, all ranks at once. NCCL connects a pair on its first P2P operation and
        blocks the caller until the peer joins; with receives posted early, a rank could sit there while its peer
        computes (seen to hang on H200s). Connecting here, where every rank arrives together, avoids that."""
        peers = sorted({msg.dst if msg.src == self.pp_rank else msg.src for _, msg in plan.posts})
        ops, keep = [], []
        for peer in peers:
            out = torch.zeros(hidden.shape, dtype=hidden.dtype, device=self.device)
            into = torch.empty(hidden.shape, dtype=hidden.dtype, device=self.device)
            keep += [out, into]
            ops.append(dist.P2POp(dist.isend, out, self.global_ranks[peer], self.group))
            ops.append(dist.P2POp(dist.irecv, into, self.global_ranks[peer], self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _abandon(self, state: _StepState) -> None:
        WEIGHT_GRAD_STORE.clear()
        state.transfers.abandon()
        state.inputs.clear()
        state.outputs.clear()
        state.local.clear()
        state.received.clear()

    def _execute(self, action: Action, schedule: Schedule, state: _StepState) -> None:
        if action.kind is F:
            self._forward(action, schedule, state)
        elif action.kind in (B, BW):
            self._backward(action, schedule, state)
        elif action.kind is W:
            key = (action.chunk, action.microbatch)
            if WEIGHT_GRAD_STORE.has(key):
                WEIGHT_GRAD_STORE.run(key)
        else:  # pragma: no cover - ActionKind has four members
            raise PipelineError(f"unknown action kind {action.kind}")

    def _forward(self, action: Action, schedule: Schedule, state: _StepState) -> None:
        c, m = action.chunk, action.microbatch
        last = c == schedule.num_chunks - 1
        model, raw = self._run[c], self._raw[c]
        mb = state.microbatches[m]
        dev = self.device
        inputs: tuple[torch.Tensor, ...] = ()
        if c > 0:
            sig = state.signatures[c - 1]
            if schedule.is_local(c - 1, c):
                received = tuple(t.detach() for t in state.local.pop((ACTIVATION, c - 1, m)))
            else:
                received = state.received.pop(action)
            inputs = tuple(t.requires_grad_(s.requires_grad and t.is_floating_point()) for t, s in zip(received, sig))
        probe = self.probe.forward((c, m)) if self._probing else contextlib.nullcontext()
        with probe:
            kwargs: dict[str, Any] = {}
            if c == 0:
                args = (mb["tokens"].to(dev, non_blocking=True), mb["position_ids"].to(dev, non_blocking=True), None)
            else:
                hidden, kwargs = self.extras.consume(c, raw, inputs[0], inputs[1:])
                raw.set_input_tensor(hidden)
                args = (None, None, None)
            if last:
                labels = mb["labels"].to(dev, non_blocking=True)
                mask = mb["loss_mask"].to(dev, non_blocking=True).float()
                per_token = model(*args, labels=labels, **kwargs)
                loss_sum = (per_token.float() * mask).sum()
                state.loss_sum += loss_sum.detach()
                outputs: tuple[torch.Tensor, ...] = (loss_sum / state.tokens_in_global_batch,)
            else:
                hidden_out = model(*args, **kwargs)
                outputs = (hidden_out,) + tuple(self.extras.emit(c, raw, hidden_out))
                check_tensors(outputs, state.signatures[c], f"pipeline rank {self.pp_rank}: chunk {c} microbatch {m}")
        if c > 0:
            raw.set_input_tensor(None)
        state.inputs[(c, m)] = inputs
        state.outputs[(c, m)] = outputs
        if not last:
            if schedule.is_local(c, c + 1):
                state.local[(ACTIVATION, c, m)] = outputs
            else:
                for msg in state.transfers.plan.sends_of.get(action, ()):
                    state.transfers.ready(msg, outputs)

    def _backward(self, action: Action, schedule: Schedule, state: _StepState) -> None:
        c, m = action.chunk, action.microbatch
        key = (c, m)
        outputs = state.outputs.pop(key)
        if c == schedule.num_chunks - 1:
            tensors, grads = [outputs[0]], [None]
        else:
            sig = state.signatures[c]
            if schedule.is_local(c, c + 1):
                received = state.local.pop((GRADIENT, c, m))
            else:
                received = state.received.pop(action)
            with_grad = [o for o, s in zip(outputs, sig) if s.requires_grad]
            pairs = [(o, g) for o, g in zip(with_grad, received) if o.requires_grad]
            tensors, grads = [p[0] for p in pairs], [p[1] for p in pairs]
        defer = WEIGHT_GRAD_STORE.deferring(key) if action.kind is B else contextlib.nullcontext()
        with defer:
            _run_backward(tensors, grads, freed=key in state.freed)
        state.freed.discard(key)
        if action.kind is B and self._probing:
            self.probe.after_backward_input(key)
        del outputs, tensors, grads
        if c > 0:
            inputs = state.inputs.pop(key)
            sig = state.signatures[c - 1]
            input_grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t)
                                for t, s in zip(inputs, sig) if s.requires_grad)
            del inputs
            if schedule.is_local(c - 1, c):
                state.local[(GRADIENT, c - 1, m)] = input_grads
            else:
                for msg in state.transfers.plan.sends_of.get(action, ()):
                    state.transfers.ready(msg, input_grads)
        else:
            state.inputs.pop(key, None)

    def _release_sent(self, state: _StepState) -> None:
        """Free the data of hidden states whose send completed (their graph stays for B)."""
        for msg in state.transfers.completed_sends():
            if msg.direction != ACTIVATION or self.extras.may_save_hidden:
                continue
            key = (msg.boundary, msg.microbatch)
            outputs = state.outputs.get(key)
            if not outputs:
                continue
            hidden = outputs[0]
            if hidden.grad_fn is None or hidden._base is not None or hidden.is_leaf:
                continue
            input_ptrs = {t.untyped_storage().data_ptr() for t in state.inputs.get(key, ())}
            if hidden.untyped_storage().data_ptr() in input_ptrs:
                continue
            _free_data(hidden)
            state.freed.add(key)

    # ------------------------------------------------------------------ memory
    def _collect_memory_metrics(self, state: _StepState) -> None:
        probe = self.probe
        assert probe is not None
        mb0_layers = float(sum(probe.layer_bytes_of((c, 0)) for c in self.chunk_ids))
        b_frees = probe.b_frees()
        allocated = float(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else 0.0
        local = torch.tensor([float(probe.peak[LAYERS]), float(probe.peak["total"]), mb0_layers, allocated,
                              -1.0 if b_frees is None else b_frees], dtype=torch.float64, device=self.device)
        gathered = torch.empty(self.pp * local.numel(), dtype=torch.float64, device=self.device)
        all_gather_single(gathered, local, group=self.group)
        rows = gathered.view(self.pp, -1).cpu().tolist()
        unit = sum(r[2] for r in rows) / self.pp
        fractions = [r[4] for r in rows if r[4] >= 0]
        self._metrics = {
            "pipeline_peak_activation_units": [r[0] / unit if unit else 0.0 for r in rows],
            "pipeline_peak_activation_bytes": [r[1] for r in rows],
            "pipeline_activation_unit_bytes": unit,
        }
        if fractions:
            self._metrics["pipeline_b_frees"] = sum(fractions) / len(fractions)
        if self.device.type == "cuda":
            self._metrics["pipeline_peak_allocated_bytes"] = [r[3] for r in rows]

    def memory_metrics(self) -> dict[str, Any]:
        """Per-rank activation peaks of the last step (lists indexed by pipeline rank; see memory_probe.py):
        ``pipeline_peak_activation_units`` (decoder-layer activations, in the simulator's unit),
        ``pipeline_peak_activation_bytes`` (everything saved for backward, embedding and loss included),
        ``pipeline_activation_unit_bytes``, ``pipeline_b_frees`` (for split schedules) and, on GPU,
        ``pipeline_peak_allocated_bytes`` (torch.cuda.max_memory_allocated)."""
        return dict(self._metrics)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


# ---------------------------------------------------------------------------------------------- building

def build_pipeline(cfg, runtime, *, schedule: Optional[Schedule] = None, measure_memory: Optional[bool] = None,
                   init: str = "auto") -> Pipeline:
    """This rank's Pipeline for `cfg` (parallel.pp > 1, pipeline.schedule, pipeline.chunks_per_rank).

    `measure_memory`: install the activation-memory probe; None follows pipeline.measure_memory (off by default:
    its hooks and per-step all-gather cost step time).

    `runtime` is effdist.runtime.distributed.Runtime (device, dtype, pp_rank, is_logging_rank). A given `schedule`
    replaces the generated one (its placement decides the chunks).
    """
    from megatron.core import parallel_state

    check_untied_embeddings(cfg.model)
    pp = cfg.parallel.pp
    name = cfg.pipeline.schedule
    if schedule is None:
        microbatches = cfg.pipeline.microbatches or cfg.microbatches_per_step(runtime.world_size)
        cpr = cfg.pipeline.chunks_per_rank if name == "interleaved" else 2
        schedule = build_schedule(name, pp, microbatches, chunks_per_rank=cpr)
        fixed = None
    else:
        fixed = schedule
    layout = chunk_layout(cfg.model.num_layers, schedule.placement)
    build_chunk = gpt_chunk_builder(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, runtime.dtype, runtime.device)
    chunks = build_model_chunks(build_chunk, layout, runtime.pp_rank,
                                runtime.device, cfg.train.seed, SPLIT_LINEARS, init=init)
    group = parallel_state.get_pipeline_model_parallel_group()
    if getattr(runtime, "is_logging_rank", True):
        print(f"[effdist] pipeline {schedule.name}: pp={pp}, {layout.num_chunks} chunks\n"
              + "\n".join("[effdist]   " + line for line in layout.describe().splitlines()), file=sys.stderr, flush=True)
    pipeline = Pipeline(schedule_name=name, layout=layout, chunks=chunks, pp_rank=runtime.pp_rank, group=group,
                        global_ranks=dist.get_process_group_ranks(group), device=runtime.device, dtype=runtime.dtype,
                        hidden_size=cfg.model.hidden_size, tp=cfg.parallel.tp,
                        sequence_parallel=cfg.parallel.sequence_parallel, timeout_s=cfg.parallel.timeout_s,
                        chunks_per_rank=cfg.pipeline.chunks_per_rank,
                        measure_memory=cfg.pipeline.measure_memory if measure_memory is None else measure_memory)
    if fixed is not None:
        pipeline.set_schedule(fixed)
    else:
        pipeline._schedules[schedule.num_microbatches] = schedule
    return pipeline
