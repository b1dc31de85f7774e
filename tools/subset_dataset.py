#!/usr/bin/env python
"""The first documents of a tokenized dataset, as a dataset of its own: a corpus small enough to carry to a GPU
machine in one device call (docs/data.md, "A subset for one device call").

    python tools/subset_dataset.py --input data/english-large/train --tokens 36000000 \\
        --output-prefix data/english-large/train36

Whole documents from the start of --input until --tokens are reached (the large preset's documents come in a
hashed package order, so the start is a fair sample of the packages); the .meta.json of --input is kept, with
this subset's documents and tokens and `subset_of`. No tokenizing: the ids are copied.

With --after PREFIX (another subset of the same --input) the documents start after that subset's: text no run
on PREFIX has seen, e.g. for continuing a model trained on it (`first_document` in the .meta.json):

    python tools/subset_dataset.py --input data/english-large/train --after data/english-large/train36 \
        --tokens 10500000 --output-prefix data/english-large/cont10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SubsetError(ValueError):
    """An --after that is not an earlier subset of --input (one line for the user)."""


def first_document_after(prefix: str, after: str) -> int:
    """The index in `prefix` of the first document after the subset `after` (its .meta.json's `subset_of` must be
    `prefix`; a subset made with --after itself starts at its `first_document`)."""
    from effdist.data.preprocess import read_meta

    meta = read_meta(after)
    if not meta or "documents" not in meta:
        raise SubsetError(f"--after {after}: no {after}.meta.json with `documents`; give a subset this tool wrote")
    if "subset_of" not in meta:
        raise SubsetError(f"--after {after}: not a subset (its .meta.json has no `subset_of`); give a subset of "
                          f"--input {prefix} that this tool wrote")
    if Path(str(meta["subset_of"])).resolve() != Path(prefix).resolve():
        raise SubsetError(f"--after {after}: a subset of {meta['subset_of']}, not of --input {prefix}; give a "
                          "subset of the same dataset")
    return int(meta.get("first_document", 0)) + int(meta["documents"])


def subset(prefix: str, tokens: int, output: str, first: int = 0) -> dict:
    """Write `output`.bin/.idx/.meta.json from the documents of `prefix` from index `first` on holding >= `tokens`
    tokens (all of them if they hold fewer); return the new metadata."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from effdist.data.preprocess import meta_path, read_meta

    source = IndexedDataset(prefix)
    lengths = np.asarray(source.sequence_lengths, dtype=np.int64)[first:]
    if not len(lengths):
        raise SubsetError(f"--after: {prefix} has no documents after its first {first}; nothing is left to take")
    count = int(np.searchsorted(np.cumsum(lengths), tokens) + 1) if lengths.sum() > tokens else len(lengths)
    builder = IndexedDatasetBuilder(output + ".bin", dtype=source.index.dtype)
    for i in range(count):
        builder.add_document(source[first + i], [int(lengths[i])])
    builder.finalize(output + ".idx")
    meta = dict(read_meta(prefix) or {})
    meta.update(documents=count, tokens=int(lengths[:count].sum()), subset_of=str(prefix))
    if first:
        meta["first_document"] = first
    meta_path(output).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="prefix of a tokenized dataset (PREFIX.bin/.idx)")
    p.add_argument("--tokens", type=int, required=True, help="take whole documents until this many tokens")
    p.add_argument("--output-prefix", dest="output", required=True, help="prefix to write (as effdist preprocess's)")
    p.add_argument("--after", default=None, metavar="PREFIX",
                   help="start after the documents of this subset of --input (text its runs have not seen)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output")
    args = p.parse_args(argv)
    if args.tokens < 1:
        print(f"subset_dataset: --tokens {args.tokens}: must be at least 1", file=sys.stderr)
        return 2
    if not (Path(args.input + ".bin").exists() and Path(args.input + ".idx").exists()):
        print(f"subset_dataset: --input {args.input}: no {args.input}.bin/.idx here; give a dataset prefix "
              "(effdist preprocess --output-prefix)", file=sys.stderr)
        return 2
    if Path(args.output).resolve() == Path(args.input).resolve():
        print(f"subset_dataset: --output-prefix {args.output} is --input; give another prefix", file=sys.stderr)
        return 2
    if not args.overwrite:
        from effdist.data.preprocess import refuse_existing_dataset
        from effdist.data.verify import OutputExists

        try:
            refuse_existing_dataset(args.output)
        except OutputExists as e:
            print(f"subset_dataset: {e}", file=sys.stderr)
            return 2
    try:
        first = first_document_after(args.input, args.after) if args.after else 0
        meta = subset(args.input, args.tokens, args.output, first)
    except SubsetError as e:
        print(f"subset_dataset: {e}", file=sys.stderr)
        return 2
    where = f"from document {first:,} of {args.input}, after {args.after}" if first else f"the first of {args.input}"
    print(f"{args.output}: {meta['documents']:,} documents, {meta['tokens']:,} tokens ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
