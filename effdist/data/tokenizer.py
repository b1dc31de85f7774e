"""Tokenizers: train a byte-level BPE on local text with HF `tokenizers`, or load a local tokenizer.json.

Byte-level BPE (GPT-2 style) never maps text to an unknown token: every string is some sequence of the
256 byte symbols, merged where the training corpus made merges worthwhile. The end-of-document token
`<|endoftext|>` is added as a special token; `effdist preprocess` appends it after every document.
Nothing here touches the network.

    effdist tokenizer train --input corpus.jsonl --vocab-size 32000 --output data/tokenizer.json
    effdist tokenizer show data/tokenizer.json --text "Hello world"
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from effdist.data.verify import DataError, OutputExists
from effdist.runtime.cli_parser import ArgumentParser
from effdist.runtime.progress import Progress, is_terminal

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizers, tried in order when loading one effdist did not train.
KNOWN_EOD_TOKENS = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")
BYTE_ALPHABET_SIZE = 256


class Tokenizer:
    """A loaded tokenizer: encode/decode text, and the ids training needs (end of document, vocab size)."""

    def __init__(self, backend, path: str, eod_token: str):
        self.backend = backend  # tokenizers.Tokenizer
        self.path = path
        self.eod_token = eod_token
        eod = backend.token_to_id(eod_token)
        if eod is None:
            raise DataError(f"tokenizer {path} has no token {eod_token!r}; pass the end-of-document token it uses "
                            f"(e.g. --eod-token '</s>')")
        self.eod: int = eod
        # Entries including added special tokens: every id the tokenizer can emit is below this.
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def sha256(self) -> str:
        return file_sha256(self.path)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_tokenizer_path(path: str | os.PathLike) -> Path:
    """A tokenizer.json file, or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer '{path}' not found: give a tokenizer.json (or a directory with one), e.g. one "
                        "written by `effdist tokenizer train`")
    return p


def load_tokenizer(path: str | os.PathLike, eod_token: str | None = None) -> Tokenizer:
    """Load a local tokenizer.json; the end-of-document token is found by name unless given."""
    from tokenizers import Tokenizer as Backend

    p = resolve_tokenizer_path(path)
    try:
        backend = Backend.from_file(str(p))
    except Exception as e:
        raise DataError(f"tokenizer {p} could not be read ({e}); is it a HF tokenizers tokenizer.json?") from None
    if eod_token is None:
        vocab = backend.get_vocab(with_added_tokens=True)
        eod_token = next((t for t in KNOWN_EOD_TOKENS if t in vocab), None)
        if eod_token is None:
            raise DataError(f"tokenizer {p} has none of the usual end-of-document tokens "
                            f"({', '.join(KNOWN_EOD_TOKENS)}); "
                            "pass the one it uses explicitly (eod_token= / --eod-token)")
    return Tokenizer(backend, str(p), eod_token)


def tokenizer_output(output_path: str | os.PathLike) -> Path:
    """The tokenizer.json that `train_tokenizer` writes for `output_path` (a directory holds one, as `show` reads it)."""
    out = Path(output_path)
    if out.is_dir() or str(output_path).endswith(os.sep):
        out = out / "tokenizer.json"
    return out


def train_tokenizer(files: list[str], vocab_size: int, output_path: str | os.PathLike, text_key: str = "text", *,
                    special_tokens: list[str] | None = None, min_frequency: int = 2,
                    txt_sample_by: str = "document", cache_dir: str | None = None, progress: bool = True,
                    overwrite: bool = False) -> Path:
    """Train a byte-level BPE of at most `vocab_size` entries (bytes + merges + special tokens) on local
    files and write it to `output_path` (a tokenizer.json). The end-of-document token is always included.

    A small corpus may support fewer merges than asked for; the result then has fewer entries, which is
    fine for a model whose embedding has `vocab_size` rows. A tokenizer already at the output is replaced only with
    `overwrite` (else `OutputExists`, before any work): datasets made with it would no longer match it.
    """
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from effdist.data.sources import load_documents

    out = tokenizer_output(output_path)
    if out.exists() and not overwrite:
        raise OutputExists(f"--output {out} exists (datasets made with that tokenizer record its sha256 and would "
                           "no longer match a new one); pass --overwrite to replace it, or choose another --output")
    specials = [EOD_TOKEN] + [t for t in (special_tokens or []) if t != EOD_TOKEN]
    minimum = BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size < minimum:
        raise DataError(f"vocab_size = {vocab_size}: a byte-level BPE needs at least {minimum} entries "
                        f"({BYTE_ALPHABET_SIZE} bytes + {len(specials)} special tokens); choose a larger vocabulary")
    # HF datasets' own bars only on a terminal (in a log they are one long line of \r updates).
    documents = load_documents(list(files), text_key, txt_sample_by=txt_sample_by, cache_dir=cache_dir,
                               progress=progress and is_terminal())
    if len(documents) == 0:
        raise DataError(f"tokenizer training input {list(files)} holds no documents")

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # tokenizers' own bars are off: they write blank lines to stdout when it is not a terminal. effdist's
    # progress counts the documents fed to the trainer, then names the merge phase (which reports no count).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    with Progress("training tokenizer", total=len(documents), unit="docs", enabled=progress) as bar:
        def batches():
            for batch in documents.iter(batch_size=1000):
                yield [t for t in batch["text"] if t]
                bar.update(len(batch["text"]))
            bar.stage("counting pairs and merging")

        backend.train_from_iterator(batches(), trainer=trainer, length=len(documents))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        backend.save(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # a save or rename that failed leaves no stray file beside the output
    return out


# ---------------------------------------------------------------------------------------------- CLI

def build_arg_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="effdist tokenizer", description="Train or inspect a byte-level BPE tokenizer "
                       "(HF tokenizers, local files only).")
    sub = p.add_subparsers(dest="action", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on local text and write tokenizer.json")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text/json/jsonl/parquet files, directories or glob patterns")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="entries including the 256 bytes and special tokens (use the model's model.vocab_size)")
    t.add_argument("--output", required=True, help="where to write tokenizer.json (a file, or a directory to hold it)")
    t.add_argument("--text-key", default="text", help="field holding the text in json/jsonl/parquet (default: text)")
    t.add_argument("--special-tokens", nargs="*", default=[],
                   help=f"extra special tokens ({EOD_TOKEN} is always added)")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    t.add_argument("--txt-sample-by", choices=("document", "paragraph", "line"), default="document",
                   help="for .txt inputs: what one document is (default: a whole file)")
    t.add_argument("--cache-dir", default=None, help="HF datasets cache for the parsed inputs")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a tokenizer already at --output (by default that is refused)")
    s = sub.add_parser("show", help="load a tokenizer.json and print its vocabulary size, EOD id and an encoding")
    s.add_argument("path", help="tokenizer.json or a directory holding one")
    s.add_argument("--text", default="The quick brown fox jumps over the lazy dog.", help="text to encode")
    s.add_argument("--eod-token", default=None, help="end-of-document token (default: found by name)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        if args.action == "train":
            out = train_tokenizer(args.input, args.vocab_size, args.output, args.text_key,
                                  special_tokens=args.special_tokens, min_frequency=args.min_frequency,
                                  txt_sample_by=args.txt_sample_by, cache_dir=args.cache_dir,
                                  overwrite=args.overwrite)
            tok = load_tokenizer(out)
            print(f"wrote {out}: {tok.vocab_size} entries (asked for {args.vocab_size}), "
                  f"end of document {tok.eod_token!r} = id {tok.eod}")
        else:
            tok = load_tokenizer(args.path, args.eod_token)
            ids = tok.encode(args.text)
            print(f"{tok.path}: {tok.vocab_size} entries, end of document {tok.eod_token!r} = id {tok.eod}")
            print(f"{args.text!r} -> {len(ids)} tokens {ids}")
            print(f"decoded: {tok.decode(ids)!r}")
    except OutputExists as e:
        print(f"effdist tokenizer: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"effdist tokenizer: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
