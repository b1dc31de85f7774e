"""Checkpoints through megatron dist_checkpointing: model + optimizer + scheduler + data + RNG.

Layout of ``RUN_DIR/checkpoints``::

    iter_0000100/          a complete checkpoint (dist_checkpointing files + effdist.json)
    iter_0000200.tmp/      a save in progress: never read
    latest                 the name of the newest complete checkpoint (written atomically)

A checkpoint is written under a ``.tmp`` name and renamed only after every rank finished and the
completion marker ``effdist.json`` exists, so a crash mid-write never leaves one that looks complete.
Model and optimizer tensors are saved as ShardedTensors, so a checkpoint written with one TP size
loads with another (megatron reshards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MARKER = "effdist.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit this run."""


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def list_complete(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `ckpt_dir`, oldest first."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for p in ckpt_dir.iterdir():
        m = _ITER_RE.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_marker(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {MARKER} ({e}); it is incomplete or corrupt") from None


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state(runtime) -> dict:
    """Every generator a resumed run must continue: python, numpy, torch (CPU and CUDA), megatron's tracker."""
    from megatron.core.tensor_parallel import random as mrandom

    state = {
        "python": __import__("random").getstate(),
        "numpy": __import__("numpy").random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": mrandom.get_cuda_rng_tracker().get_states(),
    }
    if runtime.is_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, runtime) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    __import__("random").setstate(state["python"])
    __import__("numpy").random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    mrandom.get_cuda_rng_tracker().set_states(state["tracker"])
    if runtime.is_cuda and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def model_sharded_state_dict(model_chunks) -> dict[str, Any]:
    """Every chunk's ShardedTensors under the same global keys (``model.decoder.layers...`` with global
    layer offsets), so a checkpoint written with one TP/PP layout loads into any other. Chunks sit in
    separate sub-dicts because their local module paths repeat (two chunks both have decoder.layers.0)."""
    return {f"chunk{i}": unwrap(chunk).sharded_state_dict(prefix="model.") for i, chunk in enumerate(model_chunks)}


def _load_chunks(model_chunks, loaded_model: dict[str, Any]) -> None:
    for i, chunk in enumerate(model_chunks):
        own = {k[len("model."):]: v for k, v in loaded_model[f"chunk{i}"].items()}
        unwrap(chunk).load_state_dict(own, strict=True)


def build_state_dict(model_chunks, optimizer, runtime, common: dict[str, Any]) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = model_sharded_state_dict(model_chunks)
    rng = ShardedObject(
        "rng_state", rng_state(runtime), (runtime.pp, runtime.tp, runtime.dp),
        (runtime.pp_rank, runtime.tp_rank, runtime.dp_rank), replica_id=0,
    )
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd), "rng_state": rng,
            "common": common}


def unwrap(module):
    """The GPTModel inside megatron's DDP wrapper."""
    return getattr(module, "module", module)


def _start_save(ckpt_dir: Path, step: int, runtime) -> tuple[Path, Path]:
    """An empty ``iter_N.tmp`` to write into (rank 0 makes it, everyone waits); returns (tmp, final)."""
    final = ckpt_dir / iter_name(step)
    tmp = ckpt_dir / (iter_name(step) + ".tmp")
    if runtime.is_logging_rank:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    return tmp, final


def save(ckpt_dir: Path, step: int, model_chunks, optimizer, runtime, common: dict[str, Any],
         marker: dict[str, Any]) -> Path:
    """Write a complete checkpoint for `step` and make it visible atomically. Collective."""
    from megatron.core import dist_checkpointing

    tmp, final = _start_save(ckpt_dir, step, runtime)
    optimizer.ensure_state()
    sd = build_state_dict(model_chunks, optimizer, runtime, common)
    dist_checkpointing.save(sd, str(tmp))
    _barrier()
    if runtime.is_logging_rank:
        make_visible(ckpt_dir, tmp, final, step, marker)
    _barrier()
    return final


class HostStaging:
    """Pinned host buffers, allocated once and reused by every save (DataStates-LLM style).

    The saving step only copies device tensors into these buffers; the files are written from them
    in the background while training goes on.
    """

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def stage(self, sharded_sd: dict) -> None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        copies = []
        for v in nested_values(sharded_sd):
            if not isinstance(v, ShardedTensor) or v.data is None or v.data.device.type == "cpu":
                continue
            key = (v.key, v.global_offset, tuple(v.data.shape), v.data.dtype)
            buf = self.buffers.get(key)
            if buf is None:
                buf = torch.empty(v.data.shape, dtype=v.data.dtype, pin_memory=True)
                self.buffers[key] = buf
            buf.copy_(v.data.detach(), non_blocking=True)
            copies.append((v, buf))
        if copies:
            torch.cuda.synchronize()
        for v, buf in copies:
            v.data = buf


class AsyncSaver:
    """At most one checkpoint written in the background; visible only once every rank finished."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.staging = HostStaging()
        self.in_flight: Path | None = None

    def save(self, ckpt_dir: Path, step: int, model_chunks, optimizer, runtime, common: dict[str, Any],
             marker: dict[str, Any], after_finalize=None) -> Path:
        from megatron.core import dist_checkpointing

        self.wait()  # at most one save in flight: the staging buffers are about to be overwritten
        tmp, final = _start_save(ckpt_dir, step, runtime)
        optimizer.ensure_state()
        sd = build_state_dict(model_chunks, optimizer, runtime, common)
        self.staging.stage(sd)
        request = dist_checkpointing.save(sd, str(tmp), async_sharded_save=True)

        def finalize():
            if runtime.is_logging_rank:
                make_visible(ckpt_dir, tmp, final, step, marker)
                if after_finalize is not None:
                    after_finalize()
            _barrier()

        request.finalize_fns.append(finalize)
        self.queue.schedule_async_request(request)
        self.in_flight = final
        return final

    def poll(self) -> list[Path]:
        """Finalize a finished save, if any (collective: call at the same point on every rank)."""
        done = self.queue.maybe_finalize_async_calls(blocking=False, no_dist=False)
        if done and self.in_flight is not None:
            path, self.in_flight = self.in_flight, None
            return [path]
        return []

    def wait(self) -> list[Path]:
        """Block until the save in flight is written and visible."""
        if self.in_flight is None:
            return []
        self.queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        path, self.in_flight = self.in_flight, None
        return [path]

    def close(self) -> None:
        self.wait()
        self.queue.close()


def manifest(path: Path) -> dict[str, list[int]]:
    """Size and CRC32 of every file of a checkpoint, recorded in its marker to detect corruption."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != MARKER:
            crc = 0
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            out[str(f.relative_to(path))] = [f.stat().st_size, crc]
    return out


def verify(path: Path, check_crc: bool = True) -> None:
    """Raise CheckpointError if any file of `path` is missing, truncated or altered since it was saved."""
    marker = read_marker(path)
    expected = marker.get("files")
    if not expected:
        raise CheckpointError(f"checkpoint {path} records no file manifest; it was not completed by effdist")
    for rel, (size, crc) in expected.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {rel}")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: {rel} has {f.stat().st_size} bytes, {size} were written "
                                  "(truncated or overwritten)")
        if check_crc:
            got = 0
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    got = zlib.crc32(chunk, got)
            if got != crc:
                raise CheckpointError(f"checkpoint {path}: {rel} fails its CRC32 check (corrupted on disk)")


def make_visible(ckpt_dir: Path, tmp: Path, final: Path, step: int, marker: dict[str, Any]) -> None:
    """Rank 0, after every rank wrote its files: record the manifest, then make the checkpoint visible under
    its final name (any engine's checkpoint directory: dist_checkpointing's or DeepSpeed's)."""
    marker = dict(marker, step=step, saved_at=time.time(), files=manifest(tmp))
    _write_atomic(tmp / MARKER, json.dumps(marker, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(ckpt_dir / "latest", final.name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, model_chunks, optimizer, runtime, restore_rng: bool = True) -> dict[str, Any]:
    """Load `path` into the model, optimizer and RNG; return the common state (step, data position, ...)."""
    from megatron.core import dist_checkpointing

    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete effdist checkpoint (no {MARKER})")
    optimizer.ensure_state()
    sd = build_state_dict(model_chunks, optimizer, runtime, common={})
    del sd["common"]
    if not restore_rng:
        del sd["rng_state"]
    loaded = dist_checkpointing.load(sd, str(path))
    _load_chunks(model_chunks, loaded["model"])
    optimizer.load_sharded_state_dict(loaded["optimizer"])
    if restore_rng and "rng_state" in loaded:
        set_rng_state(loaded["rng_state"], runtime)
    common = dist_checkpointing.load_common_state_dict(str(path))
    return common.get("common", {}) if isinstance(common, dict) else {}


def load_model_only(path: Path, model_chunks) -> None:
    """Load model weights (keys ``model.*``) from a dist checkpoint into this rank's chunks, resharding."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise CheckpointError(f"checkpoint.init_from = {str(path)!r} is not a dist checkpoint directory; convert HF "
                              "weights with `effdist convert hf-to-effdist --format dist`")
    loaded = dist_checkpointing.load({"model": model_sharded_state_dict(model_chunks)}, str(path))
    _load_chunks(model_chunks, loaded["model"])


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, except every `keep_every`-th step.

    Never deletes the newest complete checkpoint. Returns the deleted paths.
    """
    complete = list_complete(ckpt_dir)
    if not complete:
        return []
    keep = {p for _, p in complete[-max(1, keep_last):]}
    if keep_every > 0:
        keep |= {p for s, p in complete if s % keep_every == 0}
    deleted = []
    for _, p in complete:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
    return deleted
