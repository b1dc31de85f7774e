"""Device and backend choice, process groups, and megatron parallel_state for TP x PP x DP."""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from effdist.config import Config, ConfigError
from effdist.runtime import cpu_compat


@dataclass
class Runtime:
    device: torch.device
    backend: str
    dtype: torch.dtype
    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_logging_rank(self) -> bool:
        """Global rank 0 logs, shows progress and writes metrics."""
        return self.rank == 0

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (same arguments) and warns on the old names;
# older torch (the GPU image's 2.11) has only those.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def choose_device(cfg: Config) -> tuple[torch.device, str]:
    """cuda+nccl when a GPU is visible (and not overridden), else cpu+gloo."""
    want = cfg.parallel.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("parallel.device = 'cuda': no CUDA GPU is visible; use parallel.device=cpu (or auto)")
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if want == "cuda" else "gloo"
    return torch.device(want), backend


# train.dtype's names (besides "auto").
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    name = cfg.train.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return DTYPES[name]


class RendezvousError(RuntimeError):
    """The processes of the run did not all meet: a usage problem (a rank not started, a wrong address or world
    size), not a failure of the run itself."""


def _rendezvous_problem(rank: int, world_size: int, timeout_s: float, error: Exception) -> str:
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return (f"rank {rank} of WORLD_SIZE={world_size} waited parallel.timeout_s={timeout_s:g} s at {where} and not "
            f"every process arrived: start all {world_size} (torchrun --nproc-per-node/--nnodes start them "
            f"together), or correct WORLD_SIZE, MASTER_ADDR or MASTER_PORT (torch: {str(error).strip()})")


def world_size_from_env() -> int:
    from effdist.runtime.launch_env import resolve_dist_env

    return resolve_dist_env(os.environ).world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(cfg: Config) -> Runtime:
    """Start the process group and megatron's parallel state for this process.

    The config must already be validated (including against the world size): nothing here should
    fail on a user's value after processes have started talking to each other.
    """
    from megatron.core import parallel_state, tensor_parallel

    from effdist.runtime.launch_env import resolve_dist_env

    env = resolve_dist_env(os.environ)
    device, backend = choose_device(cfg)
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        cpu_compat.install()

    if not dist.is_initialized():
        if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
            # A lone process needs no rendezvous: an in-memory store avoids picking a port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
            try:
                dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                        init_method="env://")
            except (dist.DistStoreError, dist.DistNetworkError) as e:
                raise RendezvousError(_rendezvous_problem(env.rank, env.world_size, cfg.parallel.timeout_s, e)) from e
    if env.world_size > 1:
        _watch_peers(env)

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tp,
            pipeline_model_parallel_size=cfg.parallel.pp,
            distributed_timeout_minutes=max(1, int(round(cfg.parallel.timeout_s / 60))),
            create_gloo_process_groups=device.type == "cuda",
        )
    seed_everything(cfg.train.seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    else:
        _seed_cpu_tracker(cfg.train.seed)

    return Runtime(
        device=device,
        backend=backend,
        dtype=choose_dtype(cfg, device),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=env.local_rank,
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def _watch_peers(env) -> None:
    """Record this process in the group's store and let the lifecycle watchdog watch the ranks on this host
    (torchrun and Slurm number the ranks of a node consecutively), so a dead peer stops this rank within
    seconds with a line naming it (effdist.runtime.lifecycle)."""
    from effdist.runtime import lifecycle

    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    lifecycle.register_process(store, rank)
    first = rank - env.local_rank
    lifecycle.guard().watch_peers(store, rank, list(range(first, first + env.local_world_size)))


def _seed_cpu_tracker(seed: int) -> None:
    """Same named streams as megatron's model_parallel_cuda_manual_seed, on the CPU tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * tp_rank)


def teardown(keep_process_group: bool = False) -> None:
    """End megatron's parallel state and (unless kept) the process group.

    Keep the process group where the same processes set up again (benchmarks running one variant after
    another under torchrun): a process group started anew on torchrun's store can read the previous
    group's rendezvous keys, and its ranks then wait for peers that are gone (gloo: connection refused).
    """
    # Not imported here: a run stopped (Ctrl-C) while megatron was being imported has nothing of it to end, and
    # importing it again over the half-initialised modules fails with an unrelated traceback.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and getattr(parallel_state, "model_parallel_is_initialized", lambda: False)():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()


def seed_model_parallel_rng(seed: int, cuda: bool) -> None:
    """The default and the tensor-parallel RNG streams, on the GPU or on the CPU tracker."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        _seed_cpu_tracker(seed)


@contextlib.contextmanager
def one_process_megatron(cuda: bool = False, seed: int = 0) -> Iterator[None]:
    """A world of one process with megatron parallel state (TP=PP=1), for tools, benchmarks and tests that
    build a model outside the trainer: nccl on GPU, gloo plus the CPU compatibility layer on CPU. Reuses a
    process group or parallel state that already exists, and tears down only what it started."""
    from megatron.core import parallel_state

    installed = False
    if cuda:
        torch.cuda.set_device(0)
    elif not cpu_compat.is_installed():
        cpu_compat.install()
        installed = True
    started_pg = not dist.is_initialized()
    if started_pg:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    started_mp = not parallel_state.model_parallel_is_initialized()
    if started_mp:
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    seed_model_parallel_rng(seed, cuda)
    try:
        yield
    finally:
        if started_mp:
            parallel_state.destroy_model_parallel()
        if started_pg:
            dist.destroy_process_group()
        if installed:
            cpu_compat.uninstall()
