"""tools/bench_epas.py (CPU smoke run) and tools/layer_redundancy.py (smoke run, and its measurement
on a model built so that two consecutive layers have identical Q/K)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_epas_tiny(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["tools/bench_epas.py", "--tiny", "--steps", "1", "--rounds", "1", "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [(r["variant"], r["region"]) for r in runs] == [("dense", 0), ("epas r=0", 0), ("epas r=2", 2),
                                                             ("epas r=3", 3)]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in runs)
    ideal = [r["ideal_speedup_vs_region0"] for r in runs[1:]]
    assert ideal[0] == 1.0 and 1.0 < ideal[1] < ideal[2]
    assert "vs r=0" in proc.stdout
    assert runs[0]["first_loss"] == runs[1]["first_loss"], "dense and region 0 start from the same model"


def test_layer_redundancy_smoke(tmp_path, megatron_one_process):
    png, out = tmp_path / "red.png", tmp_path / "red.json"
    assert _tool("layer_redundancy").main(["--random-init", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--seq", "32",
                                           "--batches", "1", "--png", str(png), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    n = result["num_layers"]
    assert n == 4 and png.stat().st_size > 1000
    assert all(-1 <= v <= 1 for v in result["q_cosine_prev"][1:] + result["k_cosine_prev"][1:])
    assert all(0 <= v <= 1 + 1e-6 for row in result["attention_overlap"] for v in row)
    assert 0 <= result["suggested_final_region"] <= n - 1


def test_layer_redundancy_reads_a_run_directory_and_names_a_wrong_one(tmp_path, monkeypatch, capsys):
    """--checkpoint RUN_DIR (as `effdist generate`/`convert` take it) reads its newest complete checkpoint; a path that
    holds none is one line, exit 2 (both were a ConversionError traceback)."""
    import effdist.model.hf_convert as hf_convert

    tool = _tool("layer_redundancy")
    assert tool.main(["--checkpoint", str(tmp_path / "nope"), "--seq", "8", "--batches", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err and "does not exist" in err, err
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000003").mkdir(parents=True)
    (run / "checkpoints" / "iter_0000003" / "effdist.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("iter_0000003")
    seen = []

    def fake_load(path, cfg=None, progress=True):
        seen.append(Path(path))
        raise hf_convert.ConversionError(f"{path}: stop here")

    monkeypatch.setattr(hf_convert, "load_effdist_model", fake_load)
    assert tool.main(["--checkpoint", str(run), "--seq", "8", "--batches", "1"]) == 2
    assert seen == [run / "checkpoints" / "iter_0000003"]
    assert capsys.readouterr().err.strip() == f"layer_redundancy: {seen[0]}: stop here"


@pytest.fixture()
def megatron_one_process():
    from effdist.model.hf_convert import one_process_megatron

    with one_process_megatron():
        yield


def test_redundancy_measure_sees_identical_qk(megatron_one_process):
    """Layer 1 made an identity (zero output projections) and layer 2 given layer 1's norm and Q/K
    weights: layers 1 and 2 then compute the same Q, K and attention; other pairs do not."""
    from effdist.config import load_config
    from effdist.model.gpt import build_gpt

    tool = _tool("layer_redundancy")
    cfg = load_config(None, ["epas.enabled=true", "model.init_std=0.2"])
    torch.manual_seed(0)
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    layers = model.decoder.layers
    with torch.no_grad():
        layers[1].self_attention.linear_proj.weight.zero_()
        layers[1].mlp.linear_fc2.weight.zero_()
        layers[2].input_layernorm.weight.copy_(layers[1].input_layernorm.weight)
        layers[2].self_attention.linear_qkv.weight.copy_(layers[1].self_attention.linear_qkv.weight)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))]
    result = tool.measure(model, batches)
    assert result["q_cosine_prev"][2] == pytest.approx(1.0, abs=1e-5)
    assert result["k_cosine_prev"][2] == pytest.approx(1.0, abs=1e-5)
    assert result["attention_overlap_prev"][2] == pytest.approx(1.0, abs=1e-5)
    for i in (1, 3):
        assert result["q_cosine_prev"][i] < 0.5 and result["attention_overlap_prev"][i] < 0.99
    suggestion = tool.suggest_region(result, threshold=0.999)
    assert suggestion["suggested_final_region"] == 0  # layer 3 differs from layer 2, so no suffix qualifies


def test_suggested_region_uses_the_anchor():
    tool = _tool("layer_redundancy")
    # 5 layers; overlaps are high between neighbours but fall with distance from the anchor.
    n = 5
    overlap = [[1.0 if a == i else 0.95 - 0.1 * (abs(a - i) - 1) for i in range(n)] for a in range(n)]
    result = {"num_layers": n, "attention_overlap": overlap}
    assert tool.suggest_region(result, 0.9)["suggested_final_region"] == 1
    assert tool.suggest_region(result, 0.8)["suggested_final_region"] == 2
    assert tool.suggest_region(result, 0.5)["suggested_final_region"] == 4


def test_bench_epas_reads_a_new_batch_every_step_through_the_trainer_loader(megatron_one_process, tmp_path):
    """bench_epas trains as the trainer does: each step takes the next batch of the MicrobatchLoader (it used
    to repeat one fixed batch, which left the data path out of the timing)."""
    from effdist.model.gpt import build_gpt

    tool = _tool("bench_epas")
    cfg = tool.make_config("tiny", epas=False)
    loader = tool.data_loader(cfg, samples=16, data_dir=tmp_path)
    seen = []
    real_next = loader.next_step

    def recording_next():
        batch = real_next()
        seen.append(batch[0]["tokens"].clone())
        return batch

    loader.next_step = recording_next
    model = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    trainee = tool.Trainee(cfg, model, torch.device("cpu"), loader)
    losses = [trainee.step() for _ in range(2)]
    assert loader.consumed_samples == 2 * cfg.train.micro_batch and all(loss > 0 for loss in losses)
    assert not torch.equal(seen[0], seen[1])
