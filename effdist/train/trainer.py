"""The training loop: config -> runtime -> model -> data -> steps -> metrics -> checkpoints.

One optimizer step = every microbatch of this rank's slice of the global batch, forward and backward
(through the pipeline executor when parallel.pp > 1), gradients summed over data-parallel ranks by
megatron DDP, then clip + AdamW. Each microbatch's loss is divided by the token count of the whole
global batch, so the result does not depend on how the batch is split over ranks and microbatches:
a TP=2 or DP=2 run follows a single-process run of the same global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from effdist.config import Config, ConfigError, load_config
from effdist.model.checkpoint_fit import config_changes, config_fix
from effdist.model.hf_convert import CONVERTED_MARKER
from effdist.protocols import StepHook
from effdist.runtime import lifecycle
from effdist.runtime.cli_parser import ArgumentParser
from effdist.train import checkpoint as ckpt
from effdist.train import run_dir as run_directory
from effdist.train.loss import masked_loss_sum
from effdist.train.metrics import MetricsFileError, console_line
from effdist.train.optim import MasterWeightAdamW, lr_at
from effdist.train.preflight import validate_run


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradient norms, a non-finite last step, or non-finite weights."""


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / cfg.name


# What decides which samples a step reads (megatron's dataset index is built from these): a change on resume is
# legitimate (a new data mix) but must not pass unseen.
DATA_ORDER_KEYS = ("data.kind", "data.paths", "data.weights", "data.seq_length", "data.split", "train.seed")


def resolved_data_paths(cfg: Config) -> list[str]:
    """data.paths as the files they name: a relative prefix is read from the working directory."""
    return [os.path.realpath(p) for p in cfg.data.paths]


def data_order_changes(marker: dict[str, Any], cfg: Config) -> list[tuple[str, Any, Any]]:
    """DATA_ORDER_KEYS that differ between a checkpoint's marker and `cfg`. data.paths compares the files named
    (the marker's `data_paths`, resolved when it was saved): `data/x` from the run's directory and its absolute
    path are the same data, and the same relative `data/x` from another directory is not."""
    saved, now = marker.get("config", {}), cfg.to_dict()
    if "data_paths" in marker:
        saved = {**saved, "data": {**saved.get("data", {}), "paths": marker["data_paths"]}}
        now = {**now, "data": {**now["data"], "paths": resolved_data_paths(cfg)}}
    return config_changes(saved, now, DATA_ORDER_KEYS)


def checkpoint_dir(cfg: Config, run_dir: Path) -> Path:
    """Where the run's checkpoints go: checkpoint.dir, else RUN_DIR/checkpoints."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"


def log(runtime, msg: str) -> None:
    if runtime is None or runtime.is_logging_rank:
        console_line(f"[effdist] {msg}")  # above the progress bar on a terminal


def _peak_memory_gib(runtime) -> float:
    if runtime.is_cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# What the trainer itself keeps in a checkpoint's common state; a StepHook's name must differ from these.
TRAINER_STATE_KEYS = ("step", "data", "nonfinite_in_a_row", "skipped_steps")

HookBuilder = Callable[["Trainer"], StepHook]


class Trainer:
    """The training loop of one process.

    `hooks`: builders of extra StepHooks (effdist.protocols), each called with the trainer once its model
    chunks, optimizer and runtime exist (before resuming); the trainer then calls every hook at each point of
    every step and checkpoints its state under its name, as it does for EPAS (docs/architecture.md).
    """

    def __init__(self, cfg: Config, run_dir: Path, resume: str = "auto", fresh: bool = False,
                 hooks: Sequence[HookBuilder] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.fresh = fresh  # --fresh: with --resume none, move an earlier run aside instead of refusing
        self.lock: run_directory.RunDirLock | None = None
        self.ckpt_lock: run_directory.RunDirLock | None = None  # checkpoint.dir outside the run directory
        # The newest checkpoint this run can go back to (named when the run stops on non-finite values).
        self.last_good_checkpoint: Path | None = None
        # Set when resuming moved newer checkpoints aside (rollback): recorded in metrics.jsonl as an event.
        self.rollback: dict[str, Any] | None = None
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        # SIGTERM/SIGUSR1, launcher and peer death, helpers (effdist.runtime.lifecycle).
        self.guard = lifecycle.guard()
        # train.engine=deepspeed: an object owning model wrapping, step, save and load (None: megatron DDP here).
        self.engine = None
        # The StepHooks of this run, in calling order (_build_features): EPAS when enabled, then `hooks`.
        self.hook_builders = list(hooks)
        self.hooks: list[StepHook] = []
        # Fault injection for tests and drills: steps (1-based) whose loss is made NaN.
        self._nan_steps = {int(x) for x in os.environ.get("EFFDIST_FAULT_NAN_STEPS", "").split(",") if x.strip()}
        # ... and steps after whose update one weight is set to +inf (an overflowed update).
        self._inf_weight_steps = {int(x) for x in os.environ.get("EFFDIST_FAULT_INF_WEIGHT_STEPS", "").split(",")
                                  if x.strip()}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from effdist.runtime.distributed import setup

        cfg = self.cfg
        self.ckpt_dir = checkpoint_dir(cfg, self.run_dir)
        # Before anything slow: a stop signal during setup ends the process promptly; with exit code 75 when
        # the checkpoint this run will resume from already holds everything (a requeue loses nothing).
        self.guard.install(timeout_s=cfg.parallel.timeout_s)
        self.guard.resume_point = self._planned_resume_point()
        self.guard.enter("process group setup")
        self.runtime = rt = setup(cfg)
        self._claim_run_dir()
        if rt.is_logging_rank and not (self.run_dir / "config.yaml").exists():
            # A run directory's config.yaml describes the invocation that last trained there: an earlier run's
            # is replaced in fit(), once this one has steps to train (not by one that finds nothing to do).
            self._write_config_yaml()
        log(rt, f"{rt.world_size} process(es) on {rt.device.type}/{rt.backend}: tp={rt.tp} pp={rt.pp} dp={rt.dp}, "
                f"dtype={str(rt.dtype).replace('torch.', '')}, run dir {self.run_dir}")

        self._build_data()
        self.guard.enter("model construction")
        self._build_model()
        self._build_features()
        self.guard.enter("resume")
        self._maybe_resume()
        self._build_metrics()
        self.guard.enter("the first step")

    def _write_config_yaml(self) -> None:
        path = self.run_dir / "config.yaml"
        moved = run_directory.set_aside_foreign_config(self.run_dir)
        if moved is not None:
            log(self.runtime, f"{path} was not written by effdist train (not a resolved config): moved it to {moved} "
                              "before writing this run's")
        text = self.cfg.to_yaml()
        if self.cfg.checkpoint.dir and not os.path.isabs(self.cfg.checkpoint.dir):
            # A relative checkpoint.dir is read from the working directory; the run's record names where the
            # checkpoints really went, so --resume auto (or generate) from another directory finds them.
            text = dataclasses.replace(self.cfg, checkpoint=dataclasses.replace(
                self.cfg.checkpoint, dir=os.path.abspath(self.cfg.checkpoint.dir))).to_yaml()
        if not path.is_file() or path.read_text() != text:
            tmp = path.with_name(f"config.yaml.tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)  # a reader never sees half a config

    def _planned_resume_point(self) -> str | None:
        """The checkpoint --resume will load (a cheap look before anything starts; _maybe_resume decides)."""
        if self.resume == "auto":
            complete = ckpt.list_complete(self.ckpt_dir) if self.ckpt_dir.is_dir() else []
            return str(complete[-1][1]) if complete else None
        if self.resume in ("none", "", None):
            return None
        return str(self.resume)

    def _build_data(self) -> None:
        from effdist.data.loader import MicrobatchLoader, build_train_valid_datasets, prepare_data

        cfg, rt = self.cfg, self.runtime
        # One process builds corpus, tokenizer, index caches; the others wait and then read them.
        self.guard.enter("data preparation")
        if rt.is_logging_rank:
            paths = prepare_data(cfg, self.run_dir)
        dist.barrier()
        if not rt.is_logging_rank:
            paths = prepare_data(cfg, self.run_dir, build=False)
        num_train = cfg.train.steps * cfg.train.global_batch
        num_valid = max(1, cfg.train.eval_steps * cfg.train.global_batch) if cfg.train.eval_interval else 0
        # Collective: megatron's builder writes the index caches on rank 0 and the others wait for them.
        self.guard.enter("index building")
        self.train_ds, self.valid_ds = build_train_valid_datasets(cfg, paths, num_train, num_valid)
        self.loader = MicrobatchLoader(self.train_ds, global_batch=cfg.train.global_batch,
                                       micro_batch=cfg.train.micro_batch, dp_rank=rt.dp_rank, dp_size=rt.dp)

    def _build_model(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        cfg, rt = self.cfg, self.runtime
        if cfg.train.engine == "deepspeed":
            from effdist.train.deepspeed_engine import DeepSpeedEngine

            self.engine, self.pipeline = DeepSpeedEngine(cfg, rt), None
            self.model_chunks, self.optimizer = self.engine.model_chunks, self.engine.optimizer
            log(rt, f"model {cfg.model.name} under DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}: "
                    f"{self.engine.num_local_parameters / 1e6:.2f}M parameters on rank 0, ffn={cfg.ffn.kind}")
            return
        if rt.pp > 1:
            from effdist.pipeline.executor import build_pipeline

            self.pipeline = build_pipeline(cfg, rt)
            chunks = self.pipeline.model_chunks
        else:
            from effdist.model.gpt import build_gpt

            self.pipeline = None
            chunks = [build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, rt.dtype, rt.device)]
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=False)
        self.model_chunks = [
            DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c,
                                    disable_bucketing=True if len(chunks) > 1 and i > 0 else False)
            for i, c in enumerate(chunks)
        ]
        if self.pipeline is not None:
            self.pipeline.set_wrapped_chunks(self.model_chunks)
        params = [p for c in self.model_chunks for p in c.parameters() if p.requires_grad]
        self.optimizer = MasterWeightAdamW(
            params, cfg.optim, fused=rt.is_cuda, tp_rank=rt.tp_rank,
            model_parallel_group=parallel_state.get_model_parallel_group(),
            dp_group=parallel_state.get_data_parallel_group(), shard_over_dp=cfg.optim.distributed_optimizer,
        )
        n_local = sum(p.numel() for p in params)
        log(rt, f"model {cfg.model.name}: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
                f"{n_local / 1e6:.2f}M parameters on rank 0, ffn={cfg.ffn.kind}{_precision_note(cfg)}")

    def _build_features(self) -> None:
        """The run's StepHooks: EPAS (epas.enabled), then one from each builder of the `hooks` argument."""
        rt = self.runtime
        self.hooks = []
        if self.cfg.epas.enabled:
            from effdist.epas.controller import EpasController

            from effdist.epas.schedule import describe_plan

            log(rt, describe_plan(self.cfg.epas, self.cfg.model.num_layers, self.cfg.train.steps))
            self.hooks.append(EpasController(self.cfg, [ckpt.unwrap(c) for c in self.model_chunks],
                                             optimizer=self.optimizer, log=lambda message: log(rt, message)))
        self.hooks += [build(self) for build in self.hook_builders]
        names = [hook.name for hook in self.hooks]
        clash = sorted({n for n in names if names.count(n) > 1 or n in TRAINER_STATE_KEYS})
        if clash:
            raise ValueError(f"StepHook name(s) {clash} repeat, or are among the trainer's own checkpoint keys "
                             f"{TRAINER_STATE_KEYS}: give each hook its own name")
        if self.pipeline is not None:
            # What crosses a stage boundary besides the hidden states (EPAS: Q/K, whenever the sharing region
            # spans the boundary); the executor carries one such object.
            extras = [(hook.name, e) for hook in self.hooks
                      if (e := hook.boundary_extras(self.pipeline.layout.layers)) is not None]
            if len(extras) > 1:
                raise ValueError(f"StepHooks {[name for name, _ in extras]} each send tensors across pipeline "
                                 "boundaries; the executor carries one BoundaryExtras: combine them in one hook")
            if extras:
                self.pipeline.set_boundary_extras(extras[0][1])

    def _from_rank0(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a decision only rank 0 can take, so all ranks act alike)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _claim_run_dir(self) -> None:
        """Rank 0 locks the run directory for the run's life and, for --resume none, refuses or (with
        --fresh) moves an earlier run aside; every rank learns the outcome, so all stop together."""
        rt = self.runtime
        error = None
        if rt.is_logging_rank:
            created = not self.run_dir.exists()
            try:
                self.lock = run_directory.RunDirLock(self.run_dir)
                self.lock.acquire()
                if self.ckpt_dir.resolve() != self.run_dir.resolve() / "checkpoints":
                    # checkpoint.dir elsewhere: one trainer saves there at a time, and only into its own line.
                    run_directory.check_not_a_running_runs_checkpoints(self.run_dir, self.ckpt_dir)
                    if self.ckpt_dir.resolve() != self.run_dir.resolve():
                        self._lock_checkpoint_dir()
                    if self.resume in ("auto", "none", "", None):
                        run_directory.check_checkpoint_owner(self.run_dir, self.ckpt_dir)
                elif (self.ckpt_dir / run_directory.LOCK_FILE).is_file():
                    # Another run's checkpoint.dir may name this run's checkpoints/ (it locked it there): one
                    # trainer at a time saves into it.
                    self._lock_checkpoint_dir()
                if self.resume in ("none", "", None):
                    moved = run_directory.start_over(self.run_dir, self.ckpt_dir, self.fresh)
                    if moved is not None:
                        log(rt, f"--fresh: moved the earlier run into {moved} (nothing deleted)")
                elif self.resume == "auto":
                    run_directory.check_checkpoint_dir_unchanged(self.run_dir, self.ckpt_dir)
                    moved = run_directory.continue_without_checkpoint(self.run_dir, self.ckpt_dir)
                    if moved is not None:
                        log(rt, f"no checkpoint to continue from: the records of the earlier run, which never saved, "
                                f"moved into {moved} (nothing deleted); starting at step 0")
            except run_directory.RunDirError as e:
                error = str(e)
                if created and self.lock is not None:  # refused before it began: no empty directory left behind
                    self.lock.release_and_remove_dir()
        error = self._from_rank0(error)
        if error:
            raise _agreed(run_directory.RunDirError(error))

    def _lock_checkpoint_dir(self) -> None:
        """One trainer at a time saves into a checkpoint directory outside its run directory: a lock there too."""
        self.ckpt_lock = run_directory.RunDirLock(self.ckpt_dir, what="checkpoint.dir")
        try:
            self.ckpt_lock.acquire()
        except OSError as e:  # nobody saves into a read-only one: the first save names it
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            self.ckpt_lock = None

    # ------------------------------------------------------------------ resume
    def _maybe_resume(self) -> None:
        rt = self.runtime
        path: Path | None = None
        if self.resume == "auto":
            path = self._newest_loadable()
        elif self.resume not in ("none", "", None):
            path = Path(self.resume)
            if not (path / ckpt.MARKER).is_file():
                if (path / CONVERTED_MARKER).is_file():
                    hint = f"; it is a converted model: start a run from it with --set checkpoint.init_from={path}"
                elif path.name.endswith(".tmp"):
                    hint = "; it is a save that never finished: give a complete one, or --resume auto"
                else:
                    hint = " (a checkpoint directory is an iter_NNNNNNN directory under the run's checkpoints/)"
                raise ckpt.NotACheckpointError(f"--resume {path}: not a complete effdist checkpoint directory{hint}")
            ckpt.verify(path, check_crc=self.cfg.checkpoint.verify_crc, progress=rt.is_logging_rank)
        if path is None:
            self.guard.resume_point = None
            if self.cfg.checkpoint.init_from and self.engine is not None:
                loaded = self.engine.load_model_only(Path(self.cfg.checkpoint.init_from), self.cfg.to_dict())
                log(rt, f"initialised the model from {loaded}")
            elif self.cfg.checkpoint.init_from:
                loaded = ckpt.load_model_only(Path(self.cfg.checkpoint.init_from), self.model_chunks,
                                              self.cfg.to_dict())
                self.optimizer.reload_master_from_model()
                log(rt, f"initialised the model from {loaded}")
            return
        marker = ckpt.read_marker(path)
        self._check_compatible(marker, path)
        same_layout = marker.get("tp") == rt.tp and marker.get("pp") == rt.pp and marker.get("dp") == rt.dp
        if self.engine is not None:
            common = self.engine.load(path, restore_rng=same_layout)
        elif marker.get("engine", "megatron") != "megatron":
            raise ckpt.IncompatibleCheckpointError(f"checkpoint {path} was written by the {marker['engine']} engine; "
                                                   f"resume it with train.engine={marker['engine']}")
        else:
            common = ckpt.load(path, self.model_chunks, self.optimizer, rt, restore_rng=same_layout)
        self.step = int(common["step"])
        if self.resume == "auto" and getattr(self, "_skipped_damaged", False):
            self._make_current_line(path, "fallback")
        self.loader.load_state_dict(common["data"])
        self.nonfinite_in_a_row = int(common.get("nonfinite_in_a_row", 0))
        self.skipped_steps = int(common.get("skipped_steps", 0))
        saved_epas = common.get("epas") or {}
        if saved_epas.get("sharing_layers") and not any(hook.name == "epas" for hook in self.hooks):
            raise ckpt.IncompatibleCheckpointError(
                f"checkpoint {path}: layers {saved_epas['sharing_layers']} share Q/K there (EPAS), and "
                "epas.enabled=false would switch them back to their own Q/K, whose weights stopped training at the "
                "switch: resume with --set epas.enabled=true and the epas settings "
                "the run was trained with, or start a new run from the weights (--set checkpoint.init_from=...)")
        from effdist.model.shared_qk import EpasError  # imports megatron: here, not when this module is imported

        for hook in self.hooks:
            if hook.name in common:
                try:
                    hook.load_state_dict(common[hook.name])
                except EpasError as e:  # this config's epas settings do not continue the checkpoint's schedule
                    raise ckpt.IncompatibleCheckpointError(f"checkpoint {path}: {e}") from None
        self.last_good_checkpoint = path
        self.guard.resume_point = str(path)
        log(rt, f"resumed from {path} at step {self.step}" + ("" if same_layout else
            f" (resharded from tp={marker.get('tp')} pp={marker.get('pp')} dp={marker.get('dp')})"))
        if self.resume != "auto" and self.step < self.cfg.train.steps:  # with nothing to train, nothing moves
            self._make_current_line(path, "rollback")

    def _nothing_to_do_line(self) -> str:
        """What a start with no step to train says. Where --resume named a checkpoint other than the one the run
        is at (a rollback to one at or past train.steps), the run did not move to it: that is said, with the step
        the run stays at and the train.steps that does the rollback."""
        steps = self.cfg.train.steps
        at = f"{self.step} of {steps}" if self.step == steps else f"{self.step}, past train.steps = {steps}"
        line = (f"nothing to do: the run in {self.run_dir} is already at step {at} (raise train.steps"
                f"{'' if self.step == steps else f' above {self.step}'}, or start over with --resume none --fresh or "
                "another --run-dir)")
        if self.resume in ("auto", "none", "", None):
            return line
        current = self._current_checkpoint()
        if current is None or current[1].resolve() == Path(self.resume).resolve():
            return line
        at, where = current
        path = Path(self.resume)
        rollback = path.resolve().parent == self.ckpt_dir.resolve() and self.step < at
        past = "= train.steps" if self.step == steps else f"past train.steps = {steps}"
        return (f"nothing to do: the checkpoint to {'roll back to' if rollback else 'resume from'}, --resume {path}, "
                f"is at step {self.step} {past}, so there is nothing to train after it; the run in {self.run_dir} "
                f"stays at step {at} ({where.name}), nothing moved. To train on from step {self.step}, raise "
                f"train.steps (e.g. --set train.steps={at if at > self.step else self.step + 1}) with the same "
                "--resume")

    def _current_checkpoint(self) -> tuple[int, Path] | None:
        """(step, path) of the checkpoint this run directory is at (ckpt.resolve: the one `latest` names when
        complete, else the newest complete), or None."""
        try:
            path = ckpt.resolve(self.ckpt_dir)
        except ckpt.CheckpointError:
            return None
        return next((c for c in ckpt.list_complete(self.ckpt_dir) if c[1] == path), None)

    def _make_current_line(self, path: Path, reason: str) -> None:
        """After loading `path`: move the checkpoints of this directory that are not on its line of
        history (newer ones; all of them when `path` lies elsewhere) aside, so `--resume auto` and
        retention continue from here. Rank 0 moves; the others wait."""
        rt = self.runtime
        if rt.is_logging_rank:
            inside = path.resolve().parent == self.ckpt_dir.resolve()
            keep_up_to = self.step if inside else -1
            dest, moved = run_directory.roll_back(self.ckpt_dir, keep_up_to, reason=f"{reason} to {path}")
            if moved:
                log(rt, f"{reason} to step {self.step}: moved {len(moved)} checkpoint(s) of the abandoned line aside "
                        f"into {dest} (kept): " + ", ".join(p.name for p in moved))
                self.rollback = {"reason": reason, "to": str(path),
                                 "from_step": max(int(p.name.split("_")[1].split(".")[0]) for p in moved),
                                 "moved_to": str(dest)}
            elif reason == "fallback":  # the newer checkpoint vanished: nothing to move, the event keeps the records
                self.rollback = {"reason": reason, "to": str(path), "from_step": None, "moved_to": None}
            if self.rollback is not None and self.step < self.cfg.train.steps:
                from effdist.train.metrics import append_event

                # At once after the moves, before anything else can fail or be killed: the event is what keeps
                # the abandoned line's records in metrics.jsonl (the logger keeps every record up to the newest
                # event) and tells readers (plot) where the current line restarts.
                append_event(self.run_dir, dict(self.rollback, event="rollback", step=self.step))
            if inside:
                ckpt.set_latest(self.ckpt_dir, path)
        dist.barrier()

    def _newest_loadable(self) -> Path | None:
        """The newest checkpoint that passes verification; a damaged newer one (corrupt, or without its
        effdist.json) is reported, skipped, and moved aside once the older one loaded. Checkpoints present
        but none loadable is an error with one line per checkpoint: never a silent start from step 0.
        Rank 0 decides and tells the others, so every rank loads the same one."""
        rt = self.runtime
        choice, problems = None, []
        if rt.is_logging_rank:
            for _, path in reversed(ckpt.list_checkpoints(self.ckpt_dir)):
                try:
                    ckpt.verify(path, check_crc=self.cfg.checkpoint.verify_crc, progress=True)
                    choice = str(path)
                    break
                except ckpt.CheckpointError as e:
                    problems.append(str(e))
                    log(rt, f"WARNING: {e}; falling back to the previous checkpoint")
            latest = self.ckpt_dir / "latest"
            named = latest.read_text().strip() if latest.is_file() else ""
            if choice is not None and named and not (self.ckpt_dir / named).exists():
                # The newest save is gone (deleted, or lost with a file system): its steps are redone, and their
                # records stay in metrics.jsonl before a fallback event, as for a damaged checkpoint.
                problems.append(f"{latest} names {named}, which does not exist")
                log(rt, f"WARNING: {problems[-1]}; continuing from {Path(choice).name}, the newest complete checkpoint")
        choice, problems = self._from_rank0((choice, problems))
        if choice is None and problems:
            raise _agreed(ckpt.CheckpointError(
                f"--resume auto: {len(problems)} checkpoint(s) in {self.ckpt_dir}, none loadable:\n  "
                + "\n  ".join(problems) + "\nrestore one, resume an older copy with --resume CHECKPOINT_DIR, or start "
                "over with --resume none --fresh"))
        self._skipped_damaged = bool(problems)
        return Path(choice) if choice else None

    def _model_signature(self) -> dict[str, Any]:
        m = self.cfg.model
        return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
                "num_query_groups": m.num_query_groups, "ffn_hidden_size": m.ffn_hidden_size,
                "vocab_size": m.vocab_size, "tie_embeddings": m.tie_embeddings, "ffn_kind": self.cfg.ffn.kind}

    def _check_compatible(self, marker: dict[str, Any], path: Path) -> None:
        """Before loading: every config key that shapes the tensors must match the checkpoint's (the
        parallel layout may change: checkpoints reshard)."""
        if "config" in marker:
            changes = ckpt.shape_changes(marker["config"], self.cfg.to_dict())
        else:  # checkpoints written before the config was stored in the marker
            saved = marker.get("model", {})
            changes = [(k, saved.get(k), v) for k, v in self._model_signature().items() if saved.get(k) != v]
        if changes:
            what = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in changes)
            fix = " ".join(f"--set {k}={a}" for k, a, _ in changes if "." in k)
            raise ckpt.IncompatibleCheckpointError(
                f"checkpoint {path} holds tensors of another shape ({what}); resume with its values"
                + (f" ({fix})" if fix else "") + ", or start a new run in another --run-dir (checkpoint.init_from "
                "needs the same shapes too)")
        self._check_dtype(marker, path)
        saved_tp, tp = marker.get("tp"), self.runtime.tp
        if isinstance(saved_tp, int) and saved_tp != tp:
            # Same vocabulary and divisor (checked above), another tp: megatron pads the output layer to another row
            # count, and its padded logits are not masked, so the softmax runs over another set of logits.
            before, now = self.cfg.model.padded_vocab_size(saved_tp), self.cfg.model.padded_vocab_size(tp)
            if before != now:
                added = now > before
                log(self.runtime,
                    f"WARNING: {path.name} was trained with parallel.tp={saved_tp}, which pads "
                    f"model.vocab_size={self.cfg.model.vocab_size} to {before} output rows; parallel.tp={tp} pads it "
                    f"to {now}, and the padded logits enter the softmax, so the loss will not continue where it "
                    f"stopped ({'untrained' if added else 'trained'} rows {min(before, now)}-{max(before, now) - 1} "
                    f"are {'added' if added else 'dropped'}); resume with a parallel.tp that pads to {before} rows "
                    f"(e.g. parallel.tp={saved_tp}) to continue exactly")
        saved_optim = marker.get("lr_schedule", {})
        now_optim = self._lr_signature()
        # Not where nothing is left to train (the checkpoint at or past train.steps): then a lower train.steps
        # changes the schedule's signature, and the warning would only precede "nothing to do".
        left_to_train = marker.get("step", 0) < self.cfg.train.steps
        if saved_optim and saved_optim != now_optim and left_to_train:
            log(self.runtime, f"WARNING: the LR schedule changed since {path.name}: {saved_optim} -> {now_optim}")
        saved_train = marker.get("config", {}).get("train", {})
        before, now = saved_train.get("global_batch"), self.cfg.train.global_batch
        if before is not None and before != now:
            log(self.runtime, f"train.global_batch changed since {path.name}: {before} -> {now} sequences per step; "
                              "the data continues after the samples already consumed")
        order = data_order_changes(marker, self.cfg)
        if order:
            log(self.runtime, f"WARNING: the data order changed since {path.name} ("
                              + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in order)
                              + f"): the samples after step {marker.get('step', path.name)} are not the ones this "
                              f"run would have seen; {config_fix(order)} continues exactly")

    def _check_dtype(self, marker: dict[str, Any], path: Path) -> None:
        """A float32 checkpoint resumed in bf16/fp16: megatron's mixed-precision optimizer loads fp32 master weights
        that a float32 run never saved (a KeyError deep in the load). The other way round loads."""
        if self.engine is not None or marker.get("engine", "megatron") != "megatron":
            return
        from effdist.runtime.distributed import DTYPES

        saved = marker.get("dtype")  # recorded since; before, an explicit train.dtype or the optimizer's keys tell
        if saved is None:
            named = DTYPES.get(marker.get("config", {}).get("train", {}).get("dtype"))
            saved = _dtype_name(named) if named is not None else None
        if saved is None and _adam_state_without_master_weights(path):
            saved = "float32"
        now = _dtype_name(self.runtime.dtype)
        if saved == "float32" and now != "float32":
            how = f"train.dtype={self.cfg.train.dtype}"
            if self.cfg.train.dtype == "auto":
                how += f" on {self.runtime.device.type}"
            raise ckpt.IncompatibleCheckpointError(
                f"checkpoint {path} was trained in float32 and this run would train in {now} ({how}), "
                "whose optimizer resumes from fp32 master weights the checkpoint does not hold: resume with --set "
                f"train.dtype=fp32, or start a new run from its weights (--set checkpoint.init_from={path} in another "
                "--run-dir)")

    def _lr_signature(self) -> dict[str, Any]:
        o = self.cfg.optim
        return {"lr": o.lr, "min_lr": o.min_lr, "warmup_steps": o.warmup_steps, "decay": o.decay,
                "steps": self.cfg.train.steps}

    # ------------------------------------------------------------------ metrics
    def _build_metrics(self) -> None:
        from effdist.train.metrics import MetricsLogger

        cfg, rt = self.cfg, self.runtime
        # With nothing to train (fit() says so and returns) this invocation leaves the run's records as they are:
        # opening the logger would drop the records after the loaded step, and tensorboard would start a file.
        records = rt.is_logging_rank and self.step < cfg.train.steps
        self.metrics = MetricsLogger(self.run_dir, enabled=records, tensorboard=cfg.logging.tensorboard,
                                     total_steps=cfg.train.steps, progress_bar=cfg.logging.progress_bar,
                                     resume_step=self.step)

    # ------------------------------------------------------------------ one step
    def _forward_backward(self, microbatches: list[dict[str, torch.Tensor]], tokens_in_global_batch: float) -> torch.Tensor:
        """Forward + backward of this rank's microbatches; returns the summed (unnormalised) loss."""
        if self.pipeline is not None:
            return self.pipeline.forward_backward(microbatches, tokens_in_global_batch)
        model = self.model_chunks[0]
        dev = self.runtime.device
        total = torch.zeros((), dtype=torch.float32, device=dev)
        for mb in microbatches:
            loss_sum, _ = masked_loss_sum(model, mb, dev)
            (loss_sum / tokens_in_global_batch).backward()
            total += loss_sum.detach()
        return total

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the first train.eval_steps global batches of the validation split (the
        same batches at every evaluation, so the numbers compare across steps)."""
        from megatron.core import parallel_state

        from effdist.data.loader import MicrobatchLoader

        cfg, rt = self.cfg, self.runtime
        loader = MicrobatchLoader(self.valid_ds, global_batch=cfg.train.global_batch,
                                  micro_batch=cfg.train.micro_batch, dp_rank=rt.dp_rank, dp_size=rt.dp)
        model = self.model_chunks[0]
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
        try:
            for _ in range(cfg.train.eval_steps):
                for mb in loader.next_step():
                    loss_sum, mask = masked_loss_sum(model, mb, rt.device)
                    totals[0] += loss_sum
                    totals[1] += mask.sum()
        finally:
            model.train()
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        return float(totals[0] / totals[1])

    def _allreduce_sequence_parallel_grads(self) -> None:
        """Weights replicated over TP but fed only this rank's sequence slice (norms, replicated
        low-rank factors) hold partial gradients: sum them over the TP group, in one flat all-reduce."""
        from megatron.core import parallel_state
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.main_grad for c in self.model_chunks for p in c.parameters()
                 if getattr(p, "sequence_parallel", False) and getattr(p, "main_grad", None) is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def train_step(self) -> dict[str, Any]:
        from megatron.core import parallel_state

        cfg, rt = self.cfg, self.runtime
        for chunk in self.model_chunks:
            for mod in chunk.modules():
                if hasattr(mod, "on_train_step"):
                    mod.on_train_step(self.step)
        begun = self._begin_step()

        microbatches = self.loader.next_step()
        local_tokens = sum(float(mb["loss_mask"].sum()) for mb in microbatches)
        counts = torch.tensor([local_tokens], dtype=torch.float64, device=rt.device)
        dist.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        tokens_in_global_batch = float(counts.item())
        if self.engine is not None:
            return self._engine_step(microbatches, tokens_in_global_batch, begun)

        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        if self.step + 1 in self._nan_steps:
            tokens_in_global_batch = float("nan")  # poisons the loss and every gradient of this step
        loss_sum = self._forward_backward(microbatches, tokens_in_global_batch)
        for chunk in self.model_chunks:
            chunk.finish_grad_sync()
        if cfg.parallel.sequence_parallel:
            self._allreduce_sequence_parallel_grads()
        # Only the rank holding the loss has it; the sum over DP (and PP, where others hold 0) gives
        # the global loss on every rank.
        loss_t = loss_sum.detach().double().reshape(1)
        dist.all_reduce(loss_t, group=parallel_state.get_data_parallel_group())
        if rt.pp > 1:
            dist.all_reduce(loss_t, group=parallel_state.get_pipeline_model_parallel_group())
        loss = float(loss_t.item()) / tokens_in_global_batch

        for hook in self.hooks:
            hook.after_backward()
        self.optimizer.collect_grads()
        grad_norm = self.optimizer.grad_norm()
        lr = lr_at(self.step, cfg.optim, cfg.train.steps)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.clip(grad_norm)
            self.optimizer.step(lr)
            for hook in self.hooks:
                hook.after_optimizer_step(self.optimizer)
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grads()
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
            log(rt, f"WARNING: step {self.step}: non-finite loss={loss} or grad_norm={grad_norm}; update skipped "
                    f"({self.nonfinite_in_a_row} in a row, limit {cfg.train.max_consecutive_nonfinite})")
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **begun, "finite": finite,
                "skipped_steps": self.skipped_steps}

    def _begin_step(self) -> dict[str, Any]:
        """Every hook's begin_step; the values they log, by metrics field (``epas_region``, a core field, is 0
        without EPAS)."""
        begun: dict[str, Any] = {"epas_region": 0}
        for hook in self.hooks:
            value = hook.begin_step(self.step)
            if hook.begin_step_metric is not None:
                begun[hook.begin_step_metric] = value
        return begun

    def _after_engine_update(self, optimizer) -> None:
        for hook in self.hooks:
            hook.after_optimizer_step(optimizer)

    def _engine_step(self, microbatches, tokens_in_global_batch: float, begun: dict[str, Any]) -> dict[str, Any]:
        """train_step for an engine that owns backward, gradient reduction, clipping and the update."""
        cfg = self.cfg
        if self.step + 1 in self._nan_steps:
            tokens_in_global_batch = float("nan")  # poisons the loss and every gradient of this step
        lr = lr_at(self.step, cfg.optim, cfg.train.steps)
        after_update = self._after_engine_update if self.hooks else None
        loss, grad_norm, finite = self.engine.train_step(microbatches, tokens_in_global_batch, lr, after_update)
        if finite:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
            log(self.runtime, f"WARNING: step {self.step}: non-finite loss={loss} or grad_norm={grad_norm}; update "
                              f"skipped ({self.nonfinite_in_a_row} in a row, limit {cfg.train.max_consecutive_nonfinite})")
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **begun, "finite": finite,
                "skipped_steps": self.skipped_steps}

    # ------------------------------------------------------------------ loop
    def _preempt_agreed(self) -> bool:
        """All ranks stop together if any was signalled (Slurm signals every task, but not atomically)."""
        flag = torch.tensor([1.0 if self.guard.requested else 0.0], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def save(self) -> Path:
        """Checkpoint the state after `self.step` steps (in the background with checkpoint.async_save)."""
        common = {"step": self.step, "data": self.loader.state_dict(), "nonfinite_in_a_row": self.nonfinite_in_a_row,
                  "skipped_steps": self.skipped_steps}
        for hook in self.hooks:
            common[hook.name] = hook.state_dict()
        rt, cc = self.runtime, self.cfg.checkpoint
        self._finish_saves()
        self._check_weights_finite()
        self._check_run_dir_still_there()
        self._check_space()
        marker = {"model": self._model_signature(), "lr_schedule": self._lr_signature(), "tp": rt.tp, "pp": rt.pp,
                  "dp": rt.dp, "config": self.cfg.to_dict(), "run_dir": str(self.run_dir.resolve()),
                  "data_paths": resolved_data_paths(self.cfg), "dtype": _dtype_name(rt.dtype)}
        step = self.step

        def retain():
            ckpt.apply_retention(self.ckpt_dir, cc.keep_last, cc.keep_every, current_step=step)

        if self.saver is not None:
            path = self.saver.save(self.ckpt_dir, self.step, self.model_chunks, self.optimizer, rt, common, marker,
                                   after_finalize=retain)
            log(rt, f"saving checkpoint {path.name} in the background")
            return path
        try:
            with ckpt.write_errors_named(self.ckpt_dir / (ckpt.iter_name(self.step) + ".tmp")):
                if self.engine is not None:
                    path = self.engine.save(self.ckpt_dir, self.step, common, marker)
                else:
                    path = ckpt.save(self.ckpt_dir, self.step, self.model_chunks, self.optimizer, rt, common, marker)
        except BaseException:
            # The run directory deleted between the check above and the write: say that, not the write's error.
            if problem := self._run_dir_problem():
                raise MetricsFileError(problem)
            raise
        if rt.is_logging_rank:
            retain()
        self._saved(path)
        return path

    def _saved(self, path: Path) -> None:
        """`path` is complete and visible on every rank."""
        self.last_good_checkpoint = path
        self.guard.resume_point = str(path)
        log(self.runtime, f"saved checkpoint {path}")

    def _finish_saves(self) -> None:
        if getattr(self, "saver", None) is not None:
            for p in self.saver.wait():
                self._saved(p)

    def _last_good(self) -> str:
        if self.last_good_checkpoint is None:
            return "none yet (this run has saved none and resumed from none)"
        return str(self.last_good_checkpoint)

    def _check_weights_finite(self) -> None:
        """Never save non-finite weights: every rank checks its shards (for ZeRO-3 its partition), then all agree."""
        bad = torch.zeros(1, device=self.runtime.device)
        for chunk in self.model_chunks:
            for p in chunk.parameters():
                local = getattr(p, "ds_tensor", p)
                if local.numel() and not bool(torch.isfinite(local.detach()).all()):
                    bad += 1
        dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteError(
                f"step {self.step}: {int(bad.item())} weight tensor(s) hold NaN or inf (the update overflowed); not "
                f"saving them. Last good checkpoint: {self._last_good()}. Resume from it (--resume CHECKPOINT_DIR) "
                f"with a lower optim.lr (now {self.cfg.optim.lr})")

    def _check_run_dir_still_there(self) -> None:
        """Before each save: a run directory deleted (or moved) since the last record must not be made again by
        the save, without records, config.yaml or lock. All ranks agree."""
        problem = self._from_rank0(self._run_dir_problem())
        if problem:
            raise _agreed(MetricsFileError(problem))

    def _run_dir_problem(self) -> str | None:
        """On rank 0, why this run's records can no longer go where they went (run directory deleted or moved);
        None on other ranks and while all is well."""
        if self.runtime.is_logging_rank and getattr(self, "metrics", None) is not None:
            try:
                self.metrics.check_still_there(self.step)
            except MetricsFileError as e:
                return str(e)
        return None

    def _check_space(self) -> None:
        """Before each save, on rank 0: room for about one more checkpoint of the last one's size (for the
        first save, an estimate from the parameter count), and a writable directory; all ranks agree."""
        rt = self.runtime
        problem = None
        if rt.is_logging_rank:
            problem = ckpt.space_problem(self.ckpt_dir, self.step,
                                         ckpt.estimate_next_bytes(self.ckpt_dir, self._first_checkpoint_bytes()),
                                         keep_last=self.cfg.checkpoint.keep_last)
        problem = self._from_rank0(problem)
        if problem:
            raise _agreed(ckpt.CheckpointSpaceError(problem))

    def _first_checkpoint_bytes(self) -> int:
        """Model weights in their dtype plus fp32 master weights and two Adam moments, over all ranks."""
        local = sum(p.numel() * p.element_size() for c in self.model_chunks for p in c.parameters())
        elems = sum(p.numel() for c in self.model_chunks for p in c.parameters())
        return (local + 12 * elems) * self.runtime.tp * self.runtime.pp

    def _sparse_fc2_layers(self) -> int:
        """ELAS layers (of the whole model) whose fc2 forward ran through cuSPARSELt in the last step."""
        cfg, rt = self.cfg, self.runtime
        has_elas = cfg.ffn.kind == "elas"
        if not (has_elas and cfg.ffn.elas_sparse_kernels and rt.is_cuda):
            return 0  # the same answer on every rank, so no rank waits in the all-reduce below
        local = sum(bool(getattr(mod, "used_sparse_gemm", False)) for c in self.model_chunks for mod in c.modules())
        if rt.pp == 1:
            return local
        from megatron.core import parallel_state

        count = torch.tensor([local], dtype=torch.int64, device=rt.device)
        dist.all_reduce(count, group=parallel_state.get_pipeline_model_parallel_group())
        return int(count.item())

    def _throughput(self, tokens_per_s: float, sharing_layers: int) -> dict[str, Any]:
        """tflops/mfu from dense FLOPs (the metrics contract) and, beside them, from the FLOPs executed
        (EPAS sharing, low-rank and cuSPARSELt FFNs do less), and the dense-equivalent tokens/s."""
        from effdist.train.flops import flops_per_token
        from effdist.train.metrics import peak_fp8_tflops

        cache = self.__dict__.setdefault("_flops_cache", {})  # per (sharing layers, cuSPARSELt layers)
        key = (int(sharing_layers), self._sparse_fc2_layers())
        if key not in cache:
            cache[key] = flops_per_token(self.cfg, *key)
        flops, rt = cache[key], self.runtime
        tflops = flops.dense * tokens_per_s / rt.world_size / 1e12
        executed = flops.executed * tokens_per_s / rt.world_size / 1e12
        out = {"tflops": tflops, "mfu": _mfu(tflops, rt), "tflops_executed": executed,
               "mfu_executed": _mfu(executed, rt), "tokens_per_s_dense_equiv": tokens_per_s * flops.executed_fraction}
        if self.cfg.train.precision == "fp8":
            out["mfu_executed_fp8_peak"] = _mfu(executed, rt, peak_fp8_tflops)
        return out

    def fit(self) -> int:
        """Train until train.steps; returns the process exit code."""
        cfg, rt = self.cfg, self.runtime
        self.saver = ckpt.AsyncSaver() if cfg.checkpoint.async_save else None
        if self.step >= cfg.train.steps:
            log(rt, self._nothing_to_do_line())
            return 0
        if rt.is_logging_rank:
            self._write_config_yaml()
        tokens_per_step = cfg.train.global_batch * cfg.data.seq_length
        last_saved = self.step
        if rt.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        while self.step < cfg.train.steps:
            self.guard.raise_if_interrupted()  # a Ctrl-C that Python dropped during the last step or save
            t0 = time.perf_counter()
            out = self.train_step()
            if rt.is_cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if not out.pop("finite") and self.nonfinite_in_a_row >= cfg.train.max_consecutive_nonfinite:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient norm (last at "
                    f"step {self.step + 1}); stopping without saving. Last good checkpoint: {self._last_good()}. "
                    f"Likely causes: learning rate too high (optim.lr={cfg.optim.lr}), fp16 overflow, or corrupt data. "
                    "Resume from the last good checkpoint with a lower optim.lr.")
            self.step += 1
            # From here a stop signal waits for the end of the step and a save (see lifecycle.ProcessGuard).
            self.guard.unsaved, self.guard.phase = True, "training"
            if self.step in self._inf_weight_steps:
                with torch.no_grad():
                    next(self.model_chunks[0].parameters()).view(-1)[0] = float("inf")
            tokens_per_s = tokens_per_step / dt
            record = dict(out, step=self.step, tokens_per_s=tokens_per_s, peak_mem_gib=_peak_memory_gib(rt),
                          step_time_s=dt)
            record.update(self._throughput(tokens_per_s, out["epas_region"]))
            if self.pipeline is not None:
                record.update(self.pipeline.memory_metrics())
            if cfg.train.eval_interval and (self.step % cfg.train.eval_interval == 0 or self.step == cfg.train.steps):
                record["val_loss"] = self.evaluate()
            if self.saver is not None:
                for p in self.saver.poll():
                    self._saved(p)
            # A step that evaluated is always written: its val_loss exists nowhere else.
            if self.step % cfg.logging.interval == 0 or self.step == cfg.train.steps or "val_loss" in record:
                self.metrics.log(record)
            due = cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0
            if self._preempt_agreed():
                self.guard.leaving = True
                if self.nonfinite_in_a_row == 0:
                    self.save()
                self._finish_saves()
                log(rt, f"preempted at step {self.step}: exiting with code {PREEMPTED_EXIT_CODE} for a requeue")
                self.metrics.close()
                return PREEMPTED_EXIT_CODE
            if due and self.nonfinite_in_a_row == 0:
                self.save()
                last_saved = self.step
                # An asynchronous save is not safe until finalized: a signal meanwhile still saves at step end.
                self.guard.unsaved = self.saver is not None
        if self.nonfinite_in_a_row:
            self._finish_saves()
            raise NonFiniteError(
                f"the last step ({self.step}) had a non-finite loss or gradient norm, so the run has no finite final "
                f"loss; not saving its state. Last good checkpoint: {self._last_good()}. Resume from it "
                f"(--resume CHECKPOINT_DIR) with a lower optim.lr (now {cfg.optim.lr}), or check the data")
        if cfg.checkpoint.save_at_end and last_saved != self.step:
            self.save()
        self._finish_saves()
        self.metrics.close()
        log(rt, f"done: {self.step} steps, final loss {out['loss']:.4f}")
        return 0


def _mfu(tflops: float, rt, peak_of=None) -> float | None:
    """Model FLOPs utilisation against the device's dense datasheet peak, bf16 unless `peak_of` gives
    another table (None on CPU, for fp32 runs or an unknown GPU)."""
    if not rt.is_cuda or rt.dtype not in (torch.bfloat16, torch.float16):
        return None
    from effdist.train.metrics import peak_bf16_tflops

    peak = (peak_of or peak_bf16_tflops)(torch.cuda.get_device_name())
    return tflops / peak if peak else None


from effdist.runtime.launch_env import PREEMPTED_EXIT_CODE  # noqa: E402


def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist train", description="Pretrain a LLaMA-style model with effdist.")
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny-cpu.yaml")
    p.add_argument("--run-dir", default=None, help="where config.yaml, metrics.jsonl, tb/ and checkpoints/ go "
                                                   "(default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from the newest complete checkpoint in the run dir, if any (default); "
                        "none: start from scratch (refused where a run exists, unless --fresh); or a checkpoint "
                        "directory (an older one of this run rolls back: the newer ones are moved aside, kept)")
    p.add_argument("--fresh", action="store_true",
                   help="with --resume none: move an earlier run in the run dir into RUN_DIR/previous/<time>/ "
                        "(nothing is deleted) and start over")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, print the config changes, rank layout, pipeline schedule and per-rank memory "
                        "estimate, and exit without starting anything")
    p.add_argument("--world-size", "--nproc", dest="world_size", type=int, default=None, metavar="N",
                   help="processes the dry run plans for (default: WORLD_SIZE of the launcher, else tp*pp)")
    p.add_argument("--print-config", action="store_true", help="write the resolved config as YAML to stdout and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from effdist.runtime.distributed import RendezvousError, teardown, world_size_from_env
    from effdist.runtime.launch_env import LaunchEnvError

    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.fresh and args.resume != "none":
        parser.error(f"--fresh starts over: use it with --resume none (got --resume {args.resume})")
    if args.dry_run or args.print_config:
        from effdist.train import dry_run

        return dry_run.run(args)
    if args.world_size is not None:
        parser.error(f"--world-size/--nproc {args.world_size} only sizes a --dry-run; to train with {args.world_size} "
                     f"processes start them with launch/run.sh {args.world_size} CONFIG (or torchrun --nproc-per-node "
                     f"{args.world_size} -m effdist.train ...)")
    overrides = [o for group in args.overrides for o in ([group] if isinstance(group, str) else group)]
    try:
        from effdist.train.estimate import check_fits

        cfg = load_config(args.config, overrides)
        validate_run(cfg, world_size=world_size_from_env())
        _check_precision_support(cfg)
        # Absurd sizes (batch, sequence, width, steps) stop here with a named line, not an OOM minutes later.
        check_fits(cfg, world_size_from_env())
    except ConfigError as e:
        lifecycle.say_once_per_node(f"effdist: config error: {e}")
        return 2
    except LaunchEnvError as e:
        lifecycle.say_once_per_node(f"effdist: launch error: {e}")
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    problem = _command_line_problem(run_dir, args.resume, cfg)
    if problem:
        lifecycle.say_once_per_node(f"effdist: error: {problem}")
        return 2
    trainer = Trainer(cfg, run_dir, resume=args.resume, fresh=args.fresh)
    guard = trainer.guard
    code = None
    try:
        trainer.setup()
        code = trainer.fit()
    except (ConfigError, ckpt.CheckpointError, NonFiniteError, run_directory.RunDirError, RendezvousError,
            MetricsFileError, _data_error()) as e:
        # Errors the user can act on: one clear line per rank instead of a traceback. A command that does
        # not fit the run directory or its checkpoints is a usage error (2); the rest are failures (1).
        if getattr(e, "agreed", False):  # rank 0's finding, which every rank raised: said once per node
            lifecycle.say_once_per_node(f"effdist: error (rank {lifecycle.global_rank()}): {e}")
        else:
            _error_line(e)
        usage = isinstance(e, (ConfigError, run_directory.RunDirError, ckpt.IncompatibleCheckpointError,
                               ckpt.NotACheckpointError, RendezvousError))
        code = 2 if usage else 1
    except lifecycle.Stopped as e:
        _error_line(e, label=None)
        code = e.exit_code
    except KeyboardInterrupt:
        code = _interrupted(trainer)
    except RuntimeError as e:
        # A peer that died shows up here as a failed collective: name it. A peer that stopped on the same
        # signal as this rank fails the collective too: then this is the signal's stop.
        guard.leaving = True
        why = lifecycle.describe_lost_peer(e) if dist.is_initialized() and dist.get_world_size() > 1 else None
        if guard.interrupted:  # Ctrl-C reaches every rank of a terminal's process group: not a peer's death
            code = _interrupted(trainer)
        elif why is not None and (guard.signum is None or guard.lost_peer() is not None):
            _error_line(why)
            code = lifecycle.PEER_LOST_EXIT_CODE
        elif guard.signum is not None:
            stopped = guard.stopped()
            _error_line(stopped, label=None)
            code = stopped.exit_code
        else:
            raise
    except BaseException:
        # Library code that wraps what it catches (torch.distributed.checkpoint turns a KeyboardInterrupt in a
        # save into a CheckpointException): still the Ctrl-C's stop.
        if not guard.interrupted:
            raise
        code = _interrupted(trainer)
    finally:
        # Tell the peers this exit is on purpose and bound what is left (teardown, the interpreter's exit,
        # helper shutdown) to lifecycle.EXIT_GRACE_S; an unexpected exception exits 1 if that hangs.
        guard.finish(1 if code is None else code)
        if code not in (0, PREEMPTED_EXIT_CODE) and getattr(trainer, "saver", None) is not None:
            trainer.saver.abort()
        try:
            teardown()
        finally:
            if trainer.lock is not None:
                trainer.lock.release()
            if trainer.ckpt_lock is not None:
                trainer.ckpt_lock.release()
    return code


def _command_line_problem(run_dir: Path, resume: str, cfg: Config) -> str | None:
    """--run-dir or --resume that cannot work, found before anything starts (exit 2, one line)."""
    if run_dir.exists() and not run_dir.is_dir():
        return (f"--run-dir {run_dir} is a file, not a directory: give a directory for the run (created if missing; "
                "config.yaml, metrics.jsonl and checkpoints/ go there)")
    ckpt_dir = checkpoint_dir(cfg, run_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        what = f"checkpoint.dir = {cfg.checkpoint.dir!r}" if cfg.checkpoint.dir else f"{ckpt_dir}"
        return (f"{what} is a file, not a directory: give a directory for the checkpoints (created if missing), "
                "or move the file away")
    complete = ckpt.list_complete(ckpt_dir) if ckpt_dir.is_dir() else []
    init_from = cfg.checkpoint.init_from
    starts_from_init = resume in ("none", "", None) or (resume == "auto" and not complete)
    if init_from and starts_from_init and not Path(init_from).exists():
        # Found here, not after the process group, the data preparation and the model are up (and the run
        # directory has received config.yaml and data/).
        return (f"checkpoint.init_from = {init_from!r}: no such file or directory; give a checkpoint to start from "
                "(a run's checkpoints/iter_N, or a model written by effdist convert), or leave it unset")
    if resume in ("auto", "none", "", None) or Path(resume).is_dir():
        return None
    example = (f"the newest of this run is {complete[-1][1]}" if complete
               else f"e.g. {ckpt_dir / ckpt.iter_name(1000)}")
    return (f"--resume {resume}: no such directory. --resume takes auto (the newest complete checkpoint in the run "
            f"directory, the default), none (start from scratch) or a checkpoint directory ({example})")


def _interrupted(trainer: Trainer) -> int:
    """Ctrl-C (SIGINT) stops at once, as in megatron and torchtitan, but with one line instead of a traceback per
    rank; SIGTERM/SIGUSR1 are the signals that save first (docs/launch.md). Returns the exit code."""
    trainer.guard.leaving = True
    _error_line(f"interrupted (SIGINT) at step {trainer.step}: steps since the last save are lost; "
                f"{lifecycle.resume_hint(trainer.last_good_checkpoint)}. To stop with a save, send SIGTERM or SIGUSR1 "
                "instead")
    return 128 + signal.SIGINT


def _agreed(error: Exception) -> Exception:
    """Mark an error that rank 0 found and every rank raises with the same text (a decision taken through
    `Trainer._from_rank0`: a refused run directory, no loadable checkpoint, no room to save, records gone): each
    node says it once, not once per process."""
    error.agreed = True
    return error


def _dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", "float16": how effdist.json records a checkpoint's dtype."""
    return str(dtype).removeprefix("torch.")


def _adam_state_without_master_weights(path: Path) -> bool:
    """Whether a megatron checkpoint holds Adam moments but no fp32 master weights: one a float32 run saved."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    except Exception:  # unreadable here: the load itself names the problem
        return False
    return (any(k.startswith("optimizer.state.exp_avg") for k in keys)
            and not any(k.startswith("optimizer.state.master") for k in keys))


def _error_line(error, label: str | None = "error") -> None:
    """One line per rank: `effdist: error (rank N): ...`, or without a label, `effdist (rank N): stopped by SIGTERM
    ...` for a stop signal obeyed (a preemption is not an error: a log scanned for "error" should not show one)."""
    from effdist.runtime.progress import end_bar

    end_bar()  # on a terminal the step bar is still on the line: the error goes on a line of its own
    # Through the guard's writer: with nobody reading stderr any more (a `| tee` that died) the line must not
    # raise BrokenPipeError over the exit code and the cleanup that follow it.
    prefix = f"effdist: {label}" if label else "effdist"
    lifecycle.print_to_console(f"{prefix} (rank {lifecycle.global_rank()}): {error}")


def _precision_note(cfg: Config) -> str:
    t = cfg.train
    if t.precision != "fp8":
        return ""
    return f", fp8 linears ({t.fp8_recipe}{', emulated' if t.fp8_emulate else ''}{', compiled' if t.fp8_compile and not t.fp8_emulate else ''})"


def _check_precision_support(cfg: Config) -> None:
    """train.precision=fp8 without torchao or FP8 hardware: a config error (exit 2) before any process group,
    on the GPU this rank will use (LOCAL_RANK)."""
    if cfg.train.precision != "fp8":
        return
    from effdist.model.fp8 import require_fp8_support
    from effdist.runtime.distributed import choose_device

    device, _ = choose_device(cfg)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    require_fp8_support(cfg.train, device)


def _data_error() -> type[Exception]:
    try:
        from effdist.data.verify import DataError
    except ImportError:  # pragma: no cover - data package always ships
        return ConfigError
    return DataError
