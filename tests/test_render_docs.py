"""Doc tables that come from code equal what tools/render_docs.py generates (docs cannot drift from the code)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import clean_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "tools/render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_docs"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_generated_block_is_current(render_docs):
    stale = render_docs.stale_blocks()
    assert not stale, f"run `python tools/render_docs.py` and commit the docs; stale: {stale}"
    registered = {(g.doc, g.name) for g in render_docs.REGISTRY}
    assert {("docs/pipeline.md", "simulate-compare"), ("docs/configs.md", "presets"),
            ("docs/configs.md", "config-ranges")} <= registered


def test_every_benchmark_table_is_generated_from_json(render_docs):
    """No table of docs/benchmarks.md is typed by hand: each sits in a generated block (issue 24)."""
    import re

    text = (ROOT / "docs/benchmarks.md").read_text()
    inside = False
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(r"<!-- generated:", line):
            inside = True
        elif re.match(r"<!-- end generated:", line):
            inside = False
        elif line.startswith("|"):
            assert inside, f"docs/benchmarks.md:{number}: a table outside a generated block: {line[:80]}"
    names = set(re.findall(r"<!-- generated:([\w-]+) -->", text))
    assert names == {g.name for g in render_docs.REGISTRY if g.doc == "docs/benchmarks.md"}


def test_sparse_ffn_measurements_are_generated_from_json(render_docs):
    """docs/sparse_ffn.md's measured tables (FFN block, end to end, decode, the training peaks' accounting) are
    written from their JSON (issue 23)."""
    import re

    text = (ROOT / "docs/sparse_ffn.md").read_text()
    names = set(re.findall(r"<!-- generated:([\w-]+) -->", text))
    assert names == {"sparse-ffn-block", "sparse-ffn-train", "sparse-ffn-train-select", "sparse-ffn-train-after-fix",
                     "sparse-ffn-moc-profile", "sparse-ffn-decode", "sparse-ffn-memory-accounting",
                     "sparse-ffn-train-mask", "sparse-ffn-masked-backward", "sparse-ffn-radix",
                     "sparse-ffn-moc-profile-mask", "sparse-ffn-parity-after"}
    assert names == {g.name for g in render_docs.REGISTRY if g.doc == "docs/sparse_ffn.md"}


def test_benchmark_tables_follow_their_json(render_docs, monkeypatch):
    """The tables are the JSON's numbers: the FFN table shows bench_ffn_h100.json (re-measured for issue 23; the
    table it replaced contradicted its JSON), the p=4 1B micro-batch-1 table holds V-ZB's 0.83x, and a changed
    JSON value changes the table."""
    import benchmark_tables

    ffn = benchmark_tables.ffn_block()
    assert "| MoC 2:8 (SwiGLU) | 0.97× | 0.96× | 0.208 (-79%) |" in ffn
    # After the fc2 fix (1x H100): the 350m rounds' median ratio, and the memory met at 350m but not at 1b.
    after = benchmark_tables.ffn_train_after_fix()
    assert ("| llama-350m | `bench_train_ffn_350m_fc2fix_rounds_h100.json` | MoC (K = 0.1875 f) | SwiGLU | 145,008 | "
            "169,025 | **0.857** (0.832-0.919, 3 rounds) | 16.15 | 21.18 | 0.76 | ≥ 0.95 at ≤ 0.80: not met (speed) |"
            in after)
    assert "| 24.82 | 35.61 | 0.70 | ≥ 0.97 at ≤ 0.80: met |" in after
    assert "0.81 | ≥ 0.95 at ≤ 0.80: not met (speed, memory)" in after
    # The bit mask against indices in one run (chunked kernels), and the whole-row kernels' run with each search.
    mask = benchmark_tables.ffn_train_mask()
    assert ("| llama-1b | `bench_train_ffn_1b_mask_chunks_h100.json` | MoC (K = 0.1875 f) | mask | bisect | chunks | "
            "80,550 | 88,116 | **0.914** | 28.57 | 35.61 | 0.802 | ≥ 0.95 at ≤ 0.80: not met (speed, memory) |") in mask
    assert ("| top-k ReLU (10%) | mask | radix | whole rows | 129,026 | 160,523 | **0.806** (0.759-0.854, 2 rounds) |"
            in mask)
    backward = benchmark_tables.masked_backward_sweep()
    assert "| 1.153 | 2.148 | (1, 1024, 4) 0.800 | (1, 512, 2) 0.670 | **1.44** | yes |" in backward
    assert "| MoC (K = 0.1875·f) | dense | 5.201 | **0.9888** | 0.9913 |" in benchmark_tables.ffn_parity_after()
    mb1 = benchmark_tables.TABLES["bench-pipeline-p4-1b-mb1"]()
    assert "| V-ZB | 118,131 | 0.83 |" in mb1
    data = json.loads(json.dumps(benchmark_tables.load("bench_checkpoint_1b_h100.json")))
    data["sync_stall_s"] = 50.0
    monkeypatch.setattr(benchmark_tables, "load", lambda name: data)
    assert "| 50.00 s | the whole write |" in benchmark_tables.checkpoint()


def test_the_blocks_hold_the_codes_numbers(render_docs):
    """Spot checks that the generated text is the code's output, not a copy."""
    from effdist.config import NUMERIC_RANGES

    pipeline = (ROOT / "docs/pipeline.md").read_text()
    assert "   effdist simulate --compare 1f1b,interleaved,zb-h1,v-min,v-half,v-zb --pp 4 --microbatches 16 \\" in pipeline
    configs = (ROOT / "docs/configs.md").read_text()
    for name in NUMERIC_RANGES:
        assert f"| `{name}` |" in configs
    assert "| `configs/tiny-cpu.yaml` | 250K | 4 × 64 | 128 |" in configs


def test_replace_block_keeps_indentation_and_refuses_bad_markers(render_docs):
    text = "a\n  <!-- generated:x -->\n  old\n  <!-- end generated:x -->\nb\n"
    assert render_docs.replace_block(text, "x", "  new\n  lines") == \
        "a\n  <!-- generated:x -->\n  new\n  lines\n  <!-- end generated:x -->\nb\n"
    with pytest.raises(render_docs.MarkerError, match="found 0"):
        render_docs.replace_block("no markers\n", "x", "new")
    twice = text + text
    with pytest.raises(render_docs.MarkerError, match="found 2"):
        render_docs.replace_block(twice, "x", "new")


def test_check_names_a_stale_block_and_rendering_fixes_it(render_docs, tmp_path):
    for g in render_docs.REGISTRY:
        (tmp_path / g.doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / g.doc, tmp_path / g.doc)
    doc = tmp_path / "docs/pipeline.md"
    doc.write_text(doc.read_text().replace("15.8%", "15.9%", 1))
    assert render_docs.stale_blocks(tmp_path) == ["docs/pipeline.md: generated:simulate-compare"]
    for path, (current, text) in render_docs.render_all(tmp_path).items():
        path.write_text(text)
    assert render_docs.stale_blocks(tmp_path) == []
    assert doc.read_text() == (ROOT / "docs/pipeline.md").read_text()


def test_the_script_exits_0_when_current():
    proc = subprocess.run([sys.executable, "tools/render_docs.py", "--check"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_inference_doc_names_every_ffn_kind_generate_loads():
    """docs/inference.md's list of supported FFNs is the one effdist.infer loads (it once said swiglu and relu2
    only, and that other kinds were refused, while every kind loads)."""
    from effdist.infer.model import SUPPORTED_FFN_KINDS

    text = " ".join((ROOT / "docs/inference.md").read_text().split())
    line = text[text.index("Supported FFNs:"):].split(")")[0]
    assert all(f"`{kind}`" in line for kind in SUPPORTED_FFN_KINDS), line
    assert "refused" not in line, line
