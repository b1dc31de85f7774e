"""ELAS's fc2 sparse-vs-dense choice from a measured table (effdist.model.ffn.sparse_gemm_table), no GPU needed:
the lookup rules, the errors a broken table gives, the shipped tables, and tools/bench_ffn.py writing one.
The module's use of the table on a GPU: test_elas_auto_sparse_gemm_follows_the_measured_table_and_agrees_with_dense
in tests/test_ffn_gpu.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from effdist.model.ffn import sparse_gemm_table as table

ROOT = Path(__file__).resolve().parents[1]
GPU = "NVIDIA H100 80GB HBM3"


def _table(*entries: table.Entry, device: str = GPU) -> table.Table:
    return table.Table(device, tuple(entries))


def test_the_nearest_measured_token_count_of_the_same_shape_decides():
    tables = [_table(table.Entry(16384, 4224, 1024, "bf16", dense_ms=2.0, sparse_ms=3.0),
                     table.Entry(65536, 4224, 1024, "bf16", dense_ms=8.0, sparse_ms=6.0),
                     table.Entry(65536, 4224, 1024, "fp16", dense_ms=8.0, sparse_ms=9.0))]
    small = table.choose(GPU, 8192, 4224, 1024, "bf16", tables)
    assert not small.sparse and small.entry.tokens == 16384 and "dense GEMM: at 16384 tokens" in small.why
    large = table.choose(GPU, 40000, 4224, 1024, "bf16", tables)  # log-nearer to 65536 than to 16384
    assert large.sparse and large.entry.tokens == 65536 and "6 ms sparse against 8 ms dense" in large.why
    assert not table.choose(GPU, 65536, 4224, 1024, "fp16", tables).sparse  # its own dtype's entry


@pytest.mark.parametrize("device, shape, words", [
    (GPU, (4224, 2048), f"no measured entry for weight [2048, 4224] bf16 on {GPU}"),
    ("NVIDIA H200", (4224, 1024), f"no table for NVIDIA H200 (tables for: {GPU})"),
])
def test_anything_not_measured_runs_dense_and_says_how_to_measure(device, shape, words):
    tables = [_table(table.Entry(16384, 4224, 1024, "bf16", dense_ms=2.0, sparse_ms=1.0))]
    choice = table.choose(device, 16384, *shape, "bf16", tables)
    assert not choice.sparse and choice.entry is None
    assert choice.why.startswith(words) and "python tools/bench_ffn.py --sparse24-table" in choice.why, choice.why


@pytest.mark.parametrize("change, words", [
    ({"format": "something/2"}, "format = 'something/2'"),
    ({"device": ""}, "device = ''"),
    ({"entries": []}, "no entries"),
    ({"entries": [{"tokens": 16, "in_features": 8}]}, "entries[0]"),
    ({"entries": [{"tokens": 16, "in_features": 8, "out_features": 8, "dtype": "bf16", "dense_ms": 0,
                   "sparse_ms": 1}]}, "dense_ms > 0"),
])
def test_a_broken_table_is_named_with_its_file_and_field(tmp_path, change, words):
    good = _table(table.Entry(16384, 4224, 1024, "bf16", 2.0, 3.0)).to_dict()
    path = tmp_path / "sparse24-x.json"
    path.write_text(json.dumps({**good, **change}))
    with pytest.raises(table.TableError) as err:
        table.load_table(path)
    assert str(err.value).startswith(str(path)) and words in str(err.value), str(err.value)


def _bench_ffn():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_ffn
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return bench_ffn


def test_shipped_tables_load_and_the_h100_one_is_its_block_run():
    shipped = {t.device: t for t in table.shipped_tables()}
    h100 = shipped[GPU]
    assert h100.path.name == "sparse24-h100.json"
    # Rebuilt from the JSON of the run it names: the same entries (the file is that run, not typed by hand).
    source = json.loads((ROOT / "docs/results/bench_ffn_h100.json").read_text())
    bench_ffn = _bench_ffn()
    rebuilt = table.table_from_block_rows(source["results"], source["device"], source["dtype"],
                                          {s: bench_ffn.fc2_shape(s) for s in bench_ffn.SHAPES}, {})
    assert rebuilt.entries == h100.entries
    # On an H100 in bf16 compress + cuSPARSELt never paid (docs/sparse_ffn.md): dense at every measured shape.
    assert len(h100.entries) == 4 and not any(e.sparse_pays for e in h100.entries)


def test_bench_ffn_writes_a_table_from_blocks_and_refuses_to_time_without_a_gpu(tmp_path, capsys):
    rows = [{"shape": "llama-350m", "tokens": 16384, "variant": v, "ms": ms}
            for v, ms in [("elas", 2.0), ("elas-cslt", 1.5), ("elas-masked", 2.2), ("elas-masked-cslt", 2.0),
                          ("swiglu", 3.0)]]
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps({"device": "GPU X", "dtype": "bf16", "torch": "t", "results": rows}))
    out = tmp_path / "tables" / "sparse24-x.json"
    bench_ffn = _bench_ffn()  # in this process: the tool's main() is what its command line runs
    assert bench_ffn.main(["--sparse24-from-blocks", str(blocks), "--sparse24-table", str(out)]) == 0
    written = table.load_table(out)
    # The masked pair gains less (2.0 / 2.2 against 1.5 / 2.0): that one is kept, and it still pays.
    assert written.device == "GPU X" and [(e.tokens, e.in_features, e.out_features) for e in written.entries] == [
        (16384, 4224, 1024)]
    assert (written.entries[0].dense_ms, written.entries[0].sparse_ms) == (2.2, 2.0) and written.entries[0].sparse_pays
    assert "--sparse24-from-blocks" in dict(written.meta)["command"]

    if torch.cuda.is_available():
        return
    with pytest.raises(SystemExit) as exit_:
        bench_ffn.main(["--sparse24-table", str(tmp_path / "t.json")])
    assert exit_.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_elas_looks_the_table_up_once_per_shape_and_says_it(monkeypatch, capsys):
    """ElasMLP's `auto` path (effdist.model.ffn.elas.sparse_gemm_pays) off the GPU: the device name and tables are
    stand-ins, the lookup and the line rank 0 prints are the real ones; no work per forward after the first."""
    from effdist.model.ffn import elas

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: GPU)
    monkeypatch.setattr(table, "shipped_tables",
                        lambda: (_table(table.Entry(16384, 64, 32, "bf16", dense_ms=2.0, sparse_ms=1.0)),))
    elas._table_choice.cache_clear()
    y, weight = torch.zeros(16384, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    try:
        assert elas.sparse_gemm_pays(y, weight) and elas.sparse_gemm_pays(y, weight)
        assert not elas.sparse_gemm_pays(y[:, :48], weight[:, :48])  # another shape: not in the table, dense
        assert elas._table_choice.cache_info().misses == 2
    finally:
        elas._table_choice.cache_clear()
    said = [line for line in capsys.readouterr().err.splitlines() if "ELAS fc2 2:4" in line]
    assert said == [
        "[effdist] ELAS fc2 2:4 ((16384, 64) x weight (32, 64)): sparse GEMM: at 16384 tokens the table measured "
        "weight [32, 64] bf16 1 ms sparse against 2 ms dense (gemm)",
        f"[effdist] ELAS fc2 2:4 ((16384, 48) x weight (32, 48)): no measured entry for weight [32, 48] bf16 on {GPU}: "
        f"dense GEMM; {table.MEASURE_HINT}"], said
