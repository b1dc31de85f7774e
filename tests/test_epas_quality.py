"""tools/epas_quality.py gathers held-out EPAS-vs-dense runs (tools/loss_parity.py --eval-data), made in separate
device calls, into docs/results/epas_quality.json (issue 25 item 6); and loss_parity scores each run held out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launching import ROOT, clean_env

sys.path.insert(0, str(ROOT / "tools"))
import epas_quality  # noqa: E402


def _run_file(tmp_path, name: str, *, seed: int, region: int, heldout: float, model: str = "llama-1b",
              tokens: int = 33_030_144, data: str = "data/english-large/heldout") -> str:
    curve = [[s, 6.0 - s / 100 + region / 1000] for s in range(1, 101)]
    record = {"overrides": [], "final_loss": curve[-1][1], "curve": curve, "tokens": tokens, "model": model,
              "seed": seed, "heldout_loss": heldout,
              "heldout": {"data": data, "windows": 32, "seq_length": 2048, "step": 1008, "trained_region": region,
                          "losses": {str(region): heldout}}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({name: record}))
    return str(path)


def test_a_comparison_holds_the_issues_fields_and_replaces_its_own_entry(tmp_path, capsys):
    d1 = _run_file(tmp_path, "dense_s1", seed=1, region=0, heldout=3.00)
    e1 = _run_file(tmp_path, "epas_s1", seed=1, region=12, heldout=3.03)
    d2 = _run_file(tmp_path, "dense_s2", seed=2, region=0, heldout=3.10)
    e2 = _run_file(tmp_path, "epas_s2", seed=2, region=12, heldout=3.10)
    out = tmp_path / "epas_quality.json"
    out.write_text(json.dumps({"schema": epas_quality.SCHEMA, "comparisons": [
        {"name": "llama-125m L/2", "model": "llama-125m"}, {"name": "llama-1b 3L/4", "model": "stale"}]}))
    png = tmp_path / "curves.png"
    assert epas_quality.main(["--name", "llama-1b 3L/4", "--pair", f"{d1}={e1}", "--pair", f"{d2}:dense_s2={e2}",
                              "--json", str(out), "--png", str(png)]) == 0
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["comparisons"]] == ["llama-125m L/2", "llama-1b 3L/4"]  # replaced, others kept
    entry = data["comparisons"][1]
    assert (entry["model"], entry["final_region"], entry["tokens"], entry["seeds"]) == ("llama-1b", 12, 33_030_144,
                                                                                     [1, 2])
    assert entry["dense_loss"] == [3.00, 3.10] and entry["epas_loss"] == [3.03, 3.10]
    assert entry["ratio_per_seed"] == pytest.approx([1.01, 1.0])
    assert entry["ratio_mean"] == pytest.approx(1.005) and entry["met"] is True and entry["goal"] == 1.01
    assert "held-out EPAS / dense 1.0050 (mean; seed 1: 1.0100, seed 2: 1.0000); goal <= 1.01: met" in \
        capsys.readouterr().out
    assert png.stat().st_size > 10_000
    # A comparison the issue asks to report without a threshold (continual pretraining): goal and met are null.
    assert epas_quality.main(["--name", "continual", "--goal", "none", "--pair", f"{d1}={e1}", "--json",
                              str(out)]) == 0
    entry = json.loads(out.read_text())["comparisons"][2]
    assert entry["goal"] is None and entry["met"] is None and entry["ratio_mean"] == pytest.approx(1.01)
    assert "1.0100 (mean; seed 1: 1.0100); no goal (reported)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        epas_quality.main(["--name", "x", "--goal", "soon", "--pair", f"{d1}={e1}", "--json", str(out)])
    assert "--goal: 'soon': give a ratio such as 1.01, or none" in capsys.readouterr().err


@pytest.mark.parametrize("change, line", [
    (dict(seed=2), "seed differs (1 against 2)"),
    (dict(tokens=1000), "tokens differs (33030144 against 1000)"),
    (dict(region=0), "the EPAS side shares no layer (trained region 0)"),
    (dict(data="data/english/english"), "held-out data differs"),
])
def test_a_pair_that_is_not_like_for_like_is_one_line(tmp_path, capsys, change, line):
    dense = _run_file(tmp_path, "dense", seed=1, region=0, heldout=3.0)
    epas = _run_file(tmp_path, "epas", **{**dict(seed=1, region=12, heldout=3.0), **change})
    assert epas_quality.main(["--name", "x", "--pair", f"{dense}={epas}", "--json", str(tmp_path / "q.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("epas_quality: --pair dense:dense=epas:epas: ") and line in err and "\n" not in err
    assert not (tmp_path / "q.json").exists()


def test_missing_held_out_loss_and_bad_pairs_are_named(tmp_path, capsys):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"dense": {"final_loss": 3.0}, "epas": {"final_loss": 3.1}}))
    for pair, line in [(f"{plain}", "expected DENSE_FILE[:VARIANT]=EPAS_FILE[:VARIANT]"),
                       (f"{plain}={plain}", "holds 2 runs (dense, epas); name one as"),
                       (f"{plain}:dense={plain}:nope", "has no held-out loss; make it with tools/loss_parity.py"),
                       (f"{plain}:epas={plain}:nope", "has no held-out loss")]:
        assert epas_quality.main(["--name", "x", "--pair", pair, "--json", str(tmp_path / "q.json")]) == 2
        assert line in capsys.readouterr().err
    assert epas_quality.main(["--name", "x", "--json", str(tmp_path / "q.json")]) == 2
    assert "give at least one --pair DENSE=EPAS" in capsys.readouterr().err


def _regions_file(tmp_path, name: str, seed: int, losses: dict, trained: int = 12, tokens: int = 33_030_144) -> str:
    path = _run_file(tmp_path, name, seed=seed, region=trained, heldout=losses[trained], tokens=tokens)
    runs = json.loads(open(path).read())
    runs[name]["heldout"]["losses"] = {str(r): v for r, v in losses.items()}
    open(path, "w").write(json.dumps(runs))
    return path


def test_regions_of_tabulates_the_held_out_loss_at_every_region_and_the_usable_ones(tmp_path, capsys):
    """Item 4: the mean over the seeds at each region measured in every run, its excess over the trained region's,
    and the regions within the tolerance; beside the comparisons of the same file, which are kept."""
    s1 = _regions_file(tmp_path, "epas_s1", 1, {0: 3.00, 4: 3.01, 8: 3.02, 12: 3.00, 13: 3.10})
    s2 = _regions_file(tmp_path, "epas_s2", 2, {0: 3.02, 4: 3.01, 8: 3.04, 12: 3.02, 13: 3.12, 16: 3.5})
    out = tmp_path / "q.json"
    out.write_text(json.dumps({"schema": epas_quality.SCHEMA, "comparisons": [{"name": "kept"}]}))
    png = tmp_path / "regions.png"
    assert epas_quality.main(["--name", "1b regions", "--regions-of", s1, "--regions-of", s2, "--json", str(out),
                              "--png", str(png)]) == 0
    data = json.loads(out.read_text())
    assert data["comparisons"] == [{"name": "kept"}]
    (entry,) = data["regions"]
    assert entry["regions"] == [0, 4, 8, 12, 13] and entry["seeds"] == [1, 2] and entry["trained_region"] == 12
    assert entry["mean_loss"]["8"] == pytest.approx(3.03)
    assert entry["excess"]["8"] == pytest.approx(3.03 / 3.01 - 1) and entry["excess"]["12"] == 0
    assert entry["usable"] == [0, 4, 12]  # 8 is +0.66%, 13 +3.3%
    text = capsys.readouterr().out
    assert "usable within 0.5%: 0, 4, 12" in text and "+0.66%" in text and "(trained)" in text
    assert png.stat().st_size > 10_000
    # The same name again replaces its entry; a looser tolerance takes region 8 in.
    assert epas_quality.main(["--name", "1b regions", "--regions-of", s1, "--regions-of", s2, "--tolerance", "0.01",
                              "--json", str(out)]) == 0
    assert [e["usable"] for e in json.loads(out.read_text())["regions"]] == [[0, 4, 8, 12]]


def test_regions_of_refuses_runs_that_are_not_one_model_and_region(tmp_path, capsys):
    s1 = _regions_file(tmp_path, "a", 1, {0: 3.0, 12: 3.0})
    for other, line in [(_regions_file(tmp_path, "b", 2, {0: 3.0, 8: 3.0}, trained=8), "trained region 8 where"),
                        (_regions_file(tmp_path, "c", 2, {0: 3.0, 12: 3.0}, tokens=5), "tokens 5 where"),
                        (_regions_file(tmp_path, "d", 1, {0: 3.0, 12: 3.0}), "seed 1 is already given")]:
        assert epas_quality.main(["--name", "x", "--regions-of", s1, "--regions-of", other, "--json",
                                  str(tmp_path / "q.json")]) == 2
        err = capsys.readouterr().err.strip()
        assert line in err and "\n" not in err
    dense = _regions_file(tmp_path, "dense", 1, {0: 3.0}, trained=0)
    assert epas_quality.main(["--name", "x", "--regions-of", dense, "--json", str(tmp_path / "q.json")]) == 2
    assert "shares no layer" in capsys.readouterr().err
    assert epas_quality.main(["--name", "x", "--regions-of", s1, "--pair", f"{s1}={s1}", "--json",
                              str(tmp_path / "q.json")]) == 2
    assert "not both" in capsys.readouterr().err and not (tmp_path / "q.json").exists()


@pytest.mark.slow
def test_loss_parity_scores_each_run_held_out_at_its_trained_region(tmp_path):
    """--eval-data: the run's final checkpoint goes through `effdist eval`, and its held-out loss is the one at the
    region it was trained with (tiny model, CPU, one EPAS run, the run's own training data standing in for
    held-out; one run keeps this test at two processes)."""
    out = tmp_path / "parity.json"
    sets = ["train.global_batch=4", "data.sample_documents=200", "data.seq_length=64", "logging.tensorboard=false",
            "logging.progress_bar=false"]
    cmd = [sys.executable, "tools/loss_parity.py", "--config", "configs/tiny-cpu.yaml", "--steps", "4", "--window",
           "2", "--eval-data", "train", "--eval-windows", "2", "--out-dir", str(tmp_path / "runs"), "--json", str(out),
           "--variant", "epas=epas.enabled=true,epas.interval=1,epas.final_region=2"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    r = json.loads(out.read_text())["epas"]
    assert r["heldout"]["trained_region"] == 2 and sorted(r["heldout"]["losses"]) == ["0", "1", "2", "3"]
    assert r["heldout_loss"] == r["heldout"]["losses"]["2"] > 0
    assert (r["model"], r["seed"], r["heldout"]["windows"], r["heldout"]["step"]) == ("tiny", 1234, 2, 4)
    assert "held-out" in proc.stdout and (tmp_path / "runs" / "epas" / "heldout.json").exists()
    # Each step's gradient norm, and the share of steps clipping scaled, from the run's own metrics.jsonl.
    logged = [json.loads(line) for line in (tmp_path / "runs" / "epas" / "metrics.jsonl").read_text().splitlines()]
    norms = [[m["step"], m["grad_norm"]] for m in logged if "grad_norm" in m]
    assert r["grad_norm_curve"] == norms and len(norms) == 4 and r["clip_grad"] == 1.0
    assert r["clipped_fraction"] == sum(g > 1.0 for _, g in norms) / 4


def test_loss_parity_records_the_held_out_ratio_against_the_baseline():
    """Given both runs' held-out losses, the variant's ratio to its baseline's is recorded beside the training one."""
    import loss_parity

    results = {"dense": {"final_loss": 3.0, "heldout_loss": 2.0, "median_tokens_per_s": 1.0},
               "epas": {"final_loss": 3.3, "heldout_loss": 2.1, "median_tokens_per_s": 1.0}}
    loss_parity.compare(results, [("dense", []), ("epas", [])], {"epas": "dense"})
    assert results["epas"]["ratio_vs_baseline"] == pytest.approx(1.1)
    assert results["epas"]["heldout_ratio_vs_baseline"] == pytest.approx(1.05)
    assert results["dense"]["heldout_ratio_vs_baseline"] == 1.0  # the first variant is its own baseline
