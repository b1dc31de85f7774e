"""megatron's index caches (document/sample/shuffle and blend indices, ``*.npy`` under the data's
``index-cache`` directory): written whole or not at all, and a torn one rebuilt with one line.

megatron-core's GPTDataset and BlendedDataset write these with ``numpy.save`` straight to their final
names, and on the next start take "every file exists" for a cache hit. A rank killed while writing
(SIGKILL, OOM, a node lost) therefore left a truncated ``.npy`` that made every later start fail with a
numpy traceback. Two guards, around megatron's builder, without patching megatron:

- `atomic_numpy_saves()`: while the builder runs, ``numpy.save`` to a path writes a temporary file
  beside it, flushes it to disk and renames it into place (``os.replace``), so an index file is complete
  or absent; an absent one is rebuilt by megatron.
- `remove_torn_caches(directory)`: before the builder runs (on the rank that builds), every ``.npy``
  whose header or length is wrong is removed with one line naming it, so megatron rebuilds it. The
  files are derived data (rebuilt from the dataset and the seed in seconds), never a user's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy
from numpy.lib import format as fmt

_TMP_MARK = ".partial-"


def torn_reason(path: Path) -> str | None:
    """Why `path` is not a complete ``.npy`` file, or None when it is one."""
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read_header is None:
                return None  # format 3 (unicode field names): not what megatron writes; let numpy judge
            shape, _fortran, dtype = read_header(f)
            header_end = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError) as e:
        return f"unreadable header ({e})"
    if dtype.hasobject:
        return None  # pickled contents: no fixed length to check (megatron's indices are integers)
    expected = header_end + int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    if size < expected:
        return f"{size} of {expected} bytes"
    return None


def remove_torn_caches(directory: str | os.PathLike) -> list[Path]:
    """Remove the incomplete index files under `directory` (one line each) and the temporary files of
    writers that no longer run; returns the removed index files."""
    root = Path(directory)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.glob("*.npy")):
        why = torn_reason(path)
        if why is None:
            continue
        print(f"[effdist] index cache {path} is incomplete ({why}; a run was stopped while writing it): "
              "rebuilding it", file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed.append(path)
    for tmp in root.glob(f"*{_TMP_MARK}*"):
        pid = tmp.name.rsplit(_TMP_MARK, 1)[1].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_numpy_saves() -> Iterator[None]:
    """Within the block, ``numpy.save(path, ...)`` writes `path` atomically (temporary file + fsync +
    os.replace). Saves to open file objects are unchanged. Main thread only (the patch is process-wide)."""
    original = numpy.save

    def save(file, arr, *args, **kwargs):
        if not isinstance(file, (str, os.PathLike)):
            return original(file, arr, *args, **kwargs)
        final = os.fspath(file)
        if not final.endswith(".npy"):
            final += ".npy"  # what numpy.save does with a path
        tmp = f"{final}{_TMP_MARK}{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                original(f, arr, *args, **kwargs)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    numpy.save = save
    try:
        yield
    finally:
        numpy.save = original
