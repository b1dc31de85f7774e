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

import contextlib
import errno
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

# Which config keys shape the tensors (shared with `effdist convert`).
from effdist.model.checkpoint_fit import SHAPE_KEYS, shape_changes  # noqa: F401 (re-exported)
from effdist.runtime.progress import Progress
from effdist.train.run_dir import configured_checkpoint_dir

MARKER = "effdist.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit this run."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint's tensors have other shapes than the configured model's (a config error: exit 2)."""


class NotACheckpointError(CheckpointError):
    """--resume names a directory that holds no complete effdist checkpoint (a usage error: exit 2)."""


class CheckpointSpaceError(CheckpointError):
    """The checkpoint directory cannot take the next checkpoint (full, read-only, not writable)."""


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


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint `path` names: a model file or checkpoint directory as given (a complete training
    checkpoint, or a model written by `effdist convert`), else the newest complete checkpoint of a run
    directory or its checkpoints/ directory (the one its `latest` file names, when complete).
    Raises CheckpointError saying what was expected."""
    from effdist.model.hf_convert import CONVERTED_MARKER

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{str(path)!r} does not exist: give a run directory, its checkpoints/ directory or one "
                              "checkpoints/iter_NNNNNNN directory")
    if p.is_file() or (p / MARKER).is_file() or (p / CONVERTED_MARKER).is_file():
        return p
    for ckpt_dir in _checkpoint_dirs(p):
        latest = ckpt_dir / "latest"
        if latest.is_file():
            named = ckpt_dir / latest.read_text().strip()
            if (named / MARKER).is_file():
                return named
        complete = list_complete(ckpt_dir)
        if complete:
            return complete[-1][1]
    raise CheckpointError(f"{str(path)!r} holds no complete effdist checkpoint: expected RUN_DIR, RUN_DIR/checkpoints "
                          f"or RUN_DIR/checkpoints/iter_NNNNNNN (a directory with {MARKER}), or a model written by "
                          "`effdist convert hf-to-effdist`")


def _checkpoint_dirs(p: Path) -> list[Path]:
    """Directories that may hold iter_NNNNNNN checkpoints: p itself, p/checkpoints, checkpoint.dir of p/config.yaml
    (a relative one as the trainer read it, from the working directory, then from p)."""
    dirs = [p, p / "checkpoints"]
    custom = configured_checkpoint_dir(p)
    if custom:
        # A relative checkpoint.dir is where the trainer saved it: relative to the directory it was started in
        # (most likely this one), else to the run directory.
        dirs += [Path(custom)] if Path(custom).is_absolute() else [Path(custom), p / custom]
    return [d for d in dirs if d.is_dir()]


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Every iter_N directory of `ckpt_dir` (complete or not, not the .tmp saves in progress), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _ITER_RE.match(p.name)) and p.is_dir())


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
    def start():
        # Never its parents: the run directory (or checkpoint.dir, made when the run claimed it) exists unless
        # somebody deleted it while the run trained, and a save must not make it again without its records.
        ckpt_dir.mkdir(exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    _on_rank0_agreed(runtime, step, tmp, start)
    return tmp, final


def _on_rank0_agreed(runtime, step: int, tmp: Path, action) -> None:
    """Run `action` (a file-system change of a save) on rank 0 while the other ranks wait; a write that fails
    there (a file in the way, no space, read-only) becomes the same named CheckpointSpaceError on every rank,
    instead of rank 0's bare OSError and a "lost the connection" from each rank waiting for it. Collective."""
    problem = None
    if runtime.is_logging_rank:
        try:
            action()
        except Exception as e:
            problem = _named_write_problem(e, step, tmp)
            if problem is None:
                raise
    if dist.is_initialized():
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        error = CheckpointSpaceError(problem)
        error.agreed = True  # rank 0's finding, raised by every rank: said once per node (trainer._agreed)
        raise error


def save(ckpt_dir: Path, step: int, model_chunks, optimizer, runtime, common: dict[str, Any],
         marker: dict[str, Any]) -> Path:
    """Write a complete checkpoint for `step` and make it visible atomically. Collective."""
    from megatron.core import dist_checkpointing

    from effdist.runtime.megatron_patches import write_results_in_process

    tmp, final = _start_save(ckpt_dir, step, runtime)
    optimizer.ensure_state()
    sd = build_state_dict(model_chunks, optimizer, runtime, common)
    with write_results_in_process():
        dist_checkpointing.save(sd, str(tmp))
    _barrier()
    _on_rank0_agreed(runtime, step, tmp, lambda: make_visible(ckpt_dir, tmp, final, step, marker))
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
        self.writing: Path | None = None  # the in-flight save's .tmp directory: what a failed write names

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
            _on_rank0_agreed(runtime, step, tmp, lambda: make_visible(ckpt_dir, tmp, final, step, marker))
            if runtime.is_logging_rank and after_finalize is not None:
                after_finalize()
            _barrier()

        request.finalize_fns.append(finalize)
        self.queue.schedule_async_request(request)
        self.in_flight, self.writing = final, tmp
        return final

    def poll(self) -> list[Path]:
        """Finalize a finished save, if any (collective: call at the same point on every rank)."""
        with write_errors_named(self.writing or Path(".")):
            done = self.queue.maybe_finalize_async_calls(blocking=False, no_dist=False)
        if done and self.in_flight is not None:
            path, self.in_flight, self.writing = self.in_flight, None, None
            return [path]
        return []

    def wait(self) -> list[Path]:
        """Block until the save in flight is written and visible."""
        if self.in_flight is None:
            return []
        with write_errors_named(self.writing or self.in_flight):
            self.queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        path, self.in_flight, self.writing = self.in_flight, None, None
        return [path]

    def close(self) -> None:
        self.wait()
        self.queue.close()

    def abort(self) -> None:
        """The run is failing (a peer died, a stop without a save): end the background writer now instead of
        letting it fail later against helpers that shut down at exit. Its checkpoint stays an unfinished
        .tmp directory, which resuming never loads."""
        for call in list(self.queue.async_calls):
            process = getattr(call.async_caller, "process", None)
            if process is not None and process.is_alive():
                process.kill()
                process.join(timeout=10)
        self.queue.async_calls.clear()
        self.in_flight = self.writing = None


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


def verify(path: Path, check_crc: bool = True, progress: bool = False) -> None:
    """Raise CheckpointError if any file of `path` is missing, truncated or altered since it was saved.
    With `progress`, reading the files for their CRC shows a bar (a terminal) or lines (a long run in a log)."""
    marker = read_marker(path)
    expected = marker.get("files")
    if not expected:
        raise CheckpointError(f"checkpoint {path} records no file manifest; it was not completed by effdist")
    total = sum(int(size) for size, _ in expected.values())
    with Progress(f"verifying {path.name}", total=total, unit="B", enabled=progress and check_crc) as bar:
        _verify_files(path, expected, check_crc, bar)


def _verify_files(path: Path, expected: dict[str, list[int]], check_crc: bool, bar: Progress) -> None:
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
                    bar.update(len(chunk))
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
    set_latest(ckpt_dir, final)


def set_latest(ckpt_dir: Path, path: Path) -> None:
    """Point ``ckpt_dir/latest`` (read by `effdist generate` and external tools) at checkpoint `path`."""
    _write_atomic(ckpt_dir / "latest", path.name)


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
    with Progress(f"loading {path.name}", enabled=runtime.is_logging_rank) as bar:
        bar.stage("reading model, optimizer and RNG state")  # one collective read: no count to show
        optimizer.ensure_state()
        sd = build_state_dict(model_chunks, optimizer, runtime, common={})
        del sd["common"]
        if not restore_rng:
            del sd["rng_state"]
        loaded = dist_checkpointing.load(sd, str(path))
        bar.stage("copying into the model and optimizer")
        _load_chunks(model_chunks, loaded["model"])
        optimizer.load_sharded_state_dict(loaded["optimizer"])
    if restore_rng and "rng_state" in loaded:
        set_rng_state(loaded["rng_state"], runtime)
    common = dist_checkpointing.load_common_state_dict(str(path))
    return common.get("common", {}) if isinstance(common, dict) else {}


def load_model_only(path: Path, model_chunks, config: dict[str, Any] | None = None) -> Path:
    """checkpoint.init_from: model weights (keys ``model.*``) from a dist checkpoint into this rank's chunks,
    resharding. `path` may be a run directory (its newest complete checkpoint), a training checkpoint or
    a converted model directory. Before reading any weight, the checkpoint's tensors are compared with
    the model's (`config` is the run's, as a dict): a mismatch is an IncompatibleCheckpointError listing
    every tensor. Returns the checkpoint directory loaded."""
    from megatron.core import dist_checkpointing, parallel_state

    from effdist.model.checkpoint_fit import config_fix, dist_checkpoint_problems, mismatch_message
    from effdist.model.hf_convert import checkpoint_engine, saved_config

    try:
        path = resolve(path)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint.init_from = {e}") from None
    if path.is_file() or not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        engine = checkpoint_engine(path)
        if engine not in (None, "megatron"):
            raise CheckpointError(
                f"checkpoint.init_from = {str(path)!r} is a checkpoint of the {engine} engine, whose shards "
                "checkpoint.init_from cannot read (it takes megatron dist checkpoints: a default-engine run's, or "
                f"`effdist convert hf-to-effdist --format dist` output); continue that run with train.engine={engine} "
                "and --resume instead (docs/deepspeed.md, \"Between engines\")")
        raise CheckpointError(f"checkpoint.init_from = {str(path)!r} is not a dist checkpoint directory; convert HF "
                              "weights with `effdist convert hf-to-effdist --format dist`")
    sharded = model_sharded_state_dict(model_chunks)
    saved = saved_config(path)
    whole_model = parallel_state.get_pipeline_model_parallel_world_size() == 1
    problems = dist_checkpoint_problems(path, sharded, saved, config or {}, whole_model=whole_model)
    if problems:
        changes = shape_changes(saved, config) if saved and config else []
        fix = (f"train with the checkpoint's model shape ({config_fix(changes)})" if changes else
               "train with the config the checkpoint was written with")
        if (path / "config.yaml").is_file() and not (path / MARKER).is_file():
            fix += f", e.g. --config {path / 'config.yaml'}"
        raise IncompatibleCheckpointError(mismatch_message(
            f"checkpoint.init_from = {str(path)!r} does not fit this model ({len(problems)} problem(s)):",
            problems, fix))
    first = not dist.is_initialized() or dist.get_rank() == 0
    with Progress(f"loading {path.name}", enabled=first) as bar:
        bar.stage("reading model weights")
        loaded = dist_checkpointing.load({"model": sharded}, str(path))
        _load_chunks(model_chunks, loaded["model"])
    return path


def apply_retention(ckpt_dir: Path, keep_last: int, keep_every: int, current_step: int | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, except every `keep_every`-th step.

    Only checkpoints of the current line of history are candidates: none newer than `current_step`
    (checkpoints of an abandoned line are moved aside by run_dir, never counted here). Never deletes the
    newest complete checkpoint. Returns the deleted paths.
    """
    complete = [(s, p) for s, p in list_complete(ckpt_dir) if current_step is None or s <= current_step]
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


# ---------------------------------------------------------------------- disk space
def checkpoint_bytes(path: Path) -> int:
    """Bytes of a complete checkpoint, from its manifest (0 if it has none)."""
    try:
        return sum(int(size) for size, _ in read_marker(path).get("files", {}).values())
    except (CheckpointError, TypeError, ValueError):
        return 0


def estimate_next_bytes(ckpt_dir: Path, fallback: int) -> int:
    """Size of the next checkpoint: the newest complete one's (same model, same state), else `fallback`."""
    complete = list_complete(ckpt_dir)
    return (checkpoint_bytes(complete[-1][1]) if complete else 0) or fallback


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer at `path` (its nearest existing ancestor).

    EFFDIST_FAULT_FREE_BYTES replaces the answer (fault injection for tests and drills)."""
    fake = os.environ.get("EFFDIST_FAULT_FREE_BYTES")
    if fake:
        return int(fake)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def space_problem(ckpt_dir: Path, step: int, needed: int, keep_last: int | None = None) -> str | None:
    """Why checkpoint `step` cannot be written into `ckpt_dir` now (None: it can). Called before a save, on
    rank 0; the margin covers the manifest, the marker and file-system overhead. Lowering checkpoint.keep_last
    is suggested only where it can still be lowered (`keep_last` above 1)."""
    where = ckpt_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    if not os.access(where, os.W_OK) or _read_only(where):
        return (f"cannot save {iter_name(step)}: {where} is not writable (read-only file system or permissions); "
                f"the checkpoints already there are intact. Make it writable or set checkpoint.dir, then resume "
                "with --resume auto")
    free = free_bytes(where)
    if free < needed * 1.1:
        return (f"not enough space to save {iter_name(step)} in {ckpt_dir}: about {_fmt_bytes(needed)} needed, "
                f"{_fmt_bytes(free)} free; the checkpoints already there are intact. Free space"
                + ("" if keep_last == 1 else " (or lower checkpoint.keep_last"
                   + (f", now {keep_last})" if keep_last else ")"))
                + " or set checkpoint.dir, then resume with --resume auto")
    return None


def _read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_WRITE_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                 errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EFBIG: "file too large",
                 errno.ENOENT: "its directory is gone (deleted while the run trained?)"}


# How the writers report a failed write when the errno does not survive (torch's zip writer, the
# checkpoint writer's worker processes): matched in the message, last resort after the errno.
_WRITE_FAILURE_TEXTS = ("file write failed", "PytorchStreamWriter failed", "unexpected pos", "No space left")


@contextlib.contextmanager
def write_errors_named(tmp: Path):
    """A failed checkpoint write (disk full, quota, read-only, file size limit) becomes a CheckpointSpaceError
    naming the path and the free space, instead of a traceback from deep inside the writer. The partial
    .tmp save stays where it is (never visible as a checkpoint; the next save of that step replaces it)."""
    try:
        yield
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        problem = _named_write_problem(e, None, tmp)
        if problem is None:
            raise
        raise CheckpointSpaceError(problem) from None


def _named_write_problem(e: BaseException, step: int | None, tmp: Path) -> str | None:
    """The line for a checkpoint write that failed with `e` (None: `e` is no failed write). A file where the save
    needs a directory (``iter_N.tmp``, ``iter_N`` or the checkpoint directory itself) is named as such: freeing
    space would not help."""
    blocker = _file_in_the_way(e)
    if blocker is not None:
        what = f"saving checkpoint {iter_name(step)}" if step is not None else f"writing checkpoint {tmp}"
        return (f"{what} failed: {blocker} is a file where a directory belongs; move or delete it (or set "
                "checkpoint.dir), then resume with --resume auto; the complete checkpoints beside it are intact")
    reason = _write_failure(e)
    if reason is None:
        return None
    free = free_bytes(tmp.parent) if tmp.parent.exists() else 0
    return (f"writing checkpoint {tmp} failed: {reason}; {_fmt_bytes(free)} free there; the complete checkpoints "
            "beside it are intact. Free space or set checkpoint.dir, then resume with --resume auto")


def _file_in_the_way(e: BaseException) -> Path | None:
    """The file (not a directory) that made `e` fail, when `e` is "not a directory" or "exists" for a directory the
    save makes: the path the error names or its nearest parent that is a file."""
    if not isinstance(e, OSError) or e.errno not in (errno.ENOTDIR, errno.EEXIST) or not e.filename:
        return None
    for path in (Path(os.fsdecode(e.filename)), *Path(os.fsdecode(e.filename)).parents):
        if path.exists() or path.is_symlink():
            return path if not path.is_dir() else None
    return None


def _write_failure(e: BaseException) -> str | None:
    """Why writing failed, if `e` (or what it wraps) is a failed file write; None for any other error."""
    from torch.distributed.checkpoint.api import CheckpointException

    seen: list[BaseException] = []
    cause: BaseException | None = e
    while cause is not None and cause not in seen:
        seen.append(cause)
        if isinstance(cause, OSError) and cause.errno in _WRITE_ERRNOS:
            return f"{_WRITE_ERRNOS[cause.errno]} ({cause.filename or cause})"
        if isinstance(cause, CheckpointException):  # (exception, traceback) per failed rank
            seen.extend(f[0] if isinstance(f, tuple) else f for f in cause.failures.values())
        cause = cause.__cause__ or cause.__context__
    for exc in seen:
        if isinstance(exc, BaseException) and not isinstance(exc, CheckpointException):
            text = str(exc)
            if any(t in text for t in _WRITE_FAILURE_TEXTS):
                return f"the file write failed ({text.strip().splitlines()[-1]})"
    return None
