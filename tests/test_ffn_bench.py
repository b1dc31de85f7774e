"""tools/bench_ffn.py runs end to end on CPU (--tiny) and reports every variant against its baseline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ffn_tiny_smoke(tmp_path):
    out = tmp_path / "ffn.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "tools/bench_ffn.py", "--tiny", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert {"swiglu", "moc", "moc-2:8", "topk-relu", "relu2", "elas", "elas-masked", "relu2-lowrank",
            "elas-lowrank"} <= set(rows)
    for name, row in rows.items():
        if name.endswith("-cslt"):
            assert "needs CUDA" in row["skipped"]
            continue
        assert "error" not in row, f"{name}: {row.get('traceback')}"
        assert row["ms"] > 0 and math.isfinite(row["ms"])
        if row["baseline"]:
            assert row["bytes_vs_baseline"] == row["saved_bytes"] / rows[row["baseline"]]["saved_bytes"]
    # The sparse variants keep less for backward than their dense baselines.
    for name in ("moc", "moc-2:8", "topk-relu", "elas", "elas-masked", "elas-lowrank"):
        assert rows[name]["bytes_vs_baseline"] < 1, name
    assert rows["elas-masked"]["saved_bytes"] < rows["elas"]["saved_bytes"]
    assert "elas-masked" in proc.stdout and "x base" in proc.stdout
