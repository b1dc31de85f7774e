"""The life of a run directory: one trainer at a time, starting over, rolling back. Nothing is deleted.

- **Lock.** The trainer holds an advisory ``fcntl.flock`` on ``RUN_DIR/effdist.lock`` for its whole life
  and writes its host, pid and start time into the file. A second trainer on the same directory fails
  at once with `RunDirLocked`, naming the holder. The kernel drops the lock when the holding process
  ends, however it ends (SIGKILL included), so a stale lock file never blocks the next start.
- **Starting over** (``--resume none``) in a directory that already holds a run is refused with
  `RunDirNotEmpty` unless ``--fresh`` is given; then the old run (checkpoints, metrics.jsonl, tb/,
  config.yaml) is moved into ``RUN_DIR/previous/<UTC time>/``.
- **Rolling back** (``--resume CHECKPOINT`` older than the newest checkpoint): the newer checkpoints are
  moved into ``CHECKPOINT_DIR/rolled-back/<UTC time>/``, so ``--resume auto`` continues the rollback
  line and retention only ever sees the current line of history.

Moves are renames inside one directory tree (never a copy and delete), so they are instant and atomic
per entry. Everything here runs on global rank 0 only; the trainer tells the other ranks the outcome.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

LOCK_FILE = "effdist.lock"
PREVIOUS_DIR = "previous"
ROLLED_BACK_DIR = "rolled-back"
# What a run writes into its directory (besides the data cache, which is derived and reusable).
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "tb", "config.yaml")
_CHECKPOINT_ENTRY_RE = re.compile(r"^iter_(\d{7,})(\.tmp)?$")


class RunDirError(RuntimeError):
    """The run directory's state does not allow what was asked; the message says how to proceed."""


class RunDirLocked(RunDirError):
    """Another trainer holds the run directory."""


class RunDirNotEmpty(RunDirError):
    """--resume none in a directory that already holds a run, without --fresh."""


class RunDirLock:
    """An exclusive advisory lock on RUN_DIR/effdist.lock, held until `release` or the process ends.
    `what` names the directory in the refusal ("checkpoint.dir" for a checkpoint directory elsewhere)."""

    def __init__(self, run_dir: Path, what: str = "run directory"):
        self.path = Path(run_dir) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            other = "--run-dir" if self.what == "run directory" else self.what
            raise RunDirLocked(f"{self.what} {self.path.parent} is in use by another trainer ({holder}); wait "
                               f"for it to finish or stop it, or use another {other}") from None
        except OSError as e:
            os.close(fd)
            raise RunDirError(f"cannot lock {self.path} ({e.strerror}); on a file system without flock support "
                              "use a run directory on one that has it (see docs/launch.md)") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def release_and_remove_dir(self) -> None:
        """For a run refused before it began, in a directory that it created: leave no trace. The lock file is
        unlinked while still held (a trainer starting at the same moment is then refused by the lock, or makes a
        new file that keeps the directory), and the directory is removed only if that left it empty."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.release()
        try:
            self.path.parent.rmdir()
        except OSError:  # not empty: something else is in it now, and it stays
            pass


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown: the lock file is being written"


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _new_dir(parent: Path) -> Path:
    """parent/<UTC time>, made now; -2, -3 ... when one of that second already exists."""
    base = parent / _stamp()
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def checkpoint_entries(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Every iter_N and iter_N.tmp entry of `ckpt_dir` (complete or not), by step."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _CHECKPOINT_ENTRY_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def existing_run(run_dir: Path, ckpt_dir: Path) -> list[str]:
    """What of an earlier run `run_dir` holds (empty: nothing, a new run may start here)."""
    found = []
    steps = [s for s, _ in checkpoint_entries(ckpt_dir)]
    if steps:
        found.append(f"{len(steps)} checkpoint(s) up to step {max(steps)} in {ckpt_dir}")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(f"{metrics} ({sum(1 for _ in open(metrics, 'rb'))} records)")
    return found


class CheckpointDirOfAnotherRun(RunDirError):
    """checkpoint.dir holds the checkpoints of another run directory."""


def check_checkpoint_owner(run_dir: Path, ckpt_dir: Path) -> None:
    """checkpoint.dir set to a directory that another run saved into (two runs sharing one checkpoint.dir): resuming
    from its checkpoints and applying retention there would continue, and delete, the other run's line. Refuse.
    A checkpoint records the run directory that saved it (effdist.json `run_dir`); one without it is not judged,
    nor one whose run directory is gone (the run directory was moved: this is it)."""
    mine = str(Path(run_dir).resolve())
    for _, path in reversed(checkpoint_entries(ckpt_dir)):
        try:
            owner = json.loads((path / "effdist.json").read_text()).get("run_dir")
        except (OSError, ValueError, AttributeError):
            continue
        if owner and owner != mine and Path(owner).is_dir():
            raise CheckpointDirOfAnotherRun(
                f"checkpoint.dir = {str(ckpt_dir)!r} holds the checkpoints of another run ({path.name} was saved by "
                f"the run in {owner}): give this run its own checkpoint.dir (with --set checkpoint.init_from={path} to "
                f"start from that run's weights), or continue that run with --run-dir {owner}")
        if owner:
            return


def check_not_a_running_runs_checkpoints(run_dir: Path, ckpt_dir: Path) -> None:
    """checkpoint.dir set to RUN/checkpoints of another run directory whose trainer is running now: that trainer
    saves there without locking it (it holds its run directory's lock), so two trainers would save into one line
    even before either has a checkpoint there. Refuse, naming it. Only looks: the other run's lock file is not
    written."""
    other = Path(ckpt_dir).resolve().parent
    if Path(ckpt_dir).name != "checkpoints" or other == Path(run_dir).resolve() or not (other / LOCK_FILE).is_file():
        return
    try:
        fd = os.open(other / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirLocked(
            f"checkpoint.dir = {str(ckpt_dir)!r} is the checkpoint directory of the run in {other}, which is "
            f"training now ({holder}): give this run its own checkpoint.dir") from None
    except OSError:
        pass
    os.close(fd)  # closing drops the shared lock taken to look


class RunDirMissingCheckpoints(RunDirError):
    """--resume auto found no checkpoint where the directory says this run had some."""


_RUN_RECORD_SECTIONS = {"model", "parallel", "data", "train", "optim", "checkpoint", "logging"}


def set_aside_foreign_config(run_dir: Path) -> Path | None:
    """A config.yaml in `run_dir` that no trainer wrote (one of the user's, e.g. a hand-written config kept in the
    directory given as --run-dir): move it into previous/<time>/ before the run's record replaces it, and return
    where it went. A trainer's record holds every section of the resolved config; it is replaced as before."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        data = None
    if isinstance(data, dict) and _RUN_RECORD_SECTIONS <= set(data):
        return None
    dest = _new_dir(run_dir / PREVIOUS_DIR)
    os.replace(path, dest / "config.yaml")
    return dest / "config.yaml"


def continue_without_checkpoint(run_dir: Path, ckpt_dir: Path) -> Path | None:
    """--resume auto with no checkpoint entry in `ckpt_dir`. Where the directory says this run had checkpoints
    (a `latest` naming one, or this run's checkpoints moved aside into rolled-back/), starting at step 0 would
    silently throw the run away (a checkpoint directory moved or not mounted, a resume from elsewhere): refuse.
    Where only the records of a run that never saved are there (metrics.jsonl, tb/, config.yaml), move them
    into previous/<time>/ and return it, so the new run's records do not replace them."""
    if checkpoint_entries(ckpt_dir):
        return None
    latest = ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.is_file() else ""
    if named:
        raise RunDirMissingCheckpoints(
            f"--resume auto: {latest} names {named}, which does not exist, and {ckpt_dir} holds no other "
            "checkpoint (moved, deleted, or a file system not mounted?): restore it, give --resume CHECKPOINT, or "
            "start over with --resume none --fresh (moves the old run aside, deletes nothing)")
    aside = sorted((s, p) for d in (ckpt_dir / ROLLED_BACK_DIR).glob("*") if d.is_dir()
                   for s, p in checkpoint_entries(d))
    if aside:
        raise RunDirMissingCheckpoints(
            f"--resume auto: {ckpt_dir} holds no checkpoint; {len(aside)} of this run's were moved aside into "
            f"{ckpt_dir / ROLLED_BACK_DIR}/ (the newest: {aside[-1][1]}) when it resumed from another run's "
            "checkpoint: give --resume CHECKPOINT, or start over with --resume none --fresh")
    if not existing_run(run_dir, ckpt_dir):
        return None
    dest = _new_dir(run_dir / PREVIOUS_DIR)
    for name in RUN_ENTRIES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / name)
    return dest


def check_checkpoint_dir_unchanged(run_dir: Path, ckpt_dir: Path) -> None:
    """--resume auto after checkpoint.dir changed (set, unset or moved since the run last saved): where the
    earlier checkpoint directory holds newer checkpoints than `ckpt_dir`, continuing from `ckpt_dir` would restart
    the run (no checkpoint there: step 0, its records moved aside as a run that never saved) or roll it back
    (an older one: the records after it dropped from metrics.jsonl). Refuse, naming where the newer ones are."""
    current = checkpoint_entries(ckpt_dir)
    newest = current[-1][0] if current else -1
    for earlier in _earlier_checkpoint_dirs(run_dir, ckpt_dir):
        entries = checkpoint_entries(earlier)
        if entries and entries[-1][0] > newest:
            here = "holds no checkpoint" if not current else f"holds checkpoints up to {current[-1][1].name} only"
            raise RunDirMissingCheckpoints(
                f"--resume auto: checkpoint.dir {ckpt_dir} {here}, but this run saved up to {entries[-1][1].name} "
                f"into {earlier} before checkpoint.dir changed: set it back (--set checkpoint.dir={earlier}), "
                f"continue from there with --resume {entries[-1][1]} (later saves go to the new checkpoint.dir), "
                "or start over with --resume none --fresh")


def configured_checkpoint_dir(run_dir: Path) -> str | None:
    """checkpoint.dir as the config.yaml in `run_dir` (the last training invocation's) sets it; None when unset."""
    try:
        import yaml

        return (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("checkpoint", {}).get("dir")
    except Exception:  # no config.yaml, or one effdist did not write: no custom checkpoint directory
        return None


def _earlier_checkpoint_dirs(run_dir: Path, ckpt_dir: Path) -> list[Path]:
    """Where this run saved before, if not into `ckpt_dir`: RUN_DIR/checkpoints, and the checkpoint.dir of the
    config.yaml the last training invocation wrote (a relative one as the trainer read it: from the working
    directory)."""
    dirs = [run_dir / "checkpoints"]
    custom = configured_checkpoint_dir(run_dir)
    if custom:
        dirs.append(Path(custom))
    here = ckpt_dir.resolve()
    return [d for d in dirs if d.is_dir() and d.resolve() != here]


def start_over(run_dir: Path, ckpt_dir: Path, fresh: bool) -> Path | None:
    """--resume none: refuse if an earlier run is there, unless `fresh`; then move it aside and return
    where it went (None when there was nothing to move)."""
    found = existing_run(run_dir, ckpt_dir)
    if not found:
        return None
    if not fresh:
        raise RunDirNotEmpty(
            f"--resume none: run directory {run_dir} already holds a run ({'; '.join(found)}); continue it with "
            "--resume auto, start over with --resume none --fresh (moves it into "
            f"{run_dir / PREVIOUS_DIR}/<time>/, deletes nothing), or use another --run-dir")
    dest = _new_dir(run_dir / PREVIOUS_DIR)
    for name in RUN_ENTRIES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, dest / name)
    if checkpoint_entries(ckpt_dir):
        # checkpoint.dir elsewhere: its old checkpoints go into its own previous/<time>/ (a rename on the
        # same file system, never a copy), and the run's previous/<time>/ says where.
        aside = _new_dir(ckpt_dir / PREVIOUS_DIR)
        for _, p in checkpoint_entries(ckpt_dir):
            os.replace(p, aside / p.name)
        if (ckpt_dir / "latest").exists():
            os.replace(ckpt_dir / "latest", aside / "latest")
        (dest / "checkpoints-moved-to").write_text(f"{aside}\n")
    return dest


def roll_back(ckpt_dir: Path, step: int, reason: str = "rollback") -> tuple[Path | None, list[Path]]:
    """Move every checkpoint entry of `ckpt_dir` newer than `step` into rolled-back/<time>/ (kept, not
    deleted); with step < 0 (the run continues from another run's checkpoint) all of them and the `latest`
    pointer, which belongs to their line. Returns (that directory, the moved entries' new paths); (None, [])
    when none is newer."""
    newer = [p for s, p in checkpoint_entries(ckpt_dir) if s > step]
    if not newer:
        return None, []
    dest = _new_dir(ckpt_dir / ROLLED_BACK_DIR)
    when = f"went back to step {step}" if step >= 0 else "continued from another run's checkpoint"
    (dest / "README").write_text(f"{reason}: moved here when the run {when}\n")
    moved = []
    for p in newer:
        os.replace(p, dest / p.name)
        moved.append(dest / p.name)
    if step < 0 and (ckpt_dir / "latest").exists():
        os.replace(ckpt_dir / "latest", dest / "latest")
    return dest, moved
