"""Helpers for tests that run effdist in real processes (torchrun + gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"

# Overrides for a run whose checkpoints no test reads (only its metrics): a tiny run's save costs about as
# much CPU as its steps (megatron's writer starts helper processes), so these runs skip saving.
NO_CHECKPOINTS = ["checkpoint.interval=0", "checkpoint.save_at_end=false"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                    "SLURM_", "TORCHELASTIC", "GROUP_RANK"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous address)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_parallel(jobs: dict[str, Callable[[], T]], workers: int = 2) -> dict[str, T]:
    """Run independent launches `workers` at a time; their results by name (the first failure is raised).

    Why: on a 2-core machine a one-process run leaves a core idle, and multi-process runs spend much of their
    time in start-up and at barriers; two launches side by side finish well before the same two in a row.
    """
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def run_train(run_dir: Path, overrides: list[str], nproc: int = 1, resume: str = "auto", timeout: int = 300,
              check: bool = True, config: Path = TINY) -> subprocess.CompletedProcess:
    """Run `effdist train` in `nproc` processes and return the finished process."""
    args = ["--config", str(config), "--run-dir", str(run_dir), "--resume", resume]
    for o in overrides:
        args += ["--set", o]
    if nproc == 1:
        cmd = [sys.executable, "-m", "effdist.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "effdist.train", *args]
    proc = subprocess.run(cmd, env=clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with {proc.returncode}:\n{proc.stderr[-6000:]}")
    return proc


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """`key` (default the training loss) of every logged step that has it."""
    out = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                out[rec["step"]] = rec[key]
    return out
