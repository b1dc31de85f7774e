"""tools/subset_dataset.py: the first whole documents of a tokenized dataset up to a token count, as its own dataset
(a corpus small enough for one device call, docs/data.md)."""

from __future__ import annotations

import json
import sys

import numpy as np

from tests.launching import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import subset_dataset  # noqa: E402


def _dataset(prefix: str, lengths: list[int]) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [np.arange(n, dtype=np.uint16) + 7 * i for i, n in enumerate(lengths)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(prefix + ".idx")
    meta = {"format": "effdist-indexed-v1", "vocab_size": 32000, "documents": len(docs), "tokens": sum(lengths)}
    with open(prefix + ".meta.json", "w") as f:
        f.write(json.dumps(meta))
    return docs


def test_the_first_whole_documents_up_to_the_token_count(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src, out = str(tmp_path / "train"), str(tmp_path / "train36")
    docs = _dataset(src, [5, 9, 4, 12, 3])
    assert subset_dataset.main(["--input", src, "--tokens", "15", "--output-prefix", out]) == 0
    got = IndexedDataset(out)
    assert len(got) == 3 and all(np.array_equal(got[i], docs[i]) for i in range(3))  # 5 + 9 < 15 <= 5 + 9 + 4
    meta = json.loads(open(out + ".meta.json").read())
    assert (meta["documents"], meta["tokens"], meta["subset_of"], meta["vocab_size"]) == (3, 18, src, 32000)
    assert "3 documents, 18 tokens (the first of" in capsys.readouterr().out
    # More tokens than the dataset holds: all of it. An existing output is refused unless --overwrite.
    assert subset_dataset.main(["--input", src, "--tokens", "1000", "--output-prefix", out]) == 2
    assert "--output" in capsys.readouterr().err and len(IndexedDataset(out)) == 3
    assert subset_dataset.main(["--input", src, "--tokens", "1000", "--output-prefix", out, "--overwrite"]) == 0
    assert len(IndexedDataset(out)) == 5


def test_bad_input_is_one_line(tmp_path, capsys):
    src = str(tmp_path / "train")
    _dataset(src, [4, 4])
    for args, line in [(["--input", str(tmp_path / "none"), "--tokens", "5", "--output-prefix", str(tmp_path / "o")],
                        "no " + str(tmp_path / "none") + ".bin/.idx here"),
                       (["--input", src, "--tokens", "0", "--output-prefix", str(tmp_path / "o")], "--tokens 0: must be"),
                       (["--input", src, "--tokens", "5", "--output-prefix", src], "is --input; give another prefix")]:
        assert subset_dataset.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert line in err and "\n" not in err


def test_after_takes_the_documents_no_run_on_the_earlier_subset_has_seen(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src, first, cont = str(tmp_path / "train"), str(tmp_path / "train36"), str(tmp_path / "cont")
    docs = _dataset(src, [5, 9, 4, 12, 3, 6])
    assert subset_dataset.main(["--input", src, "--tokens", "10", "--output-prefix", first]) == 0  # docs 0, 1
    assert subset_dataset.main(["--input", src, "--after", first, "--tokens", "14", "--output-prefix", cont]) == 0
    got = IndexedDataset(cont)
    assert len(got) == 2 and all(np.array_equal(got[i], docs[2 + i]) for i in range(2))  # 4 < 14 <= 4 + 12
    meta = json.loads(open(cont + ".meta.json").read())
    assert (meta["first_document"], meta["documents"], meta["tokens"], meta["subset_of"]) == (2, 2, 16, src)
    assert "2 documents, 16 tokens (from document 2 of" in capsys.readouterr().out
    # After a subset made with --after: on from where that one ended. Nothing left, or a subset of another
    # dataset: one line, nothing written.
    later = str(tmp_path / "later")
    assert subset_dataset.main(["--input", src, "--after", cont, "--tokens", "100", "--output-prefix", later]) == 0
    assert [len(d) for d in IndexedDataset(later)] == [3, 6]
    capsys.readouterr()
    other = str(tmp_path / "other")
    _dataset(other, [4])
    for after, line in [(later, "has no documents after its first 6"),
                        (other, "not a subset (its .meta.json has no `subset_of`)"),
                        (str(tmp_path / "none"), "no " + str(tmp_path / "none") + ".meta.json with `documents`")]:
        out = str(tmp_path / "o")
        assert subset_dataset.main(["--input", src, "--after", after, "--tokens", "5", "--output-prefix", out]) == 2
        err = capsys.readouterr().err.strip()
        assert line in err and "\n" not in err, err
        assert not (tmp_path / "o.bin").exists()
