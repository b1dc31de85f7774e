"""train.engine = deepspeed: DeepSpeed ZeRO (stages 0-3, optional CPU offload) around the effdist model.

The model is the same megatron-core GPTModel the default engine trains (EPAS, sparse FFNs, TP layers);
DeepSpeed wraps it directly instead of megatron DDP and owns gradient reduction, sharding and the
optimizer step. Everything else -- data, metrics, EPAS schedule, checkpoint layout and resume -- stays
in the Trainer, which calls this object through four methods:

    train_step(microbatches, tokens_in_global_batch, lr, after_update) -> (loss, grad_norm, finite)
    save(ckpt_dir, step, common, marker) -> Path
    load(path, restore_rng) -> common
    load_model_only(path)                              (checkpoint.init_from)

What must match the default engine, and how:
- loss normalisation: each microbatch's loss is divided by the token count of the whole global batch
  and gradients are *summed* over data-parallel ranks. DeepSpeed averages over DP, so the loss handed
  to backward is multiplied by dp (exact for powers of two); its division by the accumulation steps
  is switched off (scale_wrt_gas=False).
- the optimizer: torch AdamW with effdist's hyper-parameters and weight-decay groups (no decay on 1-D
  weights); gradient clipping by DeepSpeed with the same rule (scale by clip / (norm + 1e-6) when the
  norm exceeds clip); the learning rate of effdist.train.optim.lr_at written into the param groups
  before each update.
- a non-finite loss or gradient norm skips the update (the Trainer counts and reports it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from effdist.config import DEEPSPEED_INSTALL_HINT, Config, ConfigError
from effdist.train import checkpoint as ckpt
from effdist.train.loss import masked_loss_sum

# DeepSpeed keys that effdist derives from its own config; a config_file may repeat them only with the
# same value, so a run is never described two contradictory ways.
_OWNED_KEYS = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch * data parallel size)",
    "gradient_clipping": "optim.clip_grad",
    "optimizer": "optim.* (effdist builds AdamW itself)",
    "scheduler": "optim.lr / warmup_steps / decay (effdist sets the learning rate every step)",
}
_RNG_FILE = "effdist_rng_rank{rank:05d}.pt"


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(f"train.engine = 'deepspeed': DeepSpeed is not installed ({e}); install it with "
                          f"{DEEPSPEED_INSTALL_HINT}") from None
    return deepspeed


def _merge(base: dict, extra: dict, where: str = "") -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def deepspeed_config(cfg: Config, *, dp: int, dtype: torch.dtype, is_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config of this run: derived from the effdist config, then deepspeed.config_file."""
    ds, tr = cfg.deepspeed, cfg.train
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # On CPU/gloo there is no second stream to overlap with.
        zero["overlap_comm"] = is_cuda
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": is_cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": is_cuda}
    generated: dict[str, Any] = {
        "train_batch_size": tr.global_batch,
        "train_micro_batch_size_per_gpu": tr.micro_batch,
        "gradient_accumulation_steps": tr.global_batch // (tr.micro_batch * dp),
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        # effdist's own AdamW (a torch optimizer) is handed to DeepSpeed.
        "zero_allow_untested_optimizer": True,
        # Off the GPU "offload" moves nothing; torch AdamW then avoids building DeepSpeed's CPU-Adam op.
        "zero_force_ds_cpu_optimizer": is_cuda,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        # Reduce gradients in fp32 like the default engine (megatron DDP's grad_reduce_in_fp32).
        "communication_data_type": "fp32",
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16 and ds.zero_stage == 1:
        # Accumulate microbatch gradients in fp32, as megatron DDP's main_grad does: DeepSpeed then uses its
        # BF16 optimizer. (Stages 2 and 3 ignore the setting; without ZeRO it is refused.)
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    if ds.config_file is None:
        return generated
    return _merge(generated, _user_config(cfg, generated))


def _user_config(cfg: Config, generated: dict[str, Any], unknown: tuple[str, ...] = ()) -> dict[str, Any]:
    """deepspeed.config_file, read and checked against the keys effdist derives (`unknown`: keys whose derived
    value is not known yet, not compared). Raises ConfigError naming the key."""
    ds = cfg.deepspeed
    try:
        user = json.loads(Path(ds.config_file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed.config_file = {ds.config_file!r}: cannot read it as JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config_file = {ds.config_file!r}: expected a JSON object")
    for key, effdist_key in _OWNED_KEYS.items():
        if key in unknown:
            continue
        if key in user and user[key] != generated.get(key, object()):
            raise ConfigError(f"deepspeed.config_file sets {key}={user[key]!r}, which effdist derives from "
                              f"{effdist_key} (= {generated.get(key, 'its own settings')!r}); remove it from the file")
    zero = user.get("zero_optimization", {})
    stage = zero.get("stage", ds.zero_stage) if isinstance(zero, dict) else ds.zero_stage
    if stage != ds.zero_stage:
        raise ConfigError(f"deepspeed.config_file sets zero_optimization.stage={stage}, but deepspeed.zero_stage="
                          f"{ds.zero_stage}; set the stage with deepspeed.zero_stage")
    return user


def check_config_file(cfg: Config, world_size: int | None = None) -> None:
    """Before any process starts (effdist.train.preflight): deepspeed.config_file is JSON and contradicts none of
    the keys effdist derives; the accumulation steps are compared once the world size is known."""
    if cfg.train.engine != "deepspeed" or cfg.deepspeed.config_file is None:
        return
    dp = world_size // (cfg.parallel.tp * cfg.parallel.pp) if world_size else 1
    generated = deepspeed_config(replace(cfg, deepspeed=replace(cfg.deepspeed, config_file=None)), dp=max(dp, 1),
                                 dtype=torch.float32, is_cuda=False)
    _user_config(cfg, generated, unknown=() if world_size else ("gradient_accumulation_steps",))


class _MegatronGroups:
    """The `mpu` DeepSpeed asks for process groups, answered from megatron's parallel_state.

    With pp = 1 the model-parallel group is the tensor-parallel group: DeepSpeed counts a weight that
    carries megatron's `tensor_model_parallel` flag on every rank of it, others on its rank 0 only (the
    default engine's gradient-norm rule), and broadcasts initial weights over the data-parallel group.
    """

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()


class _SkipSwitch:
    """Turns the optimizer's next step() into a no-op: how a non-finite step is skipped whatever
    DeepSpeed's own overflow check does for this stage and dtype. (An instance attribute rather than
    a subclass: DeepSpeed recognises its supported optimizers by their exact type.)"""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip = False
        step = optimizer.step

        def step_unless_skipped(*args, **kwargs):
            return None if self.skip else step(*args, **kwargs)

        optimizer.step = step_unless_skipped


def _adamw(cfg: Config, params: list[torch.nn.Parameter], *, cpu_adam: bool, fused: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    # Norm and bias vectors are not decayed, as in the default engine.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


class ShardedStateView:
    """The optimizer as EpasController sees it (master_of / inner.state, like MasterWeightAdamW), over
    the fp32 weights and Adam state that DeepSpeed ZeRO-1/2 shards over data-parallel ranks.

    `master_of(p)` gathers full copies of p's fp32 weight and Adam moments (collective over DP);
    edits made to them inside `editing()` are written back into the shards when it closes. Outside it
    they are read-only snapshots.
    """

    def __init__(self, engine):
        self.engine = engine
        self.inner = _StateMap()
        self._editing = False
        self._opened: list[tuple[torch.nn.Parameter, torch.Tensor, dict[str, torch.Tensor]]] = []

    def _adam_state_reachable(self) -> bool:
        """Whether Adam state exists yet. DeepSpeed gives each parameter its view of the flat state only
        at the first step of a process, so after a resume the loaded state is linked here first."""
        zero = self.engine.ds.optimizer
        if not zero.optimizer.state:
            return False
        zero._lazy_init_hp_params_optimizer_state()
        return True

    def master_of(self, param: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        master = safe_get_full_fp32_param(param)
        if master is None:
            raise RuntimeError(f"DeepSpeed keeps no fp32 master of a {tuple(param.shape)} parameter: EPAS under "
                               "train.engine=deepspeed needs deepspeed.zero_stage 1 or 2")
        state = {}
        if self._adam_state_reachable():
            state = {key: safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")}
        self.inner.states[id(master)] = (master, state)
        if self._editing:
            self._opened.append((param, master, state))
        return master

    def editing(self):
        view = self

        class _Editing:
            def __enter__(self):
                view._editing, view._opened = True, []
                return view

            def __exit__(self, *exc):
                from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

                view._editing = False
                if exc[0] is None:
                    for param, master, state in view._opened:
                        safe_set_full_fp32_param(param, master)
                        for key, value in state.items():
                            safe_set_full_optimizer_state(param, value, key)
                view._opened = []
                view.inner.states.clear()
                return False

        return _Editing()


class _StateMap:
    """`inner.state.get(master, {})` for ShardedStateView: the state gathered with that master copy."""

    def __init__(self):
        # id -> (the master copy, kept alive so its id is not reused; its gathered state)
        self.states: dict[int, tuple[torch.Tensor, dict]] = {}

    @property
    def state(self):
        return self

    def get(self, tensor, default=None):
        entry = self.states.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else default


class DeepSpeedEngine:
    """The effdist model under deepspeed.initialize, driven one optimizer step at a time."""

    def __init__(self, cfg: Config, runtime):
        deepspeed = import_deepspeed()
        from effdist.model.gpt import build_gpt

        self.cfg, self.runtime = cfg, runtime
        self.zero_stage = cfg.deepspeed.zero_stage
        model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, runtime.dtype, runtime.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.num_local_parameters = sum(p.numel() for p in params)
        cpu_adam = cfg.deepspeed.offload_optimizer and runtime.is_cuda
        optimizer = _adamw(cfg, params, cpu_adam=cpu_adam, fused=runtime.is_cuda and not cpu_adam)
        self._skip = _SkipSwitch(optimizer)
        self.config = deepspeed_config(cfg, dp=runtime.dp, dtype=runtime.dtype, is_cuda=runtime.is_cuda)
        # DeepSpeed reads the local rank from the environment; effdist may have resolved it from Slurm's
        # variables or run as a single process without any launcher.
        os.environ.setdefault("LOCAL_RANK", str(runtime.local_rank))
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                mpu=_MegatronGroups(), dist_init_required=False)
        if self.zero_stage == 3 and cfg.model.tie_embeddings:
            # The LM head reads the embedding's weight outside the embedding module: ZeRO-3 must gather it there too.
            deepspeed.zero.register_external_parameter(model.output_layer, model.shared_embedding_or_output_weight())
        self.model_chunks = [self.ds]
        self.optimizer = ShardedStateView(self)

    # ------------------------------------------------------------------ one step
    def _set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def _grad_norm_stage0(self) -> float:
        """Norm of the DP-reduced gradients without ZeRO (DeepSpeed clips them but does not report it)."""
        mpu = self.ds.mpu
        tp_rank = mpu.get_tensor_model_parallel_rank()
        sq = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        for p in self.ds.module.parameters():
            if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
                sq += p.grad.detach().double().pow(2).sum()
        if mpu.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(sq, group=mpu.get_tensor_model_parallel_group())
        return float(sq.sqrt())

    def train_step(self, microbatches: list[dict[str, torch.Tensor]], tokens_in_global_batch: float, lr: float,
                   after_update: Callable | None = None) -> tuple[float, float, bool]:
        """Forward, backward and (unless non-finite) update over this rank's microbatches.

        Returns the global-batch loss, the gradient norm before clipping, and whether the update was
        applied. `after_update(optimizer_view)` runs right after an applied update (EPAS row restore).
        """
        from megatron.core import parallel_state

        ds, dev = self.ds, self.runtime.device
        if len(microbatches) != ds.gradient_accumulation_steps():
            raise RuntimeError(f"{len(microbatches)} microbatches in this step, but DeepSpeed was configured for "
                               f"{ds.gradient_accumulation_steps()}")
        self._set_lr(lr)
        # DeepSpeed averages gradients over data-parallel ranks; effdist sums them.
        scale = self.runtime.dp / tokens_in_global_batch
        total = torch.zeros((), dtype=torch.float32, device=dev)
        for i, mb in enumerate(microbatches):
            loss_sum, _ = masked_loss_sum(ds, mb, dev)
            ds.backward(loss_sum * scale, scale_wrt_gas=False)
            total += loss_sum.detach()
            if i < len(microbatches) - 1:
                ds.step()  # not an accumulation boundary: only counts the microbatch
        loss_t = total.double().reshape(1)
        dist.all_reduce(loss_t, group=parallel_state.get_data_parallel_group())
        loss = float(loss_t.item()) / tokens_in_global_batch

        grad_norm = self._grad_norm_stage0() if self.zero_stage == 0 else None
        skip = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        self._skip.skip = skip
        try:
            ds.step()  # the boundary: reduce (stage 0/1), clip, update, gather (ZeRO)
        finally:
            self._skip.skip = False
        if grad_norm is None:
            reported = ds.get_global_grad_norm()
            grad_norm = float("nan") if reported is None else float(reported)
        finite = not skip and math.isfinite(grad_norm) and ds.was_step_applied()
        if finite and after_update is not None:
            with self.optimizer.editing() as view:
                after_update(view)
        return loss, grad_norm, finite

    # ------------------------------------------------------------------ checkpoints
    def _marker_extra(self) -> dict[str, Any]:
        return {"engine": "deepspeed", "zero_stage": self.zero_stage}

    def save(self, ckpt_dir: Path, step: int, common: dict[str, Any], marker: dict[str, Any]) -> Path:
        """DeepSpeed's own checkpoint files under effdist's layout (iter_N/, written as iter_N.tmp/ and
        renamed once complete, with the effdist.json marker and the `latest` file). Collective."""
        rt = self.runtime
        final = ckpt_dir / ckpt.iter_name(step)
        tmp = ckpt_dir / (ckpt.iter_name(step) + ".tmp")
        if rt.is_logging_rank:
            ckpt_dir.mkdir(exist_ok=True)  # not its parents: see checkpoint._start_save
            if tmp.exists():
                shutil.rmtree(tmp)
        dist.barrier()
        self.ds.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state={"effdist": common}, save_latest=False)
        torch.save(ckpt.rng_state(rt), tmp / _RNG_FILE.format(rank=rt.rank))
        dist.barrier()
        if rt.is_logging_rank:
            ckpt.make_visible(ckpt_dir, tmp, final, step, dict(marker, **self._marker_extra()))
        dist.barrier()
        return final

    def load(self, path: Path, restore_rng: bool = True) -> dict[str, Any]:
        """Load a checkpoint written by `save` into the engine; returns the Trainer's common state."""
        rt = self.runtime
        marker = ckpt.read_marker(path)
        if marker.get("engine") != "deepspeed":  # the command's engine, not the checkpoint, is to change: exit 2
            raise ckpt.IncompatibleCheckpointError(
                f"checkpoint {path} was written by the megatron engine (megatron dist_checkpointing format); resume "
                "it with train.engine=megatron, or start a new run directory with checkpoint.init_from="
                f"{path} to take its weights")
        layout = {"tp": rt.tp, "dp": rt.dp, "zero_stage": self.zero_stage}
        saved = {k: marker.get(k) for k in layout}
        if saved != layout:
            raise ckpt.IncompatibleCheckpointError(
                f"checkpoint {path} holds DeepSpeed shards for {saved}, this run is {layout}; resume with the same "
                "parallel.tp, number of processes and deepspeed.zero_stage (DeepSpeed's universal-checkpoint "
                "conversion, python -m deepspeed.checkpoint.ds_to_universal, is the way to another layout)")
        loaded, client = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
        if loaded is None or client is None or "effdist" not in client:
            raise ckpt.CheckpointError(f"checkpoint {path}: DeepSpeed could not load it (see the messages above)")
        rng_file = path / _RNG_FILE.format(rank=rt.rank)
        if restore_rng and rng_file.is_file():
            ckpt.set_rng_state(torch.load(rng_file, weights_only=False), rt)
        return client["effdist"]

    def load_model_only(self, path: Path, config: dict | None = None) -> Path:
        """checkpoint.init_from: model weights from a megatron dist checkpoint (a default-engine training
        checkpoint, or `effdist convert hf-to-effdist --format dist` output); the fp32 masters follow.
        A checkpoint that does not fit the model is refused before loading (ckpt.load_model_only)."""
        module = self.ds.module
        if self.zero_stage == 3:
            import deepspeed

            # Whole weights while loading; on exit data-parallel rank 0's copy (every rank loaded the same
            # one for its TP shard) is partitioned again.
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                loaded = ckpt.load_model_only(path, [module], config)
        else:
            loaded = ckpt.load_model_only(path, [module], config)
        if hasattr(self.ds.optimizer, "refresh_fp32_params"):
            self.ds.optimizer.refresh_fp32_params()
        return loaded
