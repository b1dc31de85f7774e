"""The benchmark tools run end to end (CPU smoke mode), so a GPU session never finds them broken."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.launching import ROOT, clean_env

pytestmark = pytest.mark.slow


def _run(args, tmp_path, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_bench_train_tiny(tmp_path):
    out = tmp_path / "train.json"
    proc = _run(["tools/bench_train.py", "--tiny", "--steps", "2", "--warmup", "1", "--profile", "1", "--json", str(out),
                 "--variant", "dense=", "--variant", "epas=epas.enabled=true;epas.mode=fixed;epas.final_region=2"],
                tmp_path)
    dense, epas = json.loads(out.read_text())["runs"]
    # --profile: the profiled step's wall time and its GPU kernels by name and category (none on a CPU).
    assert dense["profile"]["wall_ms_per_step"] > 0 and isinstance(dense["profile"]["categories_ms"], dict)
    assert dense["tokens_per_s"] > 0 and "error" not in dense and "error" not in epas
    assert "tok/s" in proc.stdout and "dense-eq" in proc.stdout
    # Executed FLOPs: the dense run executes its dense count, the EPAS run (2 of 4 layers sharing) less.
    assert dense["flops_per_token_executed"] == dense["flops_per_token"]
    assert epas["flops_per_token_executed"] < epas["flops_per_token"] == dense["flops_per_token"]
    fraction = epas["flops_per_token_executed"] / epas["flops_per_token"]
    assert epas["tflops_executed"] == pytest.approx(fraction * epas["tflops"])
    assert epas["tokens_per_s_dense_equiv"] == pytest.approx(fraction * epas["tokens_per_s"])


def test_bench_train_reports_datasheet_mfu_beside_the_measured_ceiling():
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_train import hardware_fractions

    results = {"device": "NVIDIA H100 80GB HBM3", "matmul_ceiling_tflops": 800.0, "fp8_matmul_ceiling_tflops": 1600.0}
    run = {"tflops": 500.0, "tflops_executed": 400.0}
    assert hardware_fractions(run, results, fp8=False) == {"fraction_of_ceiling": 0.5, "mfu_datasheet": 400.0 / 989}
    fp8 = hardware_fractions(run, results, fp8=True)
    assert fp8["fraction_of_fp8_ceiling"] == 0.25 and fp8["mfu_datasheet_fp8"] == 400.0 / 1979
    assert hardware_fractions(run, {"device": "cpu"}, fp8=False) == {}


def test_bench_train_rounds_pair_each_variant_with_its_rounds_baseline():
    """--rounds: each round's ratio is against that round's first variant, the summary takes the medians, so a slow
    spell in one round moves no variant's median; without --isolate it is refused with one line."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_train import main, round_summary

    runs = [{"model": "m", "variant": v, "round": k, "tokens_per_s": t, "peak_mem_gib": p,
             **({"speedup_vs_first_variant": t / base} if v != "a" else {})}
            for k, (base, b) in enumerate([(100.0, 90.0), (50.0, 46.0), (100.0, 92.0)])
            for v, t, p in (("a", base, 2.0), ("b", b, 1.0 + k))]
    a, b = round_summary(runs)
    assert (a["variant"], a["ratio_median"], a["tokens_per_s_median"], a["rounds"]) == ("a", 1.0, 100.0, 3)
    assert b["ratio_median"] == pytest.approx(0.92) and b["ratio_range"] == pytest.approx([0.9, 0.92])
    assert b["tokens_per_s_median"] == 90.0 and b["peak_mem_gib"] == 3.0
    with pytest.raises(SystemExit) as exc:
        main(["--tiny", "--rounds", "2"])
    assert exc.value.code == 2


def test_plot_ffn_tradeoff_draws_the_after_fix_table(tmp_path):
    """The picture in docs/sparse_ffn.md is drawn from the same points as the generated table."""
    sys.path.insert(0, str(ROOT / "tools"))
    import plot_ffn_tradeoff

    pts = plot_ffn_tradeoff.points()
    moc350 = next(p for p in pts if (p["model"], p["kind"]) == ("llama-350m", "moc"))
    assert (round(moc350["speed"], 3), round(moc350["memory"], 3)) == (0.857, 0.763)
    assert plot_ffn_tradeoff.plot(tmp_path / "f.png").stat().st_size > 10_000


def test_kernel_categories():
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_train import categorise

    kernels = {"nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": 3.0, "nvjet_qqtst_128x256_128x6_2x1_v_bz_TNN": 2.0,
               "sm90_xmma_gemm_e4m3e4m3_bf16f32_f32_tn_n_tilesize128x128x128": 1.0,
               "flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>": 1.5,
               "triton_red_fused__to_copy_abs_amax_0": 0.25, "triton_poi_fused__to_copy_clamp_div_mul_1": 0.25,
               "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>": 0.5,
               "void at::native::vectorized_elementwise_kernel<4, AddFunctor>": 0.125,
               # As an H100 FP8 step names them (2026-12-06): cuBLAS FP8 GEMMs with e4m3 x e4m3 and e4m3 x e5m2
               # operands, a bf16 one, and inductor's cast kernels (named after the _scaled_mm they feed).
               "nvjet_sm90_qrtst_128x160_128x5_1x2_h_bz_coopA_algo2_TNT": 4.0,
               "nvjet_sm90_qqtst_192x192_128x4_1x2_h_bz_coopB_TNN": 8.0,
               "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN": 16.0,
               "triton_poi_fused__scaled_mm__to_copy_clamp_clone_mul_reciprocal_t_view_3": 32.0}
    cats = categorise({name: {"ms": ms} for name, ms in kernels.items()})
    assert cats == {"gemm": 19.0, "fp8 gemm": 15.0, "attention": 1.5, "compiled (triton)": 32.5, "optimizer": 0.5,
                    "other elementwise": 0.125}


def test_bench_torchtitan_worker_command_parses():
    """The launcher starts each variant's worker without --json (it writes the JSON itself): the worker must
    parse its own command line, and torchtitan's options must reach torchtitan untouched."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_torchtitan import DEFAULT_VARIANTS, parse, worker_command

    # Run bare, the tool compares like for like with effdist (its LM head stays bf16 in effdist's FP8).
    assert [v.split("=")[0] for v in DEFAULT_VARIANTS] == ["float8_compile", "bf16_compile"]
    assert DEFAULT_VARIANTS[0].endswith("--quantize.linear.float8.filter_fqns output")

    cmd, tt_args, out = worker_command("/tmp/tt.json", "float8_compile",
                                       "--model.converters quantize.linear.float8 --quantize.linear.float8.filter_fqns output", 8, 4)
    args, rest = parse(cmd[2:])
    assert (args.worker_out, args.warmup, rest) == (out, 4, tt_args)
    assert rest[-4:] == ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.filter_fqns", "output"]
    assert "--training.steps" in rest and rest[rest.index("--training.steps") + 1] == "8"
    with pytest.raises(SystemExit):  # the launcher still needs --json
        parse(["--variant", "x="])


def test_bench_train_under_torchrun_runs_variant_after_variant(tmp_path):
    """Two ranks, three variants (one at TP=2): the process group is kept between variants; starting it anew
    on torchrun's store made the ranks wait for the previous group's peers (a hang under NCCL)."""
    out = tmp_path / "train.json"
    proc = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tools/bench_train.py", "--tiny",
                 "--steps", "1", "--warmup", "1", "--variant", "a=", "--variant", "tp2=parallel.tp=2", "--variant", "b=",
                 "--json", str(out)], tmp_path)
    runs = json.loads(out.read_text())["runs"]
    assert [r["variant"] for r in runs] == ["a", "tp2", "b"] and all(r["tokens_per_s"] > 0 for r in runs)
    assert proc.stdout.count("tok/s") == 1, "only rank 0 reports"


def test_loss_parity_replot_draws_an_earlier_run(tmp_path):
    curve = [[s, 5.0 + 1.0 / s] for s in range(1, 31)]
    runs = {"dense": {"final_loss": 5.03, "curve": curve},
            "epas": {"final_loss": 5.1, "curve": [[s, 1.01 * v] for s, v in curve], "baseline": "dense",
                     "ratio_vs_baseline": 1.01}}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    png = tmp_path / "loss.png"
    _run(["tools/loss_parity.py", "--replot", str(tmp_path / "runs.json"), "--png", str(png), "--window", "5"],
         tmp_path)
    assert png.stat().st_size > 10_000
    proc = subprocess.run([sys.executable, "tools/loss_parity.py", "--replot", str(tmp_path / "runs.json")], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--replot needs --png" in proc.stderr


def test_bench_checkpoint_tiny(tmp_path):
    out = tmp_path / "ckpt.json"
    _run(["tools/bench_checkpoint.py", "--tiny", "--dir", str(tmp_path / "ck"), "--json", str(out)], tmp_path)
    r = json.loads(out.read_text())
    # Both saves ran and the background one became visible within the polled steps. Which stalls less is a
    # question for real sizes (docs/results, GPU): the tiny model's files take milliseconds to write, less than
    # forking the background writer, so the smoke test does not compare the two.
    assert 0 < r["sync_stall_s"] and 0 < r["async_save_call_s"] <= r["async_stall_s"]
    assert 1 <= r["async_steps_until_visible"] < 200
    assert r["stall_ratio_async_vs_sync"] == pytest.approx(r["async_stall_s"] / r["sync_stall_s"])
    assert r["checkpoint_bytes_on_disk"] > 0


def test_gpu_kernel_benchmarks_say_they_need_a_gpu():
    """tools/bench_sparse24_tile.py and tools/bench_topk_select.py time GPU kernels only: on a machine without one
    they say so in one line."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the tools run for real (suite parts sparse24_table, mask_chunks)")
    for tool in ("tools/bench_sparse24_tile.py", "tools/bench_topk_select.py"):
        proc = subprocess.run([sys.executable, tool], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and "it needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr, tool


def test_activation_memory_probe_and_accounting(tmp_path):
    """tools/probe_activation_memory.py runs the trainer's forward per FFN kind (CPU: saved tensors per module;
    MoC's fc2 keeps no dense input, its recipe stands in), and tools/ffn_memory_accounting.py splits the shipped
    training peaks into parameters and activations against the per-kind accounting."""
    out = tmp_path / "probe.json"
    _run(["tools/probe_activation_memory.py", "--tiny", "--json", str(out), "--variant", "swiglu=",
          "--variant", "moc=ffn.kind=moc"], tmp_path)
    swiglu, moc = json.loads(out.read_text())["rows"]
    assert "RowParallelLinear" in swiglu["saved_bytes_per_token_layer"]  # fc2 saves its dense input
    assert "RowParallelLinear" not in moc["saved_bytes_per_token_layer"]  # ... MoC's is a recipe
    assert 0 < moc["saved_bytes"] < swiglu["saved_bytes"]

    out = tmp_path / "accounting.json"
    _run(["tools/ffn_memory_accounting.py", "--json", str(out)], tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert {r["ffn_kind"] for r in rows} >= {"moc", "topk", "elas", "relu2"}
    for r in rows:
        # The parts add up to the measured difference; relu2 keeps what SwiGLU keeps at the same width.
        assert r["gap_bytes_per_token_layer"] == pytest.approx(
            r["activation_bytes_per_token_layer_vs_swiglu"] - r["accounted_bytes_per_token_layer_vs_swiglu"])
        if r["ffn_kind"] == "relu2":
            assert r["accounted_bytes_per_token_layer_vs_swiglu"] == 0


def test_effdist_bench_names_a_benchmark_by_short_or_script_name(capsys):
    """`effdist bench NAME`: the short name, the script's name and its path all run tools/bench_NAME.py; an unknown
    one is one line listing what exists."""
    from effdist import bench

    for name in ("ffn", "bench_ffn", "tools/bench_ffn.py"):
        assert bench.main([name, "--help"]) == 0, name
        assert "bench_ffn" in capsys.readouterr().out
    assert bench.main(["bench_nothing"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'bench_nothing'; available:" in err and "train" in err
