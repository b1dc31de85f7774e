"""Tokenize text into megatron indexed datasets (<prefix>.bin + <prefix>.idx).

Inputs are read with HF `datasets` (local json/jsonl/parquet/text files, or a hub dataset where the
network allows), tokenized with `datasets.map` (optionally in several processes), and written with
megatron-core's `IndexedDatasetBuilder`, one document per input record followed by the end-of-document
token. Token ids are stored as uint16 when the vocabulary has fewer than 65500 entries, else int32; the
dtype is recorded in the .idx. A small `<prefix>.meta.json` beside them records the tokenizer and
counts, so later steps can tell which tokenizer a dataset belongs to.

    effdist preprocess --input corpus.jsonl --tokenizer data/tokenizer.json --output-prefix data/corpus
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from effdist.data.tokenizer import load_tokenizer
from effdist.data.verify import DataError, OutputExists
from effdist.runtime.cli_parser import ArgumentParser
from effdist.runtime.progress import Progress, is_terminal

META_FORMAT = "effdist-indexed-v1"
ENCODE_BATCH = 1000
# Progress granularity of tokenizing: at most MAX_PIECES pieces, each of at least MIN_PIECE_DOCS documents
# per worker (each piece starts the map's worker pool once).
MAX_PIECES = 50
MIN_PIECE_DOCS = 20_000

# Loaded once per worker process of datasets.map (the tokenizer object itself is not shipped per batch).
_worker_tokenizers: dict[str, object] = {}


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 halves the file size while every id fits; megatron uses the same 65500 threshold."""
    return np.uint16 if vocab_size < 65500 else np.int32


def meta_path(prefix: str | os.PathLike) -> Path:
    return Path(str(prefix) + ".meta.json")


def read_meta(prefix: str | os.PathLike) -> dict | None:
    p = meta_path(prefix)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _encode_batch(batch: dict, tokenizer_path: str, append_eod: bool) -> dict:
    tok = _worker_tokenizers.get(tokenizer_path)
    if tok is None:
        tok = _worker_tokenizers[tokenizer_path] = load_tokenizer(tokenizer_path)
    texts = [t if isinstance(t, str) else "" for t in batch["text"]]
    encoded = tok.encode_batch(texts)
    ids = []
    for text, e in zip(texts, encoded):
        # A blank record yields no tokens at all (not a lone EOD), and is skipped when writing.
        if not text.strip():
            ids.append([])
        else:
            ids.append(e + [tok.eod] if append_eod else e)
    return {"ids": ids}


def preprocess(inputs: list[str], tokenizer_path: str | os.PathLike, output_prefix: str | os.PathLike,
               text_key: str = "text", workers: int = 1, *, append_eod: bool = True, txt_sample_by: str = "document",
               hub_split: str = "train", hub_subset: str | None = None, cache_dir: str | None = None,
               progress: bool = True, overwrite: bool = False) -> str:
    """Write <output_prefix>.bin/.idx (+ .meta.json) from `inputs`; return `output_prefix`. A dataset already at
    `output_prefix` is replaced only with `overwrite` (else `OutputExists`, before any work)."""
    import datasets
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from effdist.data.sources import datasets_progress_bars, load_documents

    if workers < 1:
        raise DataError(f"workers = {workers}: must be at least 1")
    output_prefix = str(output_prefix)
    if not overwrite:
        refuse_existing_dataset(output_prefix)
    tok = load_tokenizer(tokenizer_path)
    # HF datasets' own bars only on a terminal (in a log they are one long line of \r updates).
    documents = load_documents(list(inputs), text_key, txt_sample_by=txt_sample_by, hub_split=hub_split,
                               hub_subset=hub_subset, cache_dir=cache_dir, progress=progress and is_terminal())
    if workers > 1:
        # Forked map workers and the Rust thread pool of a tokenizer used in the parent do not mix.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Tokenized in contiguous pieces so that effdist's progress (a bar, or lines in a log) can count them;
    # the pieces are concatenated in order, so the output is the same as one map over everything.
    n = len(documents)
    piece = max(MIN_PIECE_DOCS * workers, -(-n // MAX_PIECES))
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value("int32"))})
    parts = []
    with datasets_progress_bars(False), Progress("tokenizing", total=n, unit="docs", enabled=progress) as bar:
        for start in range(0, n, piece):
            part = documents.select(range(start, min(n, start + piece))) if piece < n else documents
            parts.append(part.map(
                _encode_batch, batched=True, batch_size=ENCODE_BATCH, num_proc=workers if workers > 1 else None,
                remove_columns=["text"], fn_kwargs={"tokenizer_path": tok.path, "append_eod": append_eod},
                features=features))
            bar.update(len(part))
    tokenized = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    dtype = token_dtype(tok.vocab_size)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    num_documents = num_tokens = skipped = 0
    bar = Progress("writing .bin/.idx", total=len(tokenized), unit="docs", enabled=progress)
    try:
        for chunk in tokenized.data.column("ids").chunks:
            offsets = chunk.offsets.to_numpy()
            values = chunk.values.to_numpy(zero_copy_only=False)
            for start, end in zip(offsets[:-1], offsets[1:]):
                if end == start:
                    skipped += 1
                    continue
                builder.add_document(values[start:end], [int(end - start)])
                num_documents += 1
                num_tokens += int(end - start)
            bar.update(len(offsets) - 1)
        builder.finalize(tmp_prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(tmp_prefix + ext).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    if num_documents == 0:
        for ext in (".bin", ".idx"):
            Path(tmp_prefix + ext).unlink(missing_ok=True)
        raise DataError(f"inputs {list(inputs)} produced no documents (all {skipped} records were blank or the "
                        f"text field {text_key!r} was empty); nothing written to {output_prefix}")
    # The pair is replaced together and the metadata last, so a reader never trusts a half-written dataset.
    meta_path(output_prefix).unlink(missing_ok=True)
    os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
    os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    meta = {"format": META_FORMAT, "tokenizer": str(Path(tok.path).resolve()), "tokenizer_sha256": tok.sha256(),
            "vocab_size": tok.vocab_size, "eod": tok.eod, "append_eod": append_eod, "dtype": np.dtype(dtype).name,
            "documents": num_documents, "tokens": num_tokens, "skipped_blank": skipped,
            "inputs": [str(i) for i in inputs], "text_key": text_key}
    meta_path(output_prefix).write_text(json.dumps(meta, indent=2) + "\n")
    return output_prefix


def refuse_existing_dataset(prefix: str) -> None:
    """Raise OutputExists naming what is at `prefix` (its files and, from its .meta.json, what it holds)."""
    present = [str(p) for p in (Path(prefix + ".bin"), Path(prefix + ".idx"), meta_path(prefix)) if p.exists()]
    if not present:
        return
    meta = read_meta(prefix) or {}
    counts = [f"{meta[key]:,} {key}" for key in ("documents", "tokens") if isinstance(meta.get(key), int)]
    held = f": {', '.join(counts)}" if counts else ""
    raise OutputExists(f"--output-prefix {prefix} already holds a dataset ({', '.join(present)}{held}); pass "
                       "--overwrite to replace it, or choose another --output-prefix")


def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist preprocess",
                       description="Tokenize text into megatron .bin/.idx datasets (one EOD token after "
                                   "each document).")
    p.add_argument("--input", nargs="+", required=True, metavar="INPUT",
                   help="json/jsonl/parquet/txt files, directories, glob patterns, or a hub dataset name")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (e.g. from `effdist tokenizer train`)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx and PREFIX.meta.json")
    p.add_argument("--text-key", default="text", help="field holding the text in json/jsonl/parquet (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (datasets.map num_proc)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    p.add_argument("--txt-sample-by", choices=("document", "paragraph", "line"), default="document",
                   help="for .txt inputs: what one document is (default: a whole file)")
    p.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    p.add_argument("--subset", default=None, help="configuration/subset of a hub dataset")
    p.add_argument("--cache-dir", default=None, help="HF datasets cache (default: the HF default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a dataset already at --output-prefix (by default that is refused)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        prefix = preprocess(args.input, args.tokenizer, args.output_prefix, args.text_key, args.workers,
                            append_eod=not args.no_eod, txt_sample_by=args.txt_sample_by, hub_split=args.split,
                            hub_subset=args.subset, cache_dir=args.cache_dir, progress=not args.quiet,
                            overwrite=args.overwrite)
    except OutputExists as e:
        print(f"effdist preprocess: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"effdist preprocess: error: {e}", file=sys.stderr)
        return 1
    meta = read_meta(prefix)
    print(f"wrote {prefix}.bin/.idx: {meta['documents']} documents, {meta['tokens']} tokens ({meta['dtype']}), "
          f"{meta['skipped_blank']} blank records skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
