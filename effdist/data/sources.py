"""Text documents from local files or a hub dataset, as one HF `datasets.Dataset` with a "text" column.

Shared by tokenizer training and preprocessing so both read inputs the same way. Local formats:
JSON / JSON lines (one document per record, text under `text_key`), Parquet (same), and plain text
(one document per file by default; per line or per blank-line-separated paragraph on request).
Compressed files (.gz, .bz2, .xz, .zst) are read transparently. An input that is not a local path
is taken as a hub dataset name, which needs network access.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from pathlib import Path

from effdist.data.verify import DataError

COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
TEXT_SAMPLE_BY = ("document", "paragraph", "line")


def file_format(path: str) -> str | None:
    """The `datasets` builder for a file name ("json", "parquet", "text"), or None if not supported."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return FORMATS.get(os.path.splitext(name)[1])


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _looks_like_hub_name(spec: str) -> bool:
    """"name" or "owner/name" without a file extension (only asked when no such local path exists). "dir/name"
    where dir is a local directory is a mistyped path, not a hub dataset to look up over the network."""
    return bool(_HUB_NAME.match(spec)) and file_format(spec) is None and not ("/" in spec and
                                                                              os.path.isdir(spec.split("/")[0]))


def _why(error: BaseException) -> str:
    """The reason of a reader's failure: datasets wraps the real one (a UnicodeDecodeError, an empty file) in
    "An error occurred while generating the dataset", or raises one with no message."""
    reasons, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).strip().splitlines()
        reasons.append(f"{type(error).__name__}: {text[-1]}" if text else type(error).__name__)
        error = error.__cause__ or error.__context__
    return " <- ".join(dict.fromkeys(reasons))


def _no_room(error: BaseException) -> OSError | None:
    """The OSError behind a reader's failure when it is a full, over-quota or read-only file system."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return error
        error = error.__cause__ or error.__context__
    return None


def expand_inputs(inputs: list[str]) -> list[tuple[str, list[str]]]:
    """Group inputs into consecutive (format, files) runs, preserving order; hub names become ("hub", [name])."""
    groups: list[tuple[str, list[str]]] = []

    def add(fmt: str, item: str) -> None:
        if groups and groups[-1][0] == fmt and fmt != "hub":
            groups[-1][1].append(item)
        else:
            groups.append((fmt, [item]))

    for spec in inputs:
        if os.path.isdir(spec):
            files = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file() and file_format(str(p)))
            if not files:
                raise DataError(f"input directory '{spec}' holds no supported files "
                                f"({', '.join(sorted(FORMATS))}, optionally compressed)")
        elif os.path.isfile(spec):
            files = [spec]
        elif any(c in spec for c in "*?["):
            files = sorted(glob.glob(spec, recursive=True))
            if not files:
                raise DataError(f"input pattern '{spec}' matches no files")
        elif _looks_like_hub_name(spec):
            add("hub", spec)
            continue
        else:
            raise DataError(f"input file '{spec}' does not exist")
        for f in files:
            fmt = file_format(f)
            if fmt is None:
                raise DataError(f"input file '{f}': unsupported format; use one of "
                                f"{', '.join(sorted(FORMATS))} (optionally {'/'.join(COMPRESSION_SUFFIXES)})")
            if os.path.getsize(f) == 0:  # datasets' readers fail on it with a bare StopIteration
                if f == spec:
                    raise DataError(f"input file '{f}' is empty")
                continue  # one empty file of a directory or pattern adds no documents
            add(fmt, f)
    if not groups:
        raise DataError("no input given: pass local text/json/jsonl/parquet files or a hub dataset name")
    return groups


@contextlib.contextmanager
def datasets_progress_bars(enabled: bool):
    """HF datasets' progress bars on or off inside the block, as they were afterwards."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if enabled == was_enabled:
        yield
        return
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def load_documents(inputs: list[str], text_key: str = "text", *, txt_sample_by: str = "document",
                   hub_split: str = "train", hub_subset: str | None = None, cache_dir: str | None = None,
                   progress: bool = True):
    """Load every input into one Dataset with a single "text" column, in input order (with HF datasets'
    "Generating train split" bars unless `progress` is false)."""
    if txt_sample_by not in TEXT_SAMPLE_BY:
        raise DataError(f"txt_sample_by = {txt_sample_by!r}: valid values are {', '.join(TEXT_SAMPLE_BY)}")
    with datasets_progress_bars(progress):
        return _load_documents(inputs, text_key, txt_sample_by, hub_split, hub_subset, cache_dir)


def _load_documents(inputs, text_key, txt_sample_by, hub_split, hub_subset, cache_dir):
    import datasets

    parts = []
    for fmt, items in expand_inputs(inputs):
        if fmt == "hub":
            try:
                ds = datasets.load_dataset(items[0], hub_subset, split=hub_split, cache_dir=cache_dir)
            except Exception as e:  # network, auth or name errors all mean the same to the user
                raise DataError(f"'{items[0]}' is no local file or directory, and loading it as a hub dataset "
                                f"(split {hub_split!r}) failed: {e}. Without network access pass local files") from None
            source = items[0]
        else:
            kwargs = {"sample_by": txt_sample_by} if fmt == "text" else {}
            try:
                ds = datasets.load_dataset(fmt, data_files=items, split="train", cache_dir=cache_dir, **kwargs)
            except Exception as e:
                shown = f"{items[:3]}{' ...' if len(items) > 3 else ''}"
                full = _no_room(e)
                if full is not None:  # not the input: the cache datasets writes it into
                    where = cache_dir or "the Hugging Face datasets cache (HF_DATASETS_CACHE, ~/.cache/huggingface)"
                    raise DataError(f"could not load {fmt} input(s) {shown}: cannot write the datasets cache in "
                                    f"{where} ({full.strerror}): free space there or put the cache on another file "
                                    "system (effdist train: data.cache_dir; effdist preprocess/tokenizer: --cache-dir)"
                                    ) from None
                raise DataError(f"could not read {fmt} input(s) {shown}: {_why(e)}") from None
            source = items[0] if len(items) == 1 else f"{items[0]} (+{len(items) - 1} more)"
        column = "text" if fmt == "text" else text_key
        if column not in ds.column_names:
            raise DataError(f"input {source} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                            "pass --text-key with the column that holds the text")
        ds = ds.select_columns([column])
        if column != "text":
            ds = ds.rename_column(column, "text")
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
