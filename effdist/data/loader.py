"""Training data for the trainer: resolve/build the data a config names, wrap it in megatron-core
GPT datasets, and cut it into this rank's microbatches for every optimizer step.

Three steps, each with one job:
  prepare_data(cfg, run_dir)            -> DataPaths   (one process builds corpus/tokenizer/.bin/.idx)
  build_train_valid_datasets(...)       -> (train, valid) megatron GPTDataset / BlendedDataset / Mock
  MicrobatchLoader(train, ...)          -> per step: this data-parallel rank's list of microbatches

The order of samples is fixed by `train.seed` (megatron's shuffles) and by the step number alone:
step k uses global samples [k*G, (k+1)*G) and data-parallel rank d the contiguous slice
[k*G + d*G/dp, k*G + (d+1)*G/dp). A DP=2 run therefore sees exactly the global batches of a single
process, and resuming from a saved `MicrobatchLoader.state_dict()` continues the same sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from effdist.data.index_cache import atomic_numpy_saves, remove_torn_caches
from effdist.data.verify import DataError, verify_indexed_dataset

SAMPLE_CORPUS_SEED = 0
SAMPLE_PREFIX_NAME = "sample_text_document"
MICROBATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


@dataclass(frozen=True)
class DataPaths:
    """What build_train_valid_datasets needs, resolved from the config (and built, for kind=sample)."""

    kind: str  # sample | indexed | mock
    prefixes: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    tokenizer_path: str | None = None
    # Entries of the tokenizer (or model.vocab_size for mock data); every token id is below it.
    vocab_size: int = 0
    # End-of-document id; None when unknown (indexed data without a tokenizer or metadata).
    eod: int | None = None
    # Where megatron writes its document/sample/shuffle index caches.
    index_cache_dir: str = ""


def data_root(cfg, run_dir: str | os.PathLike) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(run_dir) / "data"


def sample_data_dir(cfg, run_dir: str | os.PathLike) -> Path:
    """One directory per (documents, vocab) so runs with different models can share a cache_dir."""
    from effdist.data.sample_corpus import GENERATOR_VERSION

    name = f"sample-v{GENERATOR_VERSION}-{cfg.data.sample_documents}docs-vocab{cfg.model.vocab_size}"
    return data_root(cfg, run_dir) / name


# ------------------------------------------------------------------------------------ prepare_data

def prepare_data(cfg, run_dir: str | os.PathLike, build: bool = True) -> DataPaths:
    """Resolve the data the config names; with build=True also create and verify it.

    Call with build=True on exactly one process (global rank 0) before the others call it with
    build=False (or `resolve_data_paths`), which only looks the files up. Building is idempotent: a
    sample dataset already built with the same parameters is reused.
    """
    kind = cfg.data.kind
    root = data_root(cfg, run_dir)
    if kind == "mock":
        return DataPaths(kind="mock", vocab_size=cfg.model.vocab_size, eod=cfg.model.vocab_size - 1,
                         index_cache_dir=str(root / "index-cache"))
    if kind == "sample":
        return _prepare_sample(cfg, run_dir, build)
    if kind == "indexed":
        return _prepare_indexed(cfg, root, build)
    raise DataError(f"data.kind = {kind!r}: valid values are sample, indexed, mock")


def resolve_data_paths(cfg, run_dir: str | os.PathLike) -> DataPaths:
    """The paths prepare_data built, without building anything (for ranks other than 0)."""
    return prepare_data(cfg, run_dir, build=False)


def _prepare_sample(cfg, run_dir, build: bool) -> DataPaths:
    from effdist.data.tokenizer import load_tokenizer

    directory = sample_data_dir(cfg, run_dir)
    if build and not _sample_is_current(cfg, directory):
        with _building(directory):
            if not _sample_is_current(cfg, directory):  # another process may have built it meanwhile
                _build_sample(cfg, directory)
    prefix = str(directory / SAMPLE_PREFIX_NAME)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file() or not Path(prefix + ".idx").is_file():
        raise DataError(f"the sample dataset is not built under {directory}; prepare_data(cfg, run_dir) must run "
                        "with build=True on rank 0 before the other ranks look it up")
    tok = load_tokenizer(tokenizer_path)
    _check_vocab_fits(tok.vocab_size, cfg.model.vocab_size, str(tokenizer_path))
    if build:
        verify_indexed_dataset(prefix, cfg.model.vocab_size)
    return DataPaths(kind="sample", prefixes=[prefix], weights=None, tokenizer_path=str(tokenizer_path),
                     vocab_size=tok.vocab_size, eod=tok.eod, index_cache_dir=str(directory / "index-cache"))


def _sample_manifest(cfg) -> dict[str, Any]:
    from effdist.data.sample_corpus import GENERATOR_VERSION

    return {"generator_version": GENERATOR_VERSION, "documents": cfg.data.sample_documents,
            "corpus_seed": SAMPLE_CORPUS_SEED, "vocab_size": cfg.model.vocab_size}


def _sample_is_current(cfg, directory: Path) -> bool:
    from effdist.data.preprocess import read_meta

    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    meta = read_meta(directory / SAMPLE_PREFIX_NAME)
    if manifest.get("inputs") != _sample_manifest(cfg) or meta is None:
        return False
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        return False
    from effdist.data.tokenizer import file_sha256

    return meta.get("tokenizer_sha256") == file_sha256(tokenizer)


@contextlib.contextmanager
def _building(directory: Path) -> Iterator[None]:
    """Hold an exclusive flock on `<directory>.lock` while the sample dataset is built.

    Why: runs that share data.cache_dir (two jobs, or tests side by side) may start at the same moment; without
    it each builds, and the later one replaces the directory while the earlier one's ranks read from it. The
    kernel drops the lock when its holder ends, however it ends, so a killed build never blocks the next one.
    """
    import fcntl

    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = directory.with_name(f"{directory.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[effdist] waiting for another process that builds {directory}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the flock


def _build_sample(cfg, directory: Path) -> None:
    """Corpus -> tokenizer of model.vocab_size entries -> .bin/.idx, built beside the final directory
    and renamed into place, so a crash or a concurrent run never leaves a half-built dataset there."""
    from effdist.data.tokenizer import BYTE_ALPHABET_SIZE

    if cfg.model.vocab_size <= BYTE_ALPHABET_SIZE:
        raise DataError(f"model.vocab_size = {cfg.model.vocab_size}: data.kind=sample trains a byte-level BPE with "
                        f"that many entries, which needs more than {BYTE_ALPHABET_SIZE} (the bytes plus the "
                        "end-of-document token); raise model.vocab_size or use data.kind=mock")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Called under _building's lock, so no other build of this dataset runs: staging directories left by builds
    # that were killed (SIGKILL, OOM) are derived data and go.
    for stale in directory.parent.glob(f"{directory.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        _build_sample_in(cfg, directory, staging)
    except BaseException:  # a stop (Ctrl-C, SIGTERM) or a failure: no half-built staging directory stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _build_sample_in(cfg, directory: Path, staging: Path) -> None:
    """The build itself, in `staging`, then renamed to `directory`."""
    from effdist.data.preprocess import preprocess
    from effdist.data.sample_corpus import write_sample_corpus
    from effdist.data.tokenizer import train_tokenizer

    hf_cache = staging / "hf-cache"
    corpus = write_sample_corpus(staging / "corpus.jsonl", cfg.data.sample_documents, SAMPLE_CORPUS_SEED)
    train_tokenizer([str(corpus)], cfg.model.vocab_size, staging / "tokenizer.json", cache_dir=str(hf_cache),
                    progress=False)
    preprocess([str(corpus)], staging / "tokenizer.json", staging / SAMPLE_PREFIX_NAME, cache_dir=str(hf_cache),
               progress=False)
    shutil.rmtree(hf_cache, ignore_errors=True)
    (staging / "manifest.json").write_text(json.dumps({"inputs": _sample_manifest(cfg)}, indent=2) + "\n")
    # The tokenizer path recorded in the metadata must point at the final location.
    from effdist.data.preprocess import meta_path, read_meta

    meta = read_meta(staging / SAMPLE_PREFIX_NAME)
    meta["tokenizer"] = str((directory / "tokenizer.json").resolve())
    meta["inputs"] = [str((directory / "corpus.jsonl").resolve())]
    meta_path(staging / SAMPLE_PREFIX_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    if directory.exists():
        stale = directory.with_name(f"{directory.name}.stale-{os.getpid()}")
        os.replace(directory, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, directory)
    except OSError:
        # Another process finished the same build first; its result is identical, keep it.
        shutil.rmtree(staging, ignore_errors=True)


def _prepare_indexed(cfg, root: Path, build: bool) -> DataPaths:
    from effdist.data.preprocess import read_meta
    from effdist.data.tokenizer import load_tokenizer

    prefixes = [_strip_extension(p) for p in cfg.data.paths]
    if not prefixes:
        raise DataError("data.paths is empty: data.kind=indexed needs at least one dataset prefix "
                        "(a path without .bin/.idx, as written by `effdist preprocess --output-prefix`)")
    vocab_size, eod, tokenizer_path, tokenizer_sha = None, None, None, None
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
        _check_vocab_fits(tok.vocab_size, cfg.model.vocab_size, tok.path)
        vocab_size, eod, tokenizer_path, tokenizer_sha = tok.vocab_size, tok.eod, tok.path, tok.sha256()
    identities = []
    for prefix in prefixes:
        if not build and not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise DataError(f"dataset '{prefix}': {prefix}.bin/.idx not found (check data.paths)")
        if build:
            verify_indexed_dataset(prefix, cfg.model.vocab_size, scan_tokens=False)  # structure first
        identities.append(_dataset_identity(prefix))
        if build:
            _verify_once(prefix, identities[-1], cfg.model.vocab_size, root)
        meta = read_meta(prefix)
        if meta is None:
            continue
        _check_vocab_fits(int(meta["vocab_size"]), cfg.model.vocab_size,
                          f"{prefix} (tokenized with {meta['tokenizer']})")
        if tokenizer_sha is not None and meta.get("tokenizer_sha256") not in (None, tokenizer_sha):
            raise DataError(f"dataset '{prefix}' was tokenized with {meta['tokenizer']}, not with data.tokenizer="
                            f"{cfg.data.tokenizer} (different file contents); preprocess it again with that tokenizer "
                            "or point data.tokenizer at the one it was made with")
        if vocab_size is None:
            vocab_size, eod = int(meta["vocab_size"]), int(meta["eod"])
    return DataPaths(kind="indexed", prefixes=prefixes, weights=list(cfg.data.weights) if cfg.data.weights else None,
                     tokenizer_path=tokenizer_path, vocab_size=vocab_size or cfg.model.vocab_size, eod=eod,
                     index_cache_dir=str(root / "index-cache" / _fingerprint(identities)))


def _strip_extension(path: str) -> str:
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _dataset_identity(prefix: str) -> str:
    """A hash of the .idx (the document lengths megatron's indices are computed from) and the .bin size."""
    h = hashlib.sha256(os.path.abspath(prefix).encode())
    with open(prefix + ".idx", "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    h.update(str(os.path.getsize(prefix + ".bin")).encode())
    return h.hexdigest()


def _fingerprint(identities: list[str]) -> str:
    """Index caches are keyed by the datasets' identities as well as by megatron's own hash (which covers
    paths, seed, sizes and split but not the files), so rewriting a dataset in place never reuses stale
    indices. Unlike modification times, the identity agrees between nodes holding copies of the data."""
    return hashlib.sha256("".join(identities).encode()).hexdigest()[:16]


def _verify_once(prefix: str, identity: str, vocab_size: int, root: Path) -> None:
    """Full verification, but the token-id scan (which reads the whole .bin) only once per dataset
    version and vocabulary size: a stamp under <cache_dir>/verified/ remembers a clean scan."""
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    stamp = root / "verified" / hashlib.sha256(f"{identity}:{mtime}:{vocab_size}".encode()).hexdigest()[:24]
    if stamp.is_file():
        return
    verify_indexed_dataset(prefix, vocab_size)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"prefix": os.path.abspath(prefix), "vocab_size": vocab_size}) + "\n")


def _check_vocab_fits(tokenizer_vocab: int, model_vocab: int, what: str) -> None:
    if tokenizer_vocab > model_vocab:
        raise DataError(f"tokenizer {what} has {tokenizer_vocab} entries but model.vocab_size = {model_vocab}: token "
                        f"ids would index past the embedding table. Set model.vocab_size >= {tokenizer_vocab} or use "
                        "a tokenizer trained with at most that many entries")


# ------------------------------------------------------------------------------- megatron datasets

class MegatronTokenizerView:
    """The part of a tokenizer megatron's GPT datasets read: vocab_size, eod, and `unique_identifiers`
    (hashed into the index cache names). No pad token: megatron then pads only past the data's end
    and masks that padding out of the loss."""

    def __init__(self, vocab_size: int, eod: int | None):
        self.vocab_size = vocab_size
        self.eod = eod if eod is not None else -1
        self.unique_identifiers = {"class": "effdist", "vocab_size": vocab_size, "eod": self.eod}

    def __repr__(self) -> str:
        return f"MegatronTokenizerView(vocab_size={self.vocab_size}, eod={self.eod})"


def gpt_dataset_config(cfg, data_paths: DataPaths):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    mock = data_paths.kind == "mock"
    return GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.data.seq_length,
        blend=None if mock else (list(data_paths.prefixes), list(data_paths.weights) if data_paths.weights else None),
        split=None if mock else cfg.data.split,
        path_to_cache=None if mock else data_paths.index_cache_dir,
        tokenizer=MegatronTokenizerView(data_paths.vocab_size, data_paths.eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # Attention is causal in the model; a per-sample [s, s] mask would only cost memory and time.
        create_attention_mask=False,
        mmap_bin_files=True,
    )


def build_train_valid_datasets(cfg, data_paths: DataPaths, num_train_samples: int, num_valid_samples: int,
                               is_built_on_rank: Callable[[], bool] | None = None):
    """Megatron train and validation datasets holding at least the requested numbers of samples.

    Several data.paths are blended by data.weights (or by size when no weights are given). When
    torch.distributed is initialised this is collective: every rank calls it at the same point;
    megatron's builder lets global rank 0 write the index caches, barriers, and the others read them.
    Without torch.distributed (tests, tools) it simply builds. The validation dataset is None when
    num_valid_samples is 0.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    if num_train_samples < 1:
        raise DataError(f"num_train_samples = {num_train_samples}: need at least one training sample")
    config = gpt_dataset_config(cfg, data_paths)
    if data_paths.kind != "mock":
        _check_split_has_documents(cfg, data_paths, num_valid_samples)
    cls = MockGPTDataset if data_paths.kind == "mock" else GPTDataset
    sizes = [num_train_samples, num_valid_samples, 0]
    builder = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank or (lambda: True), config)
    if config.path_to_cache and _builds_index_caches():
        # The other ranks read the caches only after megatron's barrier, once this rank rebuilt them.
        remove_torn_caches(config.path_to_cache)
    with _rank_zero_without_process_group(), atomic_numpy_saves():
        train, valid, _ = builder.build()
    if train is not None and len(train) < num_train_samples:
        raise DataError(f"the training dataset has {len(train)} samples, fewer than the {num_train_samples} asked for")
    return train, (valid if num_valid_samples > 0 else None)


def _builds_index_caches() -> bool:
    """megatron writes the index caches on global rank 0 (every process when there is no process group)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@contextlib.contextmanager
def _rank_zero_without_process_group():
    """megatron-core 0.16.1's BlendedDataset asks torch.distributed.get_rank() on an index-cache miss
    without checking that a process group exists (GPTDataset does check). A single process without
    torch.distributed is rank 0, so say so for the duration of the build; with a process group this
    changes nothing."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def _check_split_has_documents(cfg, data_paths: DataPaths, num_valid_samples: int) -> None:
    """Megatron loops forever building an epoch of a split with no tokens; catch that with a clear message."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from effdist.data.verify import read_index

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.data.split))
    for prefix in data_paths.prefixes:
        # Not megatron's IndexedDataset: its arrays die with the object (the mmap is closed in __del__).
        lengths = read_index(prefix)[1]
        n = len(lengths)
        for split_index, name, needed in ((0, "train", True), (1, "validation", True)):
            bounds = matrix[split_index]
            if bounds is None:
                if split_index == 1 and num_valid_samples > 0:
                    raise DataError(f"data.split = {cfg.data.split!r} gives no validation documents but evaluation "
                                    f"is on (train.eval_interval={cfg.train.eval_interval}); give the split a "
                                    "validation share, e.g. 98,2,0, or set train.eval_interval=0")
                continue
            begin, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))
            if needed and lengths[begin:end].sum() == 0:
                raise DataError(f"dataset '{prefix}' has {n} documents; data.split = {cfg.data.split!r} leaves its "
                                f"{name} share with none. Use more documents or a different data.split")


# ------------------------------------------------------------------------------- microbatch loader

class MicrobatchLoader:
    """Yields, for each optimizer step, this data-parallel rank's microbatches in order.

    Each microbatch is a dict of tensors: tokens [mb, s] int64, labels [mb, s] int64, loss_mask [mb, s]
    float32, position_ids [mb, s] int64. Position is counted in samples consumed, so resuming with a
    different global batch size still continues where the previous run stopped.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank = {dp_rank}, dp_size = {dp_size}: need 0 <= dp_rank < dp_size")
        if global_batch % dp_size:
            raise ValueError(f"global_batch = {global_batch} must be divisible by the data-parallel size {dp_size}")
        per_rank = global_batch // dp_size
        if micro_batch < 1 or per_rank % micro_batch:
            raise ValueError(f"micro_batch = {micro_batch} must divide global_batch / dp = {per_rank}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.steps_taken = 0

    @property
    def microbatches_per_step(self) -> int:
        return self.global_batch // self.dp_size // self.micro_batch

    def sample_indices(self, consumed_samples: int | None = None) -> list[int]:
        """Global sample indices this rank reads for the step that starts at `consumed_samples`."""
        start = self.consumed_samples if consumed_samples is None else consumed_samples
        per_rank = self.global_batch // self.dp_size
        first = start + self.dp_rank * per_rank
        return list(range(first, first + per_rank))

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        end = self.consumed_samples + self.global_batch
        if end > len(self.dataset):
            # Checked on the whole global batch, so every DP rank fails at the same step, not just the last.
            raise DataError(f"the training dataset holds {len(self.dataset)} samples but the step after "
                            f"{self.consumed_samples} consumed samples needs samples up to {end}; build the datasets "
                            "with num_train_samples >= train.steps * train.global_batch")
        indices = self.sample_indices()
        microbatches = [self._collate(indices[i:i + self.micro_batch])
                        for i in range(0, len(indices), self.micro_batch)]
        self.consumed_samples += self.global_batch
        self.steps_taken += 1
        return microbatches

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        samples = [self.dataset[i] for i in indices]
        batch = {key: torch.stack([s[key] for s in samples]) for key in MICROBATCH_KEYS}
        batch["tokens"] = batch["tokens"].long()
        batch["labels"] = batch["labels"].long()
        batch["position_ids"] = batch["position_ids"].long()
        batch["loss_mask"] = batch["loss_mask"].float()
        return batch

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "global_batch": self.global_batch,
                "steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "consumed_samples" not in state:
            raise DataError(f"data loader state {state!r} has no 'consumed_samples'; the checkpoint was not written "
                            "by this version of effdist")
        self.consumed_samples = int(state["consumed_samples"])
        self.steps_taken = int(state.get("steps_taken", 0))
