"""Check a megatron indexed dataset (<prefix>.bin + <prefix>.idx) before training reads it.

Megatron itself trusts these files: a truncated .bin shows up as a short read deep inside a data
worker, and a token id beyond the embedding table as a CUDA device-side assert hours into a run. Here
every such case becomes a `DataError` up front that names the file, what is wrong and how to fix it.

The .idx layout (megatron.core.datasets.indexed_dataset, version 1), little endian:
    9-byte magic "MMIDIDX\\0\\0", u64 version = 1, u8 dtype code, u64 S = sequence count,
    u64 D = document-index count, then int32 sequence_lengths[S], int64 sequence_pointers[S] (byte
    offsets into .bin), int64 document_indices[D] (sequence index where each document starts, ending
    with S). The .bin is the concatenation of all sequences in that dtype.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effdist.runtime.cli_parser import ArgumentParser

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# Codes of megatron's DType enum.
DTYPE_CODES: dict[int, type[np.number]] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                          6: np.float64, 7: np.float32, 8: np.uint16}
TOKEN_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16)
# Tokens per chunk when scanning ids: bounded memory whatever the dataset size.
SCAN_CHUNK_TOKENS = 1 << 24


class DataError(ValueError):
    """Training data is missing, malformed or does not fit the model. The message says which file and the fix."""


class OutputExists(DataError):
    """A data command's output is already there (a dataset or tokenizer someone made, perhaps one that runs train
    on): it is replaced only when the user passes --overwrite. A usage error (exit 2), said before any work."""


@dataclass(frozen=True)
class IndexedDatasetSummary:
    prefix: str
    dtype: str
    num_documents: int
    num_sequences: int
    num_tokens: int
    max_token_id: int


def _rebuild_hint(prefix: str) -> str:
    return f"rebuild it with `effdist preprocess --input ... --tokenizer ... --output-prefix {prefix} --overwrite`"


def _rebuild_sentence(prefix: str) -> str:
    return _rebuild_hint(prefix).capitalize()


def read_index(prefix: str) -> tuple[type[np.number], np.ndarray, np.ndarray, np.ndarray]:
    """Parse and check <prefix>.idx; return (dtype, sequence_lengths, sequence_pointers, document_indices)."""
    idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DataError(
                f"dataset '{prefix}': {path} does not exist. A dataset prefix names the pair {prefix}.bin / "
                f"{prefix}.idx (no extension); check data.paths, or {_rebuild_hint(prefix)}")
    size = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
        header = f.read(INDEX_HEADER_BYTES)
    if len(header) < INDEX_HEADER_BYTES:
        raise DataError(f"{idx_path} is truncated ({size} bytes, shorter than the {INDEX_HEADER_BYTES}-byte header); "
                        f"{_rebuild_hint(prefix)}")
    if header[:9] != INDEX_MAGIC:
        raise DataError(f"{idx_path} is not a megatron index file (bad magic bytes {header[:9]!r}); it may be "
                        f"corrupt or another format. {_rebuild_sentence(prefix)}")
    version, code, num_sequences, num_doc_indices = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise DataError(f"{idx_path}: index version {version} is not supported (expected 1); {_rebuild_hint(prefix)}")
    if code not in DTYPE_CODES or DTYPE_CODES[code] not in TOKEN_DTYPES:
        raise DataError(f"{idx_path}: dtype code {code} is not an integer token type; the file is corrupt. "
                        f"{_rebuild_sentence(prefix)}")
    dtype = DTYPE_CODES[code]
    expected = INDEX_HEADER_BYTES + 12 * num_sequences + 8 * num_doc_indices
    # Multimodal indices carry one extra int8 mode per sequence; training only reads the part before it.
    if size < expected:
        raise DataError(f"{idx_path} is truncated: the header announces {num_sequences} sequences and "
                        f"{max(num_doc_indices - 1, 0)} documents ({expected} bytes) but the file has {size} bytes. "
                        f"{_rebuild_sentence(prefix)}")
    if size not in (expected, expected + num_sequences):
        raise DataError(f"{idx_path} has {size} bytes but its header describes {expected}; the index is corrupt or "
                        f"was overwritten while being read. {_rebuild_sentence(prefix)}")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    offset = INDEX_HEADER_BYTES
    lengths = np.frombuffer(raw, dtype=np.int32, count=num_sequences, offset=offset)
    offset += lengths.nbytes
    pointers = np.frombuffer(raw, dtype=np.int64, count=num_sequences, offset=offset)
    offset += pointers.nbytes
    doc_indices = np.frombuffer(raw, dtype=np.int64, count=num_doc_indices, offset=offset)
    return dtype, lengths, pointers, doc_indices


def verify_indexed_dataset(prefix: str | os.PathLike, vocab_size: int | None = None,
                           scan_tokens: bool = True) -> IndexedDatasetSummary:
    """Raise DataError unless <prefix>.bin/.idx form a consistent, non-empty dataset whose token ids
    all lie below `vocab_size` (the model's embedding rows). Returns what was found."""
    prefix = str(prefix)
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    dtype, lengths, pointers, doc_indices = read_index(prefix)
    itemsize = np.dtype(dtype).itemsize
    num_sequences = int(lengths.shape[0])

    if doc_indices.shape[0] == 0 or doc_indices[0] != 0:
        raise DataError(f"{idx_path}: the document index must start at sequence 0; the index is corrupt. "
                        f"{_rebuild_sentence(prefix)}")
    if doc_indices[-1] != num_sequences or np.any(np.diff(doc_indices) < 0):
        raise DataError(f"{idx_path}: document boundaries do not cover the {num_sequences} sequences in order "
                        f"(last boundary {int(doc_indices[-1])}); the index is corrupt. {_rebuild_sentence(prefix)}")
    num_documents = int(doc_indices.shape[0]) - 1
    if num_documents == 0 or num_sequences == 0:
        raise DataError(f"dataset '{prefix}' is empty (0 documents): the input had no text under the chosen "
                        "--text-key, or every document was blank. Check the input files and preprocess again")
    if np.any(lengths < 0):
        raise DataError(f"{idx_path}: negative sequence lengths; the index is corrupt. {_rebuild_sentence(prefix)}")
    num_tokens = int(lengths.sum(dtype=np.int64))
    if num_tokens == 0:
        raise DataError(f"dataset '{prefix}' is empty: {num_documents} documents but 0 tokens. Check the input "
                        "text and preprocess again")
    expected_pointers = np.zeros(num_sequences, dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expected_pointers[1:])
    if not np.array_equal(pointers, expected_pointers):
        first = int(np.flatnonzero(pointers != expected_pointers)[0])
        raise DataError(f"{idx_path}: sequence {first} starts at byte {int(pointers[first])} but the lengths before "
                        f"it put it at {int(expected_pointers[first])}; the index is corrupt. "
                        f"{_rebuild_sentence(prefix)}")

    bin_size = os.path.getsize(bin_path)
    expected_bin = num_tokens * itemsize
    if bin_size < expected_bin:
        raise DataError(f"{bin_path} is truncated: {prefix}.idx describes {num_tokens} tokens "
                        f"({expected_bin} bytes of {np.dtype(dtype).name}) but the file has {bin_size} bytes. "
                        f"Copy it again or {_rebuild_hint(prefix)}")
    if bin_size != expected_bin:
        raise DataError(f"{bin_path} has {bin_size} bytes but {prefix}.idx describes {expected_bin} "
                        f"({num_tokens} tokens of {np.dtype(dtype).name}): .bin and .idx do not belong together "
                        f"(written by different runs?). {_rebuild_sentence(prefix)}")

    max_token_id = -1
    if scan_tokens:
        max_token_id = _scan_token_ids(prefix, dtype, num_tokens, lengths, doc_indices, vocab_size)
    return IndexedDatasetSummary(prefix=prefix, dtype=np.dtype(dtype).name, num_documents=num_documents,
                                 num_sequences=num_sequences, num_tokens=num_tokens, max_token_id=max_token_id)


def _scan_token_ids(prefix: str, dtype: type[np.number], num_tokens: int, lengths: np.ndarray,
                    doc_indices: np.ndarray, vocab_size: int | None) -> int:
    """Max token id over the whole .bin, read in bounded chunks; DataError at the first id out of range."""
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(num_tokens,))
    max_id = -1
    for start in range(0, num_tokens, SCAN_CHUNK_TOKENS):
        chunk = tokens[start:start + SCAN_CHUNK_TOKENS]
        lo, hi = int(chunk.min()), int(chunk.max())
        bad = None
        if lo < 0:
            bad = start + int(np.argmax(chunk < 0))
        elif vocab_size is not None and hi >= vocab_size:
            bad = start + int(np.argmax(chunk >= vocab_size))
        if bad is not None:
            sequence_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
            sequence = int(np.searchsorted(sequence_starts, bad, side="right")) - 1
            document = int(np.searchsorted(doc_indices, sequence, side="right")) - 1
            value = int(tokens[bad])
            position = bad - int(sequence_starts[sequence])
            if value < 0:
                raise DataError(f"{prefix}.bin: negative token id {value} in document {document} (token "
                                f"{position}); the file is corrupt. {_rebuild_sentence(prefix)}")
            raise DataError(
                f"{prefix}.bin: token id {value} in document {document} (token {position} "
                f"of it) is >= the vocabulary size {vocab_size} (model.vocab_size). The data was tokenized with a "
                f"larger tokenizer than this model's: preprocess it again with the model's tokenizer, or raise "
                f"model.vocab_size to at least {hi + 1}")
        max_id = max(max_id, hi)
    return max_id


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m effdist.data.verify",
                       description="Check megatron .bin/.idx datasets for corruption and out-of-range ids.")
    p.add_argument("prefixes", nargs="+", help="dataset prefixes (paths without .bin/.idx)")
    p.add_argument("--vocab-size", type=int, default=None, help="token ids must be below this (model.vocab_size)")
    args = p.parse_args(argv)
    status = 0
    for prefix in args.prefixes:
        try:
            s = verify_indexed_dataset(prefix, args.vocab_size)
        except DataError as e:
            print(f"FAIL {prefix}: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"ok   {prefix}: {s.num_documents} documents, {s.num_tokens} tokens ({s.dtype}), max id {s.max_token_id}")
    return status


if __name__ == "__main__":
    sys.exit(main())
