"""Data pipeline: sample corpus, tokenizer, preprocessing to .bin/.idx, megatron datasets and blending,
the microbatch loader (DP slicing, resume), and the bad-data checks that run before training."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from effdist.config import load_config
from effdist.data import preprocess as preprocess_module
from effdist.data import tokenizer as tokenizer_module
from effdist.data.loader import (
    MicrobatchLoader,
    build_train_valid_datasets,
    prepare_data,
    resolve_data_paths,
)
from effdist.data.preprocess import preprocess, read_meta, token_dtype
from effdist.data.sample_corpus import generate_documents, write_sample_corpus
from effdist.data.tokenizer import EOD_TOKEN, load_tokenizer, train_tokenizer
from effdist.data.verify import DataError, verify_indexed_dataset

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 400
SEQ = 32


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _read_documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    try:
        return [np.array(ds[i]).tolist() for i in range(len(ds))]
    finally:
        del ds


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two small corpora (different seeds), one tokenizer trained on the first, both preprocessed."""
    d = tmp_path_factory.mktemp("data")
    hf = str(d / "hf")
    corpus_a = write_sample_corpus(d / "a.jsonl", 300, seed=1)
    corpus_b = write_sample_corpus(d / "b.jsonl", 200, seed=2)
    tok_path = train_tokenizer([str(corpus_a)], VOCAB, d / "tok" / "tokenizer.json", cache_dir=hf, progress=False)
    prefix_a = preprocess([str(corpus_a)], tok_path, d / "a", cache_dir=hf, progress=False)
    prefix_b = preprocess([str(corpus_b)], tok_path, d / "b", cache_dir=hf, progress=False)
    return {"dir": d, "hf": hf, "corpus_a": corpus_a, "corpus_b": corpus_b, "tokenizer": tok_path,
            "a": prefix_a, "b": prefix_b}


def _indexed_cfg(built, tmp_path, paths, weights=None, seed=1234, vocab=512, split="90,10,0"):
    cfg = load_config(None, [f"model.vocab_size={vocab}", f"data.seq_length={SEQ}", f"train.seed={seed}"])
    cfg.data.kind = "indexed"
    cfg.data.paths = list(paths)
    cfg.data.weights = weights
    cfg.data.split = split
    cfg.data.tokenizer = str(built["tokenizer"])
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


# ------------------------------------------------------------------------------------- sample corpus

def test_sample_corpus_is_deterministic_and_structured(tmp_path):
    a = write_sample_corpus(tmp_path / "a.jsonl", 50, seed=7).read_bytes()
    b = write_sample_corpus(tmp_path / "b.jsonl", 50, seed=7).read_bytes()
    c = write_sample_corpus(tmp_path / "c.jsonl", 50, seed=8).read_bytes()
    assert a == b and a != c
    docs = list(generate_documents(50, seed=7))
    assert len(docs) == 50 and len({d.split("\n")[0] for d in docs}) > 40  # titles vary
    # Predictable structure a tiny model can learn: the day after a day is always the next day.
    joined = " ".join(docs)
    assert "After Monday comes Tuesday." in joined or "After Sunday comes Monday." in joined
    assert "After Monday comes Friday." not in joined
    with pytest.raises(ValueError, match="at least one document"):
        list(generate_documents(0))


# ------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_round_trip(built):
    tok = load_tokenizer(built["tokenizer"])
    assert tok.vocab_size <= VOCAB
    assert tok.eod == tok.backend.token_to_id(EOD_TOKEN)
    for text in ["Anna saw a small cat near the garden.", "  spaces\tand\nnewlines  ",
                 "Unicode: naïve café, 日本語, emoji 🙂", ""]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Frequent corpus words became single tokens, so the corpus compresses well below one token per byte.
    sample = _docs(built["corpus_a"])[0]
    assert len(tok.encode(sample)) < 0.5 * len(sample.encode())


def test_tokenizer_rejects_too_small_vocab_and_missing_files(tmp_path, built):
    with pytest.raises(DataError, match="at least 257 entries"):
        train_tokenizer([str(built["corpus_a"])], 200, tmp_path / "t.json")
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer([str(tmp_path / "missing.jsonl")], 300, tmp_path / "t.json")


def test_tokenizer_cli_train_and_show(tmp_path, built, capsys):
    out = tmp_path / "cli" / "tokenizer.json"
    rc = tokenizer_module.main(["train", "--input", str(built["corpus_b"]), "--vocab-size", "300", "--output",
                                str(out), "--cache-dir", built["hf"]])
    assert rc == 0 and out.is_file()
    assert load_tokenizer(out).vocab_size <= 300
    assert tokenizer_module.main(["show", str(out.parent), "--text", "Ben has two cats."]) == 0
    printed = capsys.readouterr().out
    assert "decoded: 'Ben has two cats.'" in printed
    assert tokenizer_module.main(["show", str(tmp_path / "missing.json")]) == 1
    # --output a directory: the tokenizer.json goes in it (as `show` reads it). The one already there (datasets
    # may have been made with it) is refused in one line naming --overwrite, before any training: an input that
    # does not exist is not even read; with --overwrite it is replaced and nothing stray is left beside it.
    before = out.read_bytes()
    again = ["train", "--input", str(built["corpus_a"]), "--vocab-size", "300", "--output", str(tmp_path / "cli"),
             "--cache-dir", built["hf"]]
    capsys.readouterr()
    assert tokenizer_module.main(again[:2] + [str(tmp_path / "missing.jsonl")] + again[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--output {out} exists" in err and "--overwrite" in err, err
    assert out.read_bytes() == before
    assert tokenizer_module.main(again + ["--overwrite"]) == 0
    assert out.read_bytes() != before  # trained on the other corpus
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["tokenizer.json"]



# ------------------------------------------------------------------------------------------ preprocess

def test_preprocess_round_trip(built):
    tok = load_tokenizer(built["tokenizer"])
    docs = _docs(built["corpus_a"])
    stored = _read_documents(built["a"])
    assert len(stored) == len(docs)
    for text, ids in zip(docs, stored):
        assert ids == tok.encode(text) + [tok.eod]
    meta = read_meta(built["a"])
    assert meta["dtype"] == "uint16" and meta["documents"] == len(docs)
    assert meta["tokens"] == sum(len(s) for s in stored)
    assert meta["tokenizer_sha256"] == tok.sha256()


def test_preprocess_cli_workers_txt_and_blank_records(tmp_path, built):
    tok = load_tokenizer(built["tokenizer"])
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"body": t}) for t in ["First document.", "   ", "Second one."]) + "\n")
    story = tmp_path / "story.txt"
    story.write_text("A plain text file\nis one document.\n")
    args = ["--input", str(src), str(story), "--tokenizer", str(built["tokenizer"]), "--text-key", "body",
            "--cache-dir", built["hf"], "--quiet"]
    assert preprocess_module.main(args + ["--output-prefix", str(tmp_path / "w1")]) == 0
    assert preprocess_module.main(args + ["--output-prefix", str(tmp_path / "w2"), "--workers", "2"]) == 0
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    stored = _read_documents(str(tmp_path / "w1"))
    expected = [tok.encode(t) + [tok.eod] for t in ["First document.", "Second one.", story.read_text()]]
    assert stored == expected
    assert read_meta(tmp_path / "w1")["skipped_blank"] == 1
    # Wrong text field: a named error, exit status 1.
    assert preprocess_module.main(["--input", str(src), "--tokenizer", str(built["tokenizer"]), "--output-prefix",
                                   str(tmp_path / "bad"), "--cache-dir", built["hf"], "--quiet"]) == 1


def test_preprocess_replaces_a_dataset_only_when_asked(tmp_path, built, capsys):
    """A dataset at --output-prefix (perhaps one a run trains on) is refused in one line that names it and
    --overwrite, before any tokenizing (a missing input is not even read), and is left as it was."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "Only this document."}) + "\n")
    prefix = tmp_path / "data"
    args = ["--tokenizer", str(built["tokenizer"]), "--output-prefix", str(prefix), "--cache-dir", built["hf"],
            "--quiet"]
    assert preprocess_module.main(["--input", str(built["corpus_a"])] + args) == 0
    made = {ext: (tmp_path / f"data{ext}").read_bytes() for ext in (".bin", ".idx", ".meta.json")}
    documents = read_meta(prefix)["documents"]
    capsys.readouterr()
    assert preprocess_module.main(["--input", str(tmp_path / "missing.jsonl")] + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--output-prefix {prefix} already holds a dataset" in err, err
    assert f"{documents:,} documents" in err and "--overwrite" in err
    assert {ext: (tmp_path / f"data{ext}").read_bytes() for ext in made} == made
    # Half a dataset (only the .idx left) is still someone's file: refused the same way.
    (tmp_path / "data.bin").rename(tmp_path / "kept.bin")
    assert preprocess_module.main(["--input", str(src)] + args) == 2
    (tmp_path / "kept.bin").rename(tmp_path / "data.bin")
    assert preprocess_module.main(["--input", str(src)] + args + ["--overwrite"]) == 0
    assert read_meta(prefix)["documents"] == 1 and _read_documents(str(prefix)) == [
        load_tokenizer(built["tokenizer"]).encode("Only this document.") + [load_tokenizer(built["tokenizer"]).eod]]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("data")) == [
        "data.bin", "data.idx", "data.meta.json"]


def test_inputs_are_files_patterns_or_hub_names(tmp_path, monkeypatch):
    from effdist.data.sources import expand_inputs

    for name in ("a.jsonl", "b.jsonl", "c.parquet", "notes.txt.gz"):
        (tmp_path / name).write_text("{}\n")
    groups = expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "c.parquet"), "owner/name",
                            str(tmp_path / "notes.txt.gz")])
    assert groups == [("json", [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]),
                      ("parquet", [str(tmp_path / "c.parquet")]), ("hub", ["owner/name"]),
                      ("text", [str(tmp_path / "notes.txt.gz")])]
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.csv")])
    (tmp_path / "table.csv").write_text("")
    with pytest.raises(DataError, match="unsupported format"):
        expand_inputs([str(tmp_path / "table.csv")])
    # An empty file named on its own is said to be empty (datasets failed with a bare StopIteration); one of a
    # pattern adds nothing. "dir/name" with dir a local directory is a mistyped path, not a hub dataset.
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl' is empty"):
        expand_inputs([str(tmp_path / "empty.jsonl")])
    assert expand_inputs([str(tmp_path / "*.jsonl")]) == [("json", [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])]
    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["owner/wiki-part"]) == [("hub", ["owner/wiki-part"])]
    with pytest.raises(DataError, match="input file 'corpus/wiki-part' does not exist"):
        expand_inputs(["corpus/wiki-part"])


def test_token_dtype_threshold():
    assert token_dtype(512) is np.uint16 and token_dtype(65499) is np.uint16
    assert token_dtype(65500) is np.int32 and token_dtype(128256) is np.int32


def test_preprocess_all_blank_input_is_an_error(tmp_path, built):
    src = tmp_path / "blank.jsonl"
    src.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DataError, match="no documents"):
        preprocess([str(src)], built["tokenizer"], tmp_path / "out", cache_dir=built["hf"], progress=False)
    assert not (tmp_path / "out.bin").exists()


# -------------------------------------------------------------------------------- megatron datasets

def _all_tokens(dataset, n):
    return torch.stack([dataset[i]["tokens"] for i in range(n)])


def test_gpt_dataset_samples_are_windows_of_the_token_stream(built, tmp_path):
    cfg = _indexed_cfg(built, tmp_path, [built["a"]])
    paths = prepare_data(cfg, tmp_path / "run")
    train, valid = build_train_valid_datasets(cfg, paths, 50, 5)
    sample = train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no [s, s] attention mask
    assert sample["tokens"].shape == (SEQ,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert valid is not None and len(valid) >= 5
    flat = np.concatenate(_read_documents(built["a"]))
    window = sample["tokens"].numpy()
    # Each sample is a contiguous run of document tokens (documents shuffled, then concatenated).
    assert len(window) == SEQ and set(window.tolist()) <= set(flat.tolist())


def test_blended_datasets_follow_weights_and_seed(built, tmp_path):
    n = 400
    cfg = _indexed_cfg(built, tmp_path / "one", [built["a"], built["b"]], weights=[0.25, 0.75])
    train, _ = build_train_valid_datasets(cfg, prepare_data(cfg, tmp_path / "run"), n, 0)
    source = np.array([int(train[i]["dataset_id"]) for i in range(n)])
    assert abs((source == 1).mean() - 0.75) < 0.02
    first = _all_tokens(train, n)

    again = _indexed_cfg(built, tmp_path / "two", [built["a"], built["b"]], weights=[0.25, 0.75])
    train2, _ = build_train_valid_datasets(again, prepare_data(again, tmp_path / "run2"), n, 0)
    assert torch.equal(first, _all_tokens(train2, n))  # same seed, fresh caches: same samples

    other = _indexed_cfg(built, tmp_path / "three", [built["a"], built["b"]], weights=[0.25, 0.75], seed=99)
    train3, _ = build_train_valid_datasets(other, prepare_data(other, tmp_path / "run3"), n, 0)
    assert not torch.equal(first, _all_tokens(train3, n))


def test_mock_data(tmp_path):
    cfg = load_config(None, ["data.kind=mock", "model.vocab_size=256", f"data.seq_length={SEQ}"])
    paths = prepare_data(cfg, tmp_path)
    train, valid = build_train_valid_datasets(cfg, paths, 64, 0)
    assert valid is None and len(train) >= 64
    assert int(train[0]["tokens"].max()) < 256


def test_split_without_documents_is_named(built, tmp_path):
    tiny = str(tmp_path / "tiny")
    src = tmp_path / "tiny.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(built["corpus_a"])[:5]))
    preprocess([str(src)], built["tokenizer"], tiny, cache_dir=built["hf"], progress=False)
    cfg = _indexed_cfg(built, tmp_path, [tiny], split="98,2,0")
    with pytest.raises(DataError, match="validation share with none"):
        build_train_valid_datasets(cfg, prepare_data(cfg, tmp_path / "run"), 10, 0)


# ------------------------------------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def train_dataset(built, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    cfg = _indexed_cfg(built, tmp, [built["a"]])
    train, _ = build_train_valid_datasets(cfg, prepare_data(cfg, tmp / "run"), 64, 0)
    return train


def _step_tokens(loader) -> torch.Tensor:
    return torch.cat([mb["tokens"] for mb in loader.next_step()])


def test_loader_microbatches_shapes_and_order(train_dataset):
    loader = MicrobatchLoader(train_dataset, global_batch=8, micro_batch=2)
    assert loader.microbatches_per_step == 4
    step = loader.next_step()
    assert len(step) == 4
    mb = step[0]
    assert set(mb) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert mb["tokens"].shape == (2, SEQ) and mb["tokens"].dtype == torch.int64
    assert mb["labels"].dtype == torch.int64 and mb["position_ids"].dtype == torch.int64
    assert mb["loss_mask"].dtype == torch.float32
    expected = torch.stack([train_dataset[i]["tokens"] for i in range(8)])
    assert torch.equal(torch.cat([m["tokens"] for m in step]), expected)
    assert loader.sample_indices() == list(range(8, 16))


@pytest.mark.parametrize("dp,micro", [(2, 2), (4, 1), (2, 4)])
def test_dp_slices_concatenate_to_the_single_process_batch(train_dataset, dp, micro):
    single = MicrobatchLoader(train_dataset, global_batch=8, micro_batch=2)
    ranks = [MicrobatchLoader(train_dataset, global_batch=8, micro_batch=micro, dp_rank=r, dp_size=dp)
             for r in range(dp)]
    for _ in range(3):
        assert torch.equal(torch.cat([_step_tokens(r) for r in ranks]), _step_tokens(single))


def test_loader_resume_continues_identically(train_dataset):
    reference = MicrobatchLoader(train_dataset, global_batch=8, micro_batch=4)
    expected = [_step_tokens(reference) for _ in range(5)]
    first = MicrobatchLoader(train_dataset, global_batch=8, micro_batch=4)
    seen = [_step_tokens(first) for _ in range(2)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = MicrobatchLoader(train_dataset, global_batch=8, micro_batch=2, dp_rank=0, dp_size=2)
    other = MicrobatchLoader(train_dataset, global_batch=8, micro_batch=2, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    other.load_state_dict(state)
    seen += [torch.cat([_step_tokens(resumed), _step_tokens(other)]) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_loader_rejects_bad_sizes_and_running_out(train_dataset):
    with pytest.raises(ValueError, match="divisible by the data-parallel size"):
        MicrobatchLoader(train_dataset, global_batch=6, micro_batch=1, dp_size=4)
    with pytest.raises(ValueError, match="must divide"):
        MicrobatchLoader(train_dataset, global_batch=8, micro_batch=3)
    loader = MicrobatchLoader(train_dataset, global_batch=8, micro_batch=8,
                              consumed_samples=len(train_dataset) - 4)
    with pytest.raises(DataError, match="num_train_samples"):
        loader.next_step()


# ------------------------------------------------------------------------------------- prepare_data

def test_prepare_sample_builds_once_and_fits_the_model(tmp_path):
    cfg = load_config(None, ["data.kind=sample", "data.sample_documents=150", "model.vocab_size=320",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError, match="build=True on rank 0"):
        resolve_data_paths(cfg, tmp_path)
    paths = prepare_data(cfg, tmp_path)
    assert paths.kind == "sample" and paths.vocab_size <= 320
    assert load_tokenizer(paths.tokenizer_path).eod == paths.eod
    bin_file = Path(paths.prefixes[0] + ".bin")
    stamp = bin_file.stat().st_mtime_ns
    assert prepare_data(cfg, tmp_path) == paths and bin_file.stat().st_mtime_ns == stamp  # reused
    assert resolve_data_paths(cfg, tmp_path) == paths
    summary = verify_indexed_dataset(paths.prefixes[0], 320)
    assert summary.num_documents == 150 and summary.max_token_id < 320
    # A different model vocabulary gets its own tokenizer and dataset.
    cfg.model.vocab_size = 384
    assert prepare_data(cfg, tmp_path).prefixes != paths.prefixes


def test_runs_sharing_a_cache_build_the_sample_dataset_once(tmp_path):
    """Two runs that share data.cache_dir start together: the second waits for the first's build and reuses it.
    (Without the lock it built too and replaced the directory that the first run's ranks were reading.)"""
    import fcntl

    from effdist.data import loader
    from tests.launching import ROOT, clean_env

    overrides = ["data.sample_documents=100", "model.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(None, overrides)
    directory = loader.sample_data_dir(cfg, tmp_path)
    directory.parent.mkdir(parents=True)
    code = ("from effdist.config import load_config; from effdist.data.loader import prepare_data; "
            f"prepare_data(load_config(None, {overrides!r}), {str(tmp_path)!r})")
    with open(directory.with_name(f"{directory.name}.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first run is building
        second = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), text=True,
                                  stderr=subprocess.PIPE)
        try:
            first_line = second.stderr.readline()
            assert first_line == f"[effdist] waiting for another process that builds {directory}\n", first_line
            loader._build_sample(cfg, directory)  # the first run's build, finished while the second waits
            built = (directory / f"{loader.SAMPLE_PREFIX_NAME}.bin").stat()
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
            rest = second.communicate(timeout=120)[1]
    assert second.returncode == 0 and rest == "", rest
    now = (directory / f"{loader.SAMPLE_PREFIX_NAME}.bin").stat()
    assert (now.st_ino, now.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)  # reused, not rebuilt


def test_a_killed_builds_staging_directory_is_removed_by_the_next_build(tmp_path):
    cfg = load_config(None, ["data.sample_documents=100", "model.vocab_size=300", f"data.cache_dir={tmp_path}"])
    from effdist.data.loader import sample_data_dir

    directory = sample_data_dir(cfg, tmp_path)
    left = directory.with_name(f"{directory.name}.building-999999")  # a build SIGKILLed mid-way
    (left / "hf-cache").mkdir(parents=True)
    prepare_data(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [directory.name, f"{directory.name}.lock"]


def test_sample_needs_a_byte_level_vocabulary(tmp_path):
    cfg = load_config(None, ["model.vocab_size=200", f"data.cache_dir={tmp_path}"])
    with pytest.raises(DataError, match="model.vocab_size = 200"):
        prepare_data(cfg, tmp_path)


def test_prepare_sample_rebuilds_a_tampered_dataset(tmp_path):
    cfg = load_config(None, ["data.sample_documents=100", "model.vocab_size=300", f"data.cache_dir={tmp_path}"])
    paths = prepare_data(cfg, tmp_path)
    Path(paths.tokenizer_path).write_text(Path(paths.tokenizer_path).read_text() + " ")
    rebuilt = prepare_data(cfg, tmp_path)
    assert read_meta(rebuilt.prefixes[0])["tokenizer_sha256"] == load_tokenizer(rebuilt.tokenizer_path).sha256()


def test_tokenizer_larger_than_model_vocab_is_named(built, tmp_path):
    cfg = _indexed_cfg(built, tmp_path, [built["a"]], vocab=300)
    with pytest.raises(DataError, match="model.vocab_size = 300"):
        prepare_data(cfg, tmp_path / "run")


def test_indexed_paths_accept_extensions_and_check_tokenizer(built, tmp_path):
    cfg = _indexed_cfg(built, tmp_path, [built["a"] + ".bin"])
    assert prepare_data(cfg, tmp_path / "run").prefixes == [built["a"]]
    other = tmp_path / "other.json"
    train_tokenizer([str(built["corpus_b"])], 300, other, cache_dir=built["hf"], progress=False)
    cfg.data.tokenizer = str(other)
    with pytest.raises(DataError, match="was tokenized with"):
        prepare_data(cfg, tmp_path / "run")


def test_indexed_token_scan_runs_once_per_dataset_version(built, tmp_path, monkeypatch):
    from effdist.data import verify

    scans = []
    real_scan = verify._scan_token_ids
    monkeypatch.setattr(verify, "_scan_token_ids", lambda *a: scans.append(a[0]) or real_scan(*a))
    prefix = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(built["a"] + ext, prefix + ext)
    cfg = _indexed_cfg(built, tmp_path, [prefix])
    first = prepare_data(cfg, tmp_path / "run")
    assert prepare_data(cfg, tmp_path / "run") == first and len(scans) == 1
    Path(prefix + ".bin").touch()  # a rewritten .bin is scanned again
    prepare_data(cfg, tmp_path / "run")
    assert len(scans) == 2


# ---------------------------------------------------------------------------------------- bad data

@pytest.fixture
def copy_of_a(built, tmp_path):
    prefix = str(tmp_path / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(built["a"] + ext, prefix + ext)
    return prefix


def test_verify_accepts_good_data(copy_of_a):
    s = verify_indexed_dataset(copy_of_a, VOCAB)
    assert s.num_documents == 300 and s.dtype == "uint16" and s.max_token_id < VOCAB


def test_truncated_bin(copy_of_a):
    data = Path(copy_of_a + ".bin").read_bytes()
    Path(copy_of_a + ".bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"copy\.bin is truncated.*effdist preprocess"):
        verify_indexed_dataset(copy_of_a, VOCAB)


def test_bin_and_idx_from_different_datasets(copy_of_a, built):
    shutil.copy(built["b"] + ".bin", copy_of_a + ".bin")
    with pytest.raises(DataError, match=r"(truncated|do not belong together)"):
        verify_indexed_dataset(copy_of_a, VOCAB)
    Path(copy_of_a + ".bin").write_bytes(Path(built["a"] + ".bin").read_bytes() + b"\0\0")
    with pytest.raises(DataError, match="do not belong together"):
        verify_indexed_dataset(copy_of_a, VOCAB)


def test_corrupt_idx(copy_of_a):
    idx = Path(copy_of_a + ".idx")
    good = idx.read_bytes()
    idx.write_bytes(b"GARBAGE!!" + good[9:])
    with pytest.raises(DataError, match=r"copy\.idx is not a megatron index"):
        verify_indexed_dataset(copy_of_a, VOCAB)
    idx.write_bytes(good[:-100])
    with pytest.raises(DataError, match=r"copy\.idx is truncated"):
        verify_indexed_dataset(copy_of_a, VOCAB)
    idx.write_bytes(good[:20])
    with pytest.raises(DataError, match="shorter than the 34-byte header"):
        verify_indexed_dataset(copy_of_a, VOCAB)
    # One sequence length changed: the byte offsets of the following sequences no longer add up.
    raw = bytearray(good)
    lengths = np.frombuffer(raw, dtype=np.int32, count=1, offset=34)
    raw[34:38] = np.int32(lengths[0] + 3).tobytes()
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"sequence 1 starts at byte .* index is corrupt"):
        verify_indexed_dataset(copy_of_a, VOCAB)


def test_missing_file(copy_of_a):
    Path(copy_of_a + ".idx").unlink()
    with pytest.raises(DataError, match=r"copy\.idx does not exist.*data\.paths"):
        verify_indexed_dataset(copy_of_a, VOCAB)


def _write_dataset(prefix: str, documents: list[list[int]], dtype=np.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(np.array(doc, dtype=dtype), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_token_id_beyond_vocab(tmp_path):
    prefix = _write_dataset(str(tmp_path / "ids"), [[1, 2, 3], [4, 999, 5]])
    with pytest.raises(DataError, match=r"token id 999 in document 1 \(token 1 of it\).*model.vocab_size"):
        verify_indexed_dataset(prefix, vocab_size=512)
    assert verify_indexed_dataset(prefix, vocab_size=1000).max_token_id == 999
    # prepare_data runs the same check for indexed data against model.vocab_size.
    cfg = load_config(None, ["model.vocab_size=512", "data.kind=indexed", f"data.paths=[{prefix}]",
                             f"data.cache_dir={tmp_path}"])
    with pytest.raises(DataError, match="token id 999"):
        prepare_data(cfg, tmp_path)


def test_empty_datasets(tmp_path):
    no_docs = _write_dataset(str(tmp_path / "none"), [])
    with pytest.raises(DataError, match=r"empty \(0 documents\)"):
        verify_indexed_dataset(no_docs, 512)
    no_tokens = _write_dataset(str(tmp_path / "zero"), [[], []])
    with pytest.raises(DataError, match="2 documents but 0 tokens"):
        verify_indexed_dataset(no_tokens, 512)


def test_verify_module_cli(copy_of_a, tmp_path, capsys):
    from effdist.data import verify

    assert verify.main([copy_of_a, "--vocab-size", str(VOCAB)]) == 0
    assert verify.main([str(tmp_path / "absent")]) == 1
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ english corpus tool

def _english_tool():
    spec = importlib.util.spec_from_file_location("build_english_corpus", ROOT / "tools" / "build_english_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_english_corpus_extractors():
    tool = _english_tool()
    rst = "Title\n=====\n\n.. note::\n\n   Use :func:`len` and ``x + 1``; see `the docs <https://x>`_.\n"
    assert tool.rst_to_text(rst) == "Title\n\n   Use len and x + 1; see the docs."
    pod = "=head1 NAME\n\nperlfoo - B<bold> C<< $x->y >> and L<perlfunc/open> E<lt>ok E<gt>\n\n=cut\n"
    assert tool.pod_to_text(pod) == "NAME\n\nperlfoo - bold $x->y and open <ok >"
    page = ("<html><head><title>t</title><script>var x;</script></head><body><nav>Home | Next</nav>"
            "<div role='main'><h1>Heading</h1><p>Some <b>bold</b>\ntext.</p><pre>code  kept\n  indented</pre>"
            "<div class='sphinxsidebar'>sidebar</div></div><footer>(c)</footer></body></html>")
    assert tool.html_to_text(page) == "Heading\n\nSome bold text.\n\ncode  kept\n  indented"
    assert tool.markdown_to_text("<!-- meta -->\n# Head\n\nSee [this](http://x).\n") == "Head\n\nSee this."
    assert tool._unversioned("python3.11-doc") == tool._unversioned("python3-doc")
    assert tool._unversioned("linux-doc-6.1") == "linux-doc" != tool._unversioned("perl")


# The large preset: package discovery, filters, dedup and the split by source package, on tiny synthetic .debs.

_PROSE = ("This chapter explains how the server reads its configuration file and what each of the settings "
          "does. When a value is missing, the default is used, and it is written to the log so that you can "
          "see which one was chosen. {extra} You should keep a copy of the file before you change it, because "
          "the server will not start if one of the values is not valid. ")


def _prose(topic: str, repeat: int = 4) -> str:
    return "\n\n".join(_PROSE.format(extra=f"The {topic} section number {i} is described here.")
                       for i in range(repeat))


def test_english_corpus_discovery_and_selection():
    tool = _english_tool()
    dump = "\n\n".join([
        "Package: foo-doc\nSource: foo (1.0-1)\nSize: 1000\nDescription: manual for foo",
        "Package: foo-doc\nSource: foo\nSize: 9\nDescription: older stanza of the same package",
        "Package: bar-doc\nSize: 2000\nDescription: bar user guide",
        "Package: libbaz-dev-doc\nSource: baz\nSize: 500\nDescription: baz API documentation",
        "Package: libghc-qux-doc\nSource: haskell-qux\nSize: 500\nDescription: qux; documentation",
        "Package: huge-doc\nSize: 50000000\nDescription: huge manual",
        "Package: foo\nSize: 100\nDescription: not documentation",
    ])
    found = {p.package: p for p in tool.parse_dumpavail(dump)}
    assert sorted(found) == ["bar-doc", "foo-doc", "huge-doc", "libbaz-dev-doc", "libghc-qux-doc"]
    assert found["foo-doc"].source == "foo" and found["foo-doc"].size == 1000
    assert found["bar-doc"].source == "bar-doc"  # no Source field: the binary is its own source
    chosen, skipped = tool.select_packages(list(found.values()), max_deb_mb=30, budget_mb=1)
    assert [c.package for c in chosen] == ["bar-doc", "foo-doc"]
    assert skipped == {"api_reference_description": 1, "generated_family": 1, "deb_too_large": 1, "over_budget": 0}
    chosen, skipped = tool.select_packages(list(found.values()), max_deb_mb=30, budget_mb=0.0025)
    assert len(chosen) == 1 and skipped["over_budget"] == 1


def test_english_corpus_path_and_language_filters():
    tool = _english_tool()
    keep = ["usr/share/doc/foo/guide.html", "./usr/share/doc/foo/html/intro.rst.gz", "usr/share/info/foo.info-2.gz",
            "usr/share/doc/foo/README", "usr/share/doc/foo/manual/en/setup.txt"]
    assert [tool.path_verdict(p) for p in keep] == [None] * len(keep)
    drop = {"usr/share/doc/foo/de/guide.html": "translation", "usr/share/doc/foo/guide.fr.html": "translation",
            "usr/share/doc/foo/translations/x.txt": "translation", "usr/share/doc/foo/pt_BR/x.html": "translation",
            "usr/share/doc/foo/changelog.Debian.gz": "not_text_format", "usr/share/doc/foo/CHANGES.txt": "changelog", "usr/share/doc/foo/NEWS.md": "changelog",
            "usr/share/doc/foo/copyright": "not_text_format", "usr/share/doc/foo/LICENSE.txt": "licence_or_credits",
            "usr/share/doc/foo/html/genindex.html": "generated_index",
            "usr/share/doc/foo/html/_sources/a.rst.txt": "generated_index",
            "usr/share/doc/foo/api/index-files/index-1.html": "generated_index",
            "usr/share/doc/foo/logo.png": "not_text_format", "usr/lib/foo/notes.txt": "outside_doc_dirs"}
    assert {p: tool.path_verdict(p) for p in drop} == drop

    filters = tool.Filters(min_chars=100)
    assert tool.text_verdict(_prose("logging"), filters) is None
    german = ("Dieses Kapitel erklärt, wie der Server seine Konfigurationsdatei liest und was jede Einstellung "
              "bewirkt. Wenn ein Wert fehlt, wird der Standardwert verwendet und im Protokoll vermerkt. ") * 4
    assert tool.text_verdict(german, filters) == "not_english_prose"
    code = "int main(int argc, char **argv) {\n  return foo_bar(argc, argv, FLAG_X | FLAG_Y);\n}\n" * 8
    assert tool.text_verdict(code, filters) == "not_english_prose"
    assert tool.text_verdict("0x1f 0x2e 12.5 33.1 | 44 55 66 | 77 88 99 " * 10, filters) == "not_letters"
    assert tool.text_verdict("Too short.", filters) == "too_short"
    assert tool.info_to_text("\x1f\nFile: foo.info,  Node: Top\n\nFoo does things.\n* Menu:\n") == "Foo does things."


def test_english_corpus_dedup_exact_and_near():
    tool = _english_tool()
    dedup = tool.Deduplicator()
    text = _prose("cache") + " Version 1.2.3 of the manual."
    assert dedup.verdict(text) is None
    assert dedup.verdict("  " + text.upper().replace(" ", "\n  ")) == "exact_duplicate"
    assert dedup.verdict(text.replace("1.2.3", "2.0.1").replace(",", ";")) == "near_duplicate"
    assert dedup.verdict(_prose("network")) is None


def _make_deb(directory: Path, package: str, files: dict[str, str]) -> Path:
    root = directory / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
                                             f"Maintainer: t <t@example.org>\nDescription: test docs\n")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if rel.endswith(".gz") else text.encode())
    deb = directory / f"{package}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(root), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build the test packages")
def test_english_corpus_split_by_source_and_manifest(tmp_path):
    import argparse

    tool = _english_tool()
    shared = _prose("shared appendix")
    # Two binary packages per source; the split must follow the source, so choose sources that land on both sides.
    # Letters only: names that differ in digits alone would make near-duplicate documents.
    names = ["src" + "".join(chr(97 + int(d)) for d in str(i)) for i in range(40)]
    heldout = [n for n in names if tool.is_heldout(n, 50.0)][:2]
    train = [n for n in names if not tool.is_heldout(n, 50.0)][:2]
    assert len(heldout) == 2 and len(train) == 2
    packages, debs = [], {}
    for source in heldout + train:
        for suffix in ("user-doc", "dev-doc"):
            name = f"{source}-{suffix}"
            doc = f"usr/share/doc/{name}"
            debs[name] = _make_deb(tmp_path / "build", name, {
                f"{doc}/guide.html": f"<html><body><p>{_prose(name)}</p></body></html>",
                f"{doc}/intro.rst.gz": "Intro\n=====\n\n" + _prose(name + " intro"),
                f"{doc}/appendix.txt": shared,  # the same file in every package: kept once, in training
                f"{doc}/de/guide.html": "<p>Dieses Kapitel erklärt alles.</p>",
                f"{doc}/CHANGES.txt": "foo (1.0) unstable; urgency=low\n\n  * Initial release.\n",
                f"{doc}/api/class_x.html": "<!-- Generated by javadoc --><p>" + _prose("x") + "</p>",
            })
            packages.append(tool.DocPackage(name, source, debs[name].stat().st_size))
    ordered = sorted(packages, key=lambda c: (tool.is_heldout(c.source, 50.0), c.package))
    args = argparse.Namespace(preset="large", heldout_percent=50.0, max_deb_mb=30, download_budget_mb=10, workers=1)
    out = tmp_path / "corpus" / "corpus.jsonl"
    filters = tool.Filters(min_chars=100)
    assert tool.write_corpus(out, ordered, debs, filters, args, {p.package: p for p in packages}, [],
                             {"over_budget": 0}, len(packages), time.monotonic()) == 0

    train_docs = [json.loads(line) for line in out.read_text().splitlines()]
    heldout_docs = [json.loads(line) for line in (out.parent / "corpus.heldout.jsonl").read_text().splitlines()]
    assert {d["source"] for d in train_docs} == set(train)
    assert {d["source"] for d in heldout_docs} == set(heldout)
    assert {d["package"] for d in heldout_docs} == {f"{s}-{x}" for s in heldout for x in ("user-doc", "dev-doc")}
    # Only the English prose survives: no translation, changelog or generated page; the shared file once.
    assert {Path(d["path"]).name for d in train_docs + heldout_docs} == {"guide.html", "intro.rst.gz",
                                                                          "appendix.txt"}
    assert [d["path"].endswith("appendix.txt") for d in train_docs + heldout_docs].count(True) == 1
    assert all(not d["path"].endswith("appendix.txt") for d in heldout_docs)
    assert "=====" not in next(d["text"] for d in train_docs if d["path"].endswith(".rst.gz"))

    manifest = json.loads((out.parent / "corpus.manifest.json").read_text())
    assert manifest["schema"] == "effdist.english_corpus.v1" and manifest["preset"] == "large"
    assert manifest["files"] == {"train": "corpus.jsonl", "heldout": "corpus.heldout.jsonl"}
    for split, docs in (("train", train_docs), ("heldout", heldout_docs)):
        entry = manifest["splits"][split]
        assert entry["documents"] == len(docs)
        assert entry["characters"] == sum(len(d["text"]) for d in docs)
        assert entry["estimated_tokens"] == int(entry["characters"] / 4.0)
        assert entry["packages"] == sorted({d["package"] for d in docs})
        assert entry["source_packages"] == len({d["source"] for d in docs})
    assert not set(manifest["splits"]["train"]["packages"]) & set(manifest["splits"]["heldout"]["packages"])
    counts = manifest["counts"]
    assert counts["dropped_translation"] == 8 and counts["dropped_changelog"] == 8
    assert counts["dropped_generated_api_page"] == 8 and counts["dropped_exact_duplicate"] == 7
    assert counts["files_kept"] == 8 * 3 and counts["files_seen"] == 8 * 6
    assert manifest["split_rule"]["by"] == "debian_source_package"
    assert {"min_chars", "min_english_share", "min_letters_share", "dedup"} <= set(manifest["filters"])


@pytest.mark.parametrize("err", [28, 30])  # ENOSPC, EROFS
def test_a_full_or_read_only_datasets_cache_is_named_as_such_not_as_an_unreadable_input(tmp_path, monkeypatch, err):
    """The sample corpus on a full disk said 'could not read json input(s) [corpus.jsonl]: ... No space left on
    device': the input was fine, the datasets cache it is parsed into could not be written. Name that, and where."""
    import datasets

    from effdist.data.sources import load_documents

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a b c"}\n')

    def full(*args, **kwargs):
        try:
            raise OSError(err, os.strerror(err))
        except OSError as e:
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from e

    monkeypatch.setattr(datasets, "load_dataset", full)
    with pytest.raises(DataError) as info:
        load_documents([str(corpus)], cache_dir=str(tmp_path / "hf-cache"), progress=False)
    message = str(info.value)
    assert f"cannot write the datasets cache in {tmp_path / 'hf-cache'} ({os.strerror(err)})" in message, message
    assert "data.cache_dir" in message and "could not read" not in message and "\n" not in message
