"""The interfaces through which features (EPAS) plug into the training loop and the pipeline executor.

A leaf module (torch and typing only): the trainer and the executor call these methods and never import a
feature; a feature implements them and never imports the trainer or the executor (docs/architecture.md).

* `StepHook`: the points of one optimizer step at which a feature acts, and its checkpoint state.
* `BoundaryExtras` (with `TensorSpec`): what crosses a pipeline-chunk boundary besides the hidden states;
  `ContextExtras` is the one-tensor case carried as megatron's loop-carried ``context``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import torch


class PipelineError(RuntimeError):
    """An action of the pipeline failed; the message names the rank, the action and its position."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor crossing a pipeline boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = True

    def describe(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).replace('torch.', '')}" + ("" if self.requires_grad else " (no grad)")


class BoundaryExtras:
    """What crosses a chunk boundary besides the hidden states (default: nothing). Subclass and override.

    ``specs(boundary, hidden)``: the extra tensors going from chunk `boundary` to chunk `boundary + 1` in this
    step (called at the start of every step, on every rank, so it must give the same answer everywhere).
    ``emit(chunk, model, hidden)``: after the forward of `chunk` (not the last one), the extra tensors it sends,
    in `specs` order; they must carry autograd to whatever produced them.
    ``consume(chunk, model, hidden, extras)``: before the forward of `chunk` (not the first one): the hidden
    states to feed the chunk and keyword arguments for its GPTModel forward.
    ``may_save_hidden``: whether emit/consume may save the hidden states for backward; when False, the executor
    frees the data of hidden states it has sent (megatron's deallocate_output_tensor) once the send completed.
    """

    may_save_hidden = False

    def specs(self, boundary: int, hidden: TensorSpec) -> Sequence[TensorSpec]:
        return ()

    def emit(self, chunk: int, model: torch.nn.Module, hidden: torch.Tensor) -> Sequence[torch.Tensor]:
        return ()

    def consume(self, chunk: int, model: torch.nn.Module, hidden: torch.Tensor,
                extras: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return hidden, {}


NO_EXTRAS = BoundaryExtras()


class ContextExtras(BoundaryExtras):
    """At most one extra tensor per boundary, fed to the next chunk as megatron's loop-carried ``context``.

    TransformerBlock threads ``context`` from layer to layer but does not return it, so the producing chunk's
    tensor comes from `export(model)` (EPAS: ``effdist.model.shared_qk.pop_exported_qk``) and the consuming
    chunk gets it through ``model(..., extra_block_kwargs={"context": t})``. `specs(boundary, hidden)` returns
    the list of TensorSpec (empty or one) for each boundary this step.
    """

    def __init__(self, specs: Callable[[int, TensorSpec], Sequence[TensorSpec]],
                 export: Callable[[torch.nn.Module], Optional[torch.Tensor]]):
        self._specs = specs
        self._export = export

    def specs(self, boundary: int, hidden: TensorSpec) -> Sequence[TensorSpec]:
        out = tuple(self._specs(boundary, hidden))
        if len(out) > 1:
            raise PipelineError(f"ContextExtras: boundary {boundary} declares {len(out)} extra tensors; megatron's "
                                "context carries one (pack several into one tensor)")
        return out

    def emit(self, chunk, model, hidden):
        t = self._export(model)
        return () if t is None else (t,)

    def consume(self, chunk, model, hidden, extras):
        return hidden, ({"extra_block_kwargs": {"context": extras[0]}} if extras else {})


@runtime_checkable
class StepHook(Protocol):
    """A feature that acts at fixed points of every optimizer step (EPAS: effdist.epas.controller).

    The trainer holds a list of them (effdist.train.trainer.Trainer: EPAS when epas.enabled, then those its
    ``hooks`` argument builds) and calls every hook, in that order and on every rank, at each point:
    ``begin_step(step)`` before the step's first forward (returns a value the trainer logs in metrics.jsonl
    under ``begin_step_metric``, unless that is None: EPAS logs its region size as ``epas_region``);
    ``after_backward()`` once the gradients are reduced over data-parallel ranks, before the gradient norm;
    ``after_optimizer_step(optimizer)`` after a finite update. ``state_dict()`` goes into every checkpoint
    under the key ``name`` (EPAS: ``"epas"``; unique among the hooks) and ``load_state_dict(state)`` gets it
    back on resume. With pipeline parallelism the trainer asks each hook for ``boundary_extras(chunk_layers)``
    (the global layer indices of each chunk) and hands the executor the one that is not None.
    """

    name: str
    begin_step_metric: Optional[str]

    def begin_step(self, step: int) -> Any: ...

    def after_backward(self) -> None: ...

    def after_optimizer_step(self, optimizer) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def boundary_extras(self, chunk_layers: Sequence[Sequence[int]]) -> Optional[BoundaryExtras]: ...
