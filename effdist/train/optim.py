"""AdamW with fp32 master weights, the LR schedule, and the global gradient norm.

Gradients arrive in megatron DDP's fp32 ``main_grad`` buffers (already reduced over data-parallel
ranks). The optimizer keeps fp32 master copies of bf16 model weights, runs torch AdamW on them
(fused kernel on GPU), and copies the result back into the model. On CPU the model is fp32 and the
master copy *is* the model parameter.

The gradient norm is written here rather than taken from megatron because megatron's clip_grads
allocates on "cuda" unconditionally; a weight replicated over tensor-parallel ranks (norms) is
counted once, a sharded one on every rank, and the sum of squares is reduced over the
model-parallel group, so every rank sees the same norm.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from effdist.config import OptimConfig
from effdist.runtime.grads import accumulated_grad


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine/linear decay."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.decay == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def _is_replica_on_this_tp_rank(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """True where this rank's copy of `param` must be counted in the global norm."""
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


class MasterWeightAdamW:
    """torch AdamW over fp32 master weights of one rank's model chunks."""

    def __init__(self, model_params: list[torch.nn.Parameter], optim: OptimConfig, *, fused: bool,
                 tp_rank: int, model_parallel_group=None, dp_group=None, shard_over_dp: bool = False):
        self.cfg = optim
        self.model_params = list(model_params)
        self.tp_rank = tp_rank
        self.model_parallel_group = model_parallel_group
        # ZeRO-1: with shard_over_dp each data-parallel rank keeps the fp32 master and Adam state of only
        # the weights it owns, updates those, and broadcasts them to the other DP ranks after the step.
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if shard_over_dp and dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if self.dp_size > 1 else 0
        self.owner = _balanced_owners([p.numel() for p in self.model_params], self.dp_size)
        self.master_params: list[torch.nn.Parameter | None] = []
        for i, p in enumerate(self.model_params):
            if self.owner[i] != self.dp_rank:
                self.master_params.append(None)
            elif p.dtype == torch.float32:
                self.master_params.append(p)
            else:
                self.master_params.append(torch.nn.Parameter(p.detach().float().clone()))
        owned = [(m, p) for m, p in zip(self.master_params, self.model_params) if m is not None]
        # Norm and bias vectors are not decayed (as in Megatron-LM and torchtitan).
        groups = [{"params": [m for m, p in owned if p.ndim >= 2], "weight_decay": optim.weight_decay},
                  {"params": [m for m, p in owned if p.ndim < 2], "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                       fused=fused)
        self._master_of = {id(p): m for p, m in zip(self.model_params, self.master_params) if m is not None}
        # master weight -> function giving the contiguous pieces of a tensor shaped like it that train
        # (the rest is frozen: see freeze_rows).
        self._trainable_pieces: dict[torch.Tensor, Callable[[torch.Tensor], list[torch.Tensor]]] = {}
        self._step_tensor_cache: dict[int, tuple] = {}

    # ------------------------------------------------------------------ rows AdamW must not touch
    def freeze_rows(self, model_param: torch.nn.Parameter,
                    trainable_pieces: Callable[[torch.Tensor], list[torch.Tensor]]) -> bool:
        """From the next step on, AdamW updates only ``trainable_pieces(t)`` of `model_param` -- contiguous
        views of a tensor shaped like it, applied alike to the master weight, its gradient and its moments --
        and leaves the rest exactly as it is: no weight decay, no moment decay (EPAS sharing layers' Wq/Wk
        rows, whose gradient is zero). Returns False where this optimizer cannot (torch's unfused AdamW):
        then the caller must restore those rows itself."""
        if not self.inner.defaults.get("fused"):
            return False
        master = self._master_of.get(id(model_param))
        if master is not None:  # else another data-parallel rank updates it (and freezes the same rows)
            self._trainable_pieces[master] = trainable_pieces
        return True

    def unfreeze_rows(self, model_param: torch.nn.Parameter) -> None:
        master = self._master_of.get(id(model_param))
        self._trainable_pieces.pop(master, None)

    @torch.no_grad()
    def _step_with_frozen_rows(self) -> None:
        """torch's fused AdamW kernel, as torch.optim.AdamW(fused=True).step() calls it, over the trainable
        pieces of partly frozen weights and the whole of the others (the same arithmetic per element)."""
        for index, group in enumerate(self.inner.param_groups):
            tensors = self._frozen_step_tensors(index, group)
            if tensors is None:
                continue
            params, grads, exp_avgs, exp_avg_sqs, steps, counters = tensors
            torch._foreach_add_(counters, 1)  # once per weight, shared by its pieces (the whole tensor's counter)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
                                beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                amsgrad=False, maximize=False, grad_scale=None, found_inf=None)

    def _frozen_step_tensors(self, index: int, group: dict):
        """The kernel's tensor lists for one param group, cached: cutting a LLaMA-1B's 12 sharing layers into
        per-group pieces every step cost more CPU time than the GPU time it saved. Rebuilt when a gradient or
        state tensor is another object, or freeze_rows/unfreeze_rows changed the pieces."""
        masters = [m for m in group["params"] if m.grad is not None]
        for master in masters:
            self._ensure_state_of(master)
        key = (tuple((id(m), id(f)) for m, f in self._trainable_pieces.items()),
               tuple((id(m), id(m.grad), *(id(self.inner.state[m][k]) for k in ("exp_avg", "exp_avg_sq", "step")))
                     for m in masters))
        cached = self._step_tensor_cache.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
        for master in masters:
            state = self.inner.state[master]
            whole = (master, master.grad, state["exp_avg"], state["exp_avg_sq"])
            pieces = self._trainable_pieces.get(master)
            for part in ([whole] if pieces is None else zip(*(pieces(t) for t in whole))):
                for out, t in zip(lists, (*part, state["step"])):
                    out.append(t)
            lists[5].append(state["step"])
        tensors = lists if masters else None
        self._step_tensor_cache[index] = (key, tensors)
        return tensors

    # ------------------------------------------------------------------ helpers for features
    def master_of(self, model_param: torch.nn.Parameter) -> torch.nn.Parameter:
        """The fp32 tensor the optimizer updates for `model_param` (itself when fp32, or when another
        data-parallel rank owns it: then this rank only receives the updated weight)."""
        return self._master_of.get(id(model_param), model_param)

    def state_of(self, model_param: torch.nn.Parameter) -> dict:
        return self.inner.state.get(self.master_of(model_param), {})

    def reload_master_from_model(self) -> None:
        """After model weights were replaced (init_from), make the fp32 masters match them again."""
        with torch.no_grad():
            for p, m in zip(self.model_params, self.master_params):
                if m is not None and p is not m:
                    m.copy_(p)

    # ------------------------------------------------------------------ the step
    def _grads(self):
        for p in self.model_params:
            yield p, accumulated_grad(p)

    def collect_grads(self) -> None:
        """Point each master weight's .grad at the reduced fp32 gradient of its model weight."""
        for p, m in zip(self.model_params, self.master_params):
            if m is None:
                continue
            g = accumulated_grad(p)
            m.grad = None if g is None else (g if g.dtype == torch.float32 else g.float())

    def grad_norm(self) -> float:
        # Per-tensor norms in one multi-tensor pass (fp32 accumulation), combined in fp64. Squaring every
        # element in fp64 instead cost ~13 ms of a 125 ms LLaMA-1B step on an H100 (three passes over an
        # fp64 copy of every gradient).
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p, g in self._grads():
            if g is None or not _is_replica_on_this_tp_rank(p, self.tp_rank):
                continue
            by_device.setdefault((g.device, g.dtype), []).append(g.detach())
        device = next(iter(by_device))[0] if by_device else (
            self.model_params[0].device if self.model_params else torch.device("cpu"))
        sq = torch.zeros((), dtype=torch.float64, device=device)
        for (dev, dtype), grads in by_device.items():
            if dtype == torch.float32:
                norms = torch._foreach_norm(grads, 2)
            else:  # bf16/fp16 gradients: accumulate in fp32, not in their own precision
                norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
            sq = sq + torch.stack(norms).double().pow(2).sum().to(device)
        if self.model_parallel_group is not None and dist.get_world_size(self.model_parallel_group) > 1:
            dist.all_reduce(sq, group=self.model_parallel_group)
        return float(sq.sqrt())

    def clip(self, norm: float) -> None:
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            scale = self.cfg.clip_grad / (norm + 1e-6)
            for m in self.master_params:
                if m is not None and m.grad is not None:
                    m.grad.mul_(scale)

    def step(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr
        if self._trainable_pieces:
            self._step_with_frozen_rows()
        else:
            self.inner.step()
        with torch.no_grad():
            for p, m in zip(self.model_params, self.master_params):
                if m is not None and p is not m:
                    p.copy_(m)
        for m in self.master_params:
            if m is not None:
                m.grad = None
        if self.dp_size > 1:
            self._broadcast_owned_weights()

    def zero_grads(self) -> None:
        for m in self.master_params:
            if m is not None:
                m.grad = None

    def _broadcast_owned_weights(self) -> None:
        """Each owner sends its freshly updated weights to the other DP ranks, one flat broadcast per owner."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for owner in range(self.dp_size):
            params = [p for p, o in zip(self.model_params, self.owner) if o == owner]
            if not params:
                continue
            flat = _flatten_dense_tensors([p.data for p in params])
            dist.broadcast(flat, src=dist.get_global_rank(self.dp_group, owner), group=self.dp_group)
            if owner != self.dp_rank:
                for p, new in zip(params, _unflatten_dense_tensors(flat, [p.data for p in params])):
                    p.data.copy_(new)

    # ------------------------------------------------------------------ checkpointing
    def sharded_state_dict(self, model_sharded_sd: dict) -> dict:
        """Optimizer tensors sharded exactly like their model weights, so they reshard with them."""
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            make_sharded_optimizer_tensor,
        )

        id_map = get_param_id_to_sharded_param_map(model_sharded_sd, self.model_params)
        out: dict = {"param_state": {}, "step_count": self._step_count()}
        for i, (p, m) in enumerate(zip(self.model_params, self.master_params)):
            if m is None:
                continue  # another data-parallel rank owns (and saves) this weight's optimizer state
            sharded = id_map[i]
            if self.dp_size > 1:
                sharded = _as_main_replica_over_dp(sharded)
            entry = {}
            state = self.inner.state.get(m, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    entry[key] = make_sharded_optimizer_tensor(sharded, state[key], prefix=f"optimizer.state.{key}")
            if m is not p:
                entry["master"] = make_sharded_optimizer_tensor(sharded, m.data, prefix="optimizer.state.master")
            out["param_state"][i] = entry
        return out

    def _step_count(self) -> int:
        for state in self.inner.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def ensure_state(self) -> None:
        """Create zeroed Adam state so a checkpoint can be loaded into it in place."""
        for m in self.master_params:
            if m is not None:
                self._ensure_state_of(m)

    def _ensure_state_of(self, master: torch.Tensor) -> None:
        """Zeroed Adam state for `master` where it has none, as torch's AdamW would create it."""
        state = self.inner.state[master]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["step"] = torch.zeros((), dtype=torch.float32,
                                        device=master.device if self.inner.defaults.get("fused") else "cpu")

    def load_sharded_state_dict(self, loaded: dict) -> None:
        steps = int(loaded["step_count"])
        for i, (p, m) in enumerate(zip(self.model_params, self.master_params)):
            if m is None:
                continue
            entry = loaded["param_state"][i]
            state = self.inner.state[m]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in entry:
                    state[key].copy_(entry[key])
            state["step"].fill_(steps)
            with torch.no_grad():
                if "master" in entry:
                    m.data.copy_(entry["master"])
                    p.copy_(m)


def _balanced_owners(sizes: list[int], ranks: int) -> list[int]:
    """Give each weight to the least-loaded rank, largest first (deterministic on every rank)."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def _as_main_replica_over_dp(sharded):
    """The owner's copy of an optimizer tensor is the one to save: mark it replica 0 over data parallel."""
    import dataclasses

    rid = sharded.replica_id
    if isinstance(rid, tuple) and len(rid) == 3:
        return dataclasses.replace(sharded, replica_id=(rid[0], rid[1], 0))
    return dataclasses.replace(sharded, replica_id=0)
