"""The tables of docs/benchmarks.md, written from the JSON in docs/results by tools/render_docs.py.

Every number in a table comes from the JSON a benchmark run wrote (named under each table in the doc); the
labels and the choice of rows are here. `register(generated)` adds one generated block per table to
render_docs' registry, so `python tools/render_docs.py --check` (tests/test_render_docs.py) fails when a
table differs from its JSON.
"""

from __future__ import annotations

import json
import statistics
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOC = "docs/benchmarks.md"


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def n0(x: float) -> str:
    return f"{x:,.0f}"


def fixed(digits: int) -> Callable[[float], str]:
    return lambda x: f"{x:.{digits}f}"


f1, f2, f3, f4 = (fixed(d) for d in (1, 2, 3, 4))


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def bold(s: str) -> str:
    return f"**{s}**"


def datasheet_mfu(tflops: float, device: str, fp8: bool = False) -> str:
    """TFLOP/s over the card's dense datasheet peak (bf16: 989 on H100 SXM and H200; FP8: 1979)."""
    from effdist.train.metrics import peak_bf16_tflops, peak_fp8_tflops

    peak = (peak_fp8_tflops if fp8 else peak_bf16_tflops)(device)
    return pct(tflops / peak) if peak else "–"


def run_of(name: str, variant: str | None = None, model: str | None = None) -> dict:
    runs = [r for r in load(name)["runs"] if (variant is None or r.get("variant") == variant)
            and (model is None or r["model"] == model)]
    if len(runs) != 1:
        raise KeyError(f"{name}: {len(runs)} runs with variant={variant!r}, model={model!r}")
    return runs[0]


# ---------------------------------------------------------------------------------------------- dense training

def dense_baseline() -> str:
    data = load("bench_train_baseline_h100.json")
    return table(["model", "mbs × seq", "tokens/s", "model TFLOP/s", "of ceiling", "of datasheet peak", "peak GiB"],
                 [(r["model"], f"{r['micro_batch']} × {r['seq']}", n0(r["tokens_per_s"]), f1(r["tflops"]),
                   pct(r["fraction_of_ceiling"]), datasheet_mfu(r["tflops"], data["device"]), f1(r["peak_mem_gib"]))
                  for r in data["runs"]])


LEVERS = (("unfused", "unfused (megatron's RoPE, effdist's torch RMSNorm, torch SwiGLU, megatron CE)"),
          ("rmsnorm", "+ RMSNorm kernel only"), ("rope", "+ RoPE kernel only"), ("swiglu", "+ SwiGLU kernel only"),
          ("loss", "+ fused LM-head loss only"), ("fused", "all four (`train.fused_kernels: true`, the default)"),
          ("fused_mbs8", "all four, micro-batch 8 (the llama-1b preset now)"))


def dense_levers() -> str:
    name = "bench_train_levers_1b_h100.json"
    device = load(name)["device"]
    base = run_of(name, "unfused")
    rows = []
    for variant, label in LEVERS:
        r = run_of(name, variant)
        rows.append((label, r["micro_batch"], n0(r["tokens_per_s"]), f1(r["tflops"]), pct(r["fraction_of_ceiling"]),
                     datasheet_mfu(r["tflops"], device), f3(r["tokens_per_s"] / base["tokens_per_s"]),
                     f1(r["peak_mem_gib"])))
    return table(["llama-1b, seq 2048", "mbs", "tokens/s", "model TFLOP/s", "of ceiling", "of datasheet peak",
                  "vs unfused", "peak GiB"], rows)


def dense_presets() -> str:
    fused, unfused = "bench_train_125m_350m_fused_h100.json", "bench_train_inprocess_h100.json"
    ffn = run_of("bench_train_ffn_350m_h100.json", "swiglu")

    def cell(r):
        return f"{f1(r['tflops'])} ({pct(r['fraction_of_ceiling'])})"

    rows = []
    for model, variant, mbs in (("llama-125m", "fused", 16), ("llama-350m", "fused", 8),
                                ("llama-350m", "fused_mbs16", 16)):
        r = run_of(fused, variant, model)
        base = cell(run_of(unfused, "unfused", model)) if variant == "fused" else ""
        extra = f"; {cell(ffn)} in the isolated FFN run" if (model, mbs) == ("llama-350m", 8) else ""
        rows.append((model, mbs, base, cell(r) + extra, f1(r["peak_mem_gib"])))
    return table(["model", "mbs", "unfused TFLOP/s (of ceiling)", "fused TFLOP/s (of ceiling)", "fused peak GiB"], rows)


KERNELS = (("rmsnorm", "[16384, 2048]", "RMSNorm fwd+bwd [16384, 2048]"),
           ("swiglu", "[16384, 2x5632]", "SwiGLU fwd+bwd [16384, 2×5632]"),
           ("rope_qk", "q [2048, 8, 32, 64] + k", "RoPE Q+K fwd+bwd [2048, 8, 32, 64]"),
           ("ce", "[16384, 32000]", "cross-entropy fwd+bwd [16384, 32000]"))


def kernels() -> str:
    data = load("bench_kernels_h100.json")

    def row(kernel, shape, impl):
        (r,) = [r for r in data["rows"] if r["model"] == "llama-1b" and r["kernel"] == kernel and r["shape"] == shape
                and r["impl"] == impl and r["pass"] == "fwd+bwd"]
        return r

    rows = []
    for kernel, shape, label in KERNELS:
        ref = row(kernel, shape, "megatron" if kernel == "ce" else "torch")
        fast = row(kernel, shape, "triton")
        rows.append((label, f3(ref["ms"]), f3(fast["ms"]), f"{ref['ms'] / fast['ms']:.1f}×",
                     f"{n0(fast['gbps'])} ({100 * fast['of_peak']:.0f}%)"))
    shape = "[16384, 2048] x [32000, 2048]"
    ref, fused, chunk = (row("lm_head_loss", shape, i) for i in ("megatron", "fused", "fused-chunk4096"))
    rows.append(("LM head + loss fwd+bwd (GEMMs included)", f"{ref['ms']:.2f} (peak {n0(ref['peak_mib'])} MiB)",
                 f"{fused['ms']:.2f} (peak {n0(fused['peak_mib'])} MiB)", f"{ref['ms'] / fused['ms']:.1f}×", ""))
    rows.append(("same, chunked 4096 tokens", "", f"{chunk['ms']:.2f} (peak {n0(chunk['peak_mib'])} MiB)",
                 f"{ref['ms'] / chunk['ms']:.1f}×", ""))
    return table(["llama-1b shape", "torch/megatron ms", "Triton ms", "speed-up",
                  f"Triton GB/s (of {data['peak_gbps'] / 1000:.0f} TB/s)"], rows)


def rope_ab() -> str:
    """The RoPE kernel before (sin/cos per element) and after (cos/sin tables): kernel medians of three runs
    each, and the llama-1b bf16 step with each kernel in its own process."""
    ab = load("bench_rope_ab_h100.json")
    rows = []
    for model, label in (("llama-1b", "llama-1b [2048, 8, 32, 64]"), ("llama-350m", "llama-350m [2048, 8, 16, 64]")):
        for pass_ in ("fwd", "fwd+bwd"):
            picked = {v: [r for run in ab[v] for r in run if r["model"] == model and r["pass"] == pass_]
                      for v in ("old", "new")}
            old, new, gbps = (statistics.median(r[key] for r in picked[v])
                              for v, key in (("old", "ms"), ("new", "ms"), ("new", "gbps")))
            rows.append((label, pass_, f3(old), f3(new), f"{old / new:.2f}×",
                         f"{n0(gbps)} ({100 * gbps / ab['peak_gbps']:.0f}%)",
                         " / ".join(f3(r["ms"]) for r in picked["new"])))
    step = load("bench_train_rope_ab_1b_h100.json")
    before, after = (run_of("bench_train_rope_ab_1b_h100.json", v) for v in ("rope_before", "rope_after"))
    rows.append(("llama-1b bf16 step, mb 8 (tokens/s)", "train", n0(before["tokens_per_s"]),
                 n0(after["tokens_per_s"]), f"{after['tokens_per_s'] / before['tokens_per_s']:.3f}×",
                 f"{after['tflops']:.0f} TFLOP/s (before {before['tflops']:.0f})", ""))
    assert step["device"] == ab["device"]
    return table(["RoPE Q+K", "pass", "before (ms)", "after (ms)", "speed-up", "after: GB/s (of 3 TB/s)",
                  "after, each run"], rows)


# ---------------------------------------------------------------------------------------------- EPAS throughput

def _epas_rows(name: str, model: str, label: str, with_dense: bool = True) -> list[tuple]:
    runs = {r["variant"]: r for r in load(name)["runs"] if r["model"] == model}
    base = runs["epas r=0"]
    layers = {"llama-1b": 16, "llama-350m": 24}[model]
    rows = []
    for variant, r in runs.items():
        if variant == "dense" and not with_dense:
            continue
        region = r["region"]
        what = "dense" if variant == "dense" else f"region {region}" + (
            " (L/2)" if region == layers // 2 else " (3L/4)" if region == 3 * layers // 4 else "")
        speedup = r["tokens_per_s"] / base["tokens_per_s"]
        bound = "" if variant == "dense" else f3(base["flops_per_token"] / r["flops_per_token"])
        rows.append([what, n0(r["tokens_per_s"]), f1(r["step_s"] * 1e3),
                     bold(f3(speedup)) if region else f3(speedup), bound])
    rows[0].insert(0, f"{label} (mbs {load(name).get('micro_batch', 8)})")
    for row in rows[1:]:
        row.insert(0, "")
    return rows


def epas_h100() -> str:
    rows = _epas_rows("bench_epas_h100_1b_frozen_rows.json", "llama-1b", "llama-1b")
    rows += _epas_rows("bench_epas_h100_350m_frozen_rows.json", "llama-350m", "llama-350m")
    return table(["model", "variant", "tokens/s", "step ms", "vs region 0", "FLOP bound"], rows)


EPAS_HISTORY = (
    ("fused kernels on, micro-batch 4, previous session's final state",
     ("bench_epas_h100_fused_final.json", "bench_epas_h100_fused.json")),
    ("gradient norm: per-tensor fp32 norms in one multi-tensor pass instead of every element squared in fp64 (~13 ms "
     "of a 125 ms step, a cost that sharing cannot shrink; the dense step got 7% faster too: 420 → 451 TFLOP/s = "
     "59.1%, `bench_train_1b_gradnorm_h100.json`); Adam moments of frozen rows zeroed, so only weight and master rows "
     "were restored per step", ("bench_epas_h100_gradnorm.json",)),
    ("the presets' micro-batch 8 (was 4 in this tool): per-step costs (AdamW) weigh half as much",
     ("bench_epas_h100_1b_mbs8.json",)),
    ("the packed Q/K gradient built once per run of sharing layers, in place (no dQ/dK copy per layer: −1.0 ms)",
     ("bench_epas_h100_1b_gradsum.json",)),
    ("`MasterWeightAdamW` leaves the sharing layers' Wq/Wk rows alone (AdamW over the V rows only; no per-step "
     "restore)", ("bench_epas_h100_1b_frozen_rows.json",)),
    ("the `wgrad` lever on (dense and EPAS)", ("bench_epas_h100_1b_wgrad.json", "bench_epas_h100_1b_wgrad_rerun.json",
                                               "bench_epas_h100_1b_wgrad_12rounds.json")),
)


def _speedup(name: str, model: str, region: int) -> float:
    runs = [r for r in load(name)["runs"] if r["model"] == model]
    base = next(r for r in runs if r["variant"] == "epas r=0")
    return next(r for r in runs if r["variant"] == f"epas r={region}")["tokens_per_s"] / base["tokens_per_s"]


def epas_history() -> str:
    rows = []
    for label, files in EPAS_HISTORY:
        values = [_speedup(f, "llama-1b", 12) for f in files]
        if len(files) == 1:
            cell = f3(values[0])
        elif "wgrad" in files[0]:
            cell = f"{f3(values[0])}, {f3(values[1])}; {f3(values[2])} over {load(files[2])['rounds']} rounds"
        else:
            cell = f"{f3(min(values))}–{f3(max(values))}"
        rows.append((label, bold(cell) if "frozen_rows" in files[0] else cell))
    return table(["change (llama-1b, 3L/4; JSON in docs/results)", "vs region 0"], rows)


def epas_mbs4() -> str:
    name = "bench_epas_h100_fused.json"
    rows = []
    for model, regions, label in (("llama-1b", (8, 12), "llama-1b (mbs 4)"), ("llama-350m", (12, 18),
                                                                           "llama-350m (mbs 8)")):
        runs = {r["variant"]: r for r in load(name)["runs"] if r["model"] == model}
        base = runs["epas r=0"]
        picked = [runs[f"epas r={g}"] for g in regions]
        rows.append((label, f"region {regions[0]} / {regions[1]}", " / ".join(n0(r["tokens_per_s"]) for r in picked),
                     " / ".join(f3(r["tokens_per_s"] / base["tokens_per_s"]) for r in picked),
                     " / ".join(f3(base["flops_per_token"] / r["flops_per_token"]) for r in picked)))
    return table(["model", "variant", "tokens/s", "vs region 0", "FLOP bound"], rows)


def epas_h200() -> str:
    name = "bench_epas_h200_1b_grad_sum.json"
    runs = {r["variant"]: r for r in load(name)["runs"]}
    base, dense = runs["epas r=0"], runs["dense"]
    rows = []
    for variant, r in runs.items():
        region = r["region"]
        what = "dense" if variant == "dense" else f"region {region}" + {8: " (L/2)", 12: " (3L/4)"}.get(region, "")
        vs0, vsd = r["tokens_per_s"] / base["tokens_per_s"], r["tokens_per_s"] / dense["tokens_per_s"]
        rows.append(("llama-1b (mbs 8)" if variant == "dense" else "", what, n0(r["tokens_per_s"]),
                     f1(r["step_s"] * 1e3), bold(f3(vs0)) if region else f3(vs0),
                     bold(f3(vsd)) if region == 12 else f3(vsd),
                     "" if variant == "dense" else f3(base["flops_per_token"] / r["flops_per_token"])))
    return table(["model", "variant", "tokens/s", "step ms", "vs region 0", "vs dense", "FLOP bound"], rows)


# ---------------------------------------------------------------------------------------------- loss parity

def _parity(name: str, key: str) -> dict:
    return load(name)[key]


PARITY_125M = (("dense", "dense SwiGLU", ""),
               ("epas", "EPAS growing to 3L/4 = 9 layers (from step 50, one layer per 15 steps)", "≤ 1.01"),
               ("moc", "MoC (K = 0.1875·f)", "≤ 1.03"), ("topk", "top-k ReLU", "≤ 1.03"), ("relu2", "ReLU²", ""),
               ("elas", "ELAS (2:4, 50 dense warm-up steps)", "≤ 1.03"))


def parity_125m() -> str:
    name = "loss_parity_125m_h100.json"
    names = {"dense": "dense", "relu2": "ReLU²"}
    rows = []
    for key, label, goal in PARITY_125M:
        r = _parity(name, key)
        ratio = r["ratio_vs_baseline"]
        verdict = "" if not goal else f"{goal}: " + ("met" if ratio <= float(goal.split()[-1]) else bold("not met"))
        rows.append((label, "—" if key == "dense" else names[r["baseline"]], f3(r["final_loss"]), f3(ratio), verdict))
    return table(["variant", "baseline", "final loss", "vs baseline", "goal"], rows)


def _schedule(overrides: list[str]) -> dict:
    o = dict(x.split("=", 1) for x in overrides)
    return {"fixed": o.get("epas.mode") == "fixed", "start": int(o.get("epas.start_step", 0)),
            "interval": int(o.get("epas.interval", 100)), "T": int(o.get("epas.transition_steps", 0)),
            "final": int(o["epas.final_region"])}


TRANSITIONS = (("hard switch (as before)", ("transition", "hard"), None),
               ("transitions of 15 steps", ("transition", "t15"), None),
               ("transitions of 30 steps", ("transition", "t30"), None),
               ("early and fast", ("transition", "early"), ("early", "early")),
               ("early, every 3 steps", None, ("early", "every3")),
               ("early, T = 10", None, ("early", "early_t10")),
               ("earlier (before the warm-up ends)", None, ("early", "start15")),
               ("the final region from step 0 (no switch at all)", ("transition", "fixed0"), None),
               (bold("L/2") + " (6 layers) for reference", ("transition", "half"), None))
SWEEPS = {"transition": "loss_parity_125m_transition_h100.json", "early": "loss_parity_125m_early_h100.json"}


def transitions() -> str:
    rows = []
    for label, first, second in TRANSITIONS:
        run = _parity(SWEEPS[(first or second)[0]], (first or second)[1])
        s = _schedule(run["overrides"])
        when = "fixed" if s["fixed"] else f"{s['start']}, {s['interval']}, {s['T']}"
        full = 0 if s["fixed"] else s["start"] + (s["final"] - 1) * s["interval"]
        cells = []
        if first:
            value = f3(_parity(SWEEPS["transition"], first[1])["ratio_vs_baseline"])
            cells.append(bold(value) if first[1] in ("early", "half") else value)
        if second:
            value = f3(_parity(SWEEPS["early"], second[1])["ratio_vs_baseline"])
            cells.append(f"again in the second sweep: {value}" if first else f"{value} (second sweep)")
        rows.append((label, when, full, "; ".join(cells)))
    return table(["EPAS variant (250 steps, 8.2M tokens)", "first sharing step, interval, T", "all layers from step",
                  "final loss / dense"], rows)


def clipping() -> str:
    one, two = "loss_parity_125m_clip_h200.json", "loss_parity_125m_clip2_h200.json"
    rows = [("EPAS (early) / dense", f4(_parity(one, "early")["ratio_vs_baseline"]),
             f4(_parity(two, "early")["ratio_vs_baseline"])),
            ("EPAS (early, `epas.anchor_grad=mean`) / dense", f4(_parity(one, "early_mean")["ratio_vs_baseline"]),
             f4(_parity(two, "early_mean")["ratio_vs_baseline"])),
            ("without clipping (`optim.clip_grad=0`): dense / dense with clipping",
             f4(_parity(one, "dense_noclip")["ratio_vs_baseline"]), ""),
            ("without clipping: EPAS / dense, both unclipped", f4(_parity(one, "early_noclip")["ratio_vs_baseline"]), "")]
    return table(["125M, 250 steps", "seed 1", "seed 2"], rows)


def parity_350m() -> str:
    name = "loss_parity_350m_seeds_h200.json"
    ratios = [_parity(name, f"epas_s{s}")["ratio_vs_baseline"] for s in (1, 2)]
    return table(["350M, 250 steps", "seed 1", "seed 2", "mean"],
                 [("dense final loss", *(f3(_parity(name, f"dense_s{s}")["final_loss"]) for s in (1, 2)), ""),
                  ("EPAS to 18 of 24 / dense", *(f4(r) for r in ratios), bold(f3(statistics.mean(ratios))))])


def regions() -> str:
    files = ("loss_parity_125m_regions_s1_h200.json", "loss_parity_125m_regions_s2_h200.json")
    rows = []
    for region, label in ((6, "6 (L/2)"), (7, "7"), (8, "8"), (9, "9 (3L/4)")):
        ratios = [_parity(f, f"r{region}")["ratio_vs_baseline"] for f in files]
        rows.append((label, *(f4(r) for r in ratios), f3(statistics.mean(ratios))))
    return table(["final region (of 12 layers)", "seed 1", "seed 2", "mean"], rows)


def epas_quality() -> str:
    """Issue 25: every comparison of docs/results/epas_quality.json (held-out loss, EPAS against dense)."""
    rows = []
    for c in load("epas_quality.json")["comparisons"]:
        rows.append((c["name"], c["model"], str(c["final_region"]), f"{c['tokens'] / 1e6:.1f}M",
                     ", ".join(map(str, c["seeds"])), ", ".join(f4(x) for x in c["dense_loss"]),
                     ", ".join(f4(x) for x in c["epas_loss"]), ", ".join(f4(x) for x in c["ratio_per_seed"]),
                     bold(f4(c["ratio_mean"])),
                     "none (reported)" if c["goal"] is None else
                     f"<= {c['goal']}, mean of 2 seeds: " + ("met" if c["met"] and len(c["seeds"]) >= 2 else
                                                             "not met" if len(c["seeds"]) >= 2 else
                                                             f"{len(c['seeds'])} seed so far")))
    return table(["comparison", "model", "final region", "tokens", "seeds", "dense held-out loss",
                  "EPAS held-out loss", "EPAS / dense per seed", "mean", "goal"], rows)


def epas_quality_regions() -> str:
    """Issue 25 item 4: held-out loss at every inference region of the EPAS models in epas_quality.json."""
    rows = []
    for e in load("epas_quality.json").get("regions", []):
        for r in e["regions"]:
            mark = " (trained)" if r == e["trained_region"] else ""
            rows.append((e["name"], f"{r}{mark}", f4(e["mean_loss"][str(r)]), f"{e['excess'][str(r)]:+.2%}",
                         "yes" if r in e["usable"] else "no"))
    return table(["model", "inference region", "held-out loss (mean of seeds)", "vs trained region",
                  "within 0.5%"], rows)


def _window_ratio(run: dict, base: dict, step: int, window: int = 20) -> float:
    def mean(curve):
        return statistics.mean(v for s, v in curve if step - window < s <= step)

    return mean(run["curve"]) / mean(base["curve"])


def long_runs() -> str:
    rows = []
    for name, key, label in (("loss_parity_125m_long_h200.json", "r9", "llama-125m (9 of 12)"),
                             ("loss_parity_1b_long_h200.json", "r12", "llama-1b (12 of 16)")):
        dense, epas = _parity(name, "dense"), _parity(name, key)
        rows.append((label, f3(dense["final_loss"]), f3(epas["final_loss"]), f3(_window_ratio(epas, dense, 250)),
                     bold(f3(epas["ratio_vs_baseline"]))))
    return table(["model", "dense final loss", "EPAS (3L/4) final loss",
                  "EPAS / dense, 20-step mean at step 250 of this run", "at step 500"], rows)


# ---------------------------------------------------------------------------------------------- sparse FFN

FFN_BLOCK = (("moc", "MoC K=0.1875·f (SwiGLU)"), ("moc-2:8", "MoC 2:8 (SwiGLU)"),
             ("topk-relu", "top-k ReLU 10% (SwiGLU)"), ("elas", "ELAS identity STE (ReLU² at 1.5f)"),
             ("elas-masked", "ELAS masked STE (ReLU²)"), ("elas-cslt", "ELAS with cuSPARSELt forced (ReLU²)"),
             ("elas-lowrank", "ELAS low-rank r = h/4 (ReLU² low-rank)"))


def ffn_block() -> str:
    results = load("bench_ffn_h100.json")["results"]

    def find(variant, tokens):
        (r,) = [r for r in results if r["shape"] == "llama-1b" and r["variant"] == variant and r["tokens"] == tokens]
        return r

    rows = []
    for variant, label in FFN_BLOCK:
        small, large = find(variant, 16384), find(variant, 65536)
        rows.append((label, f"{small['time_vs_baseline']:.2f}×", f"{large['time_vs_baseline']:.2f}×",
                     f"{small['bytes_vs_baseline']:.3f} ({(small['bytes_vs_baseline'] - 1) * 100:+.0f}%)"))
    return table(["variant (baseline)", "1b, 16k tokens: time", "1b, 64k tokens: time", "saved activations vs baseline"],
                 rows)


FFN_TRAIN = (("swiglu", "SwiGLU (dense)", "swiglu"), ("relu2", "ReLU² (dense, 1.5·f)", "swiglu"),
             ("moc", "MoC", "swiglu"), ("topk", "top-k ReLU", "swiglu"),
             ("elas", "ELAS (2:4, sparse from step 0)", "relu2"))


def ffn_train() -> str:
    name = "bench_train_ffn_350m_h100.json"
    rows = []
    for variant, label, baseline in FFN_TRAIN:
        r, b = run_of(name, variant), run_of(name, baseline)
        vs = f3(r["tokens_per_s"] / b["tokens_per_s"]) + (" of ReLU²" if baseline == "relu2" else "")
        mem = r["peak_mem_gib"] / run_of(name, "swiglu")["peak_mem_gib"]
        rows.append((label, n0(r["tokens_per_s"]), vs, f1(r["peak_mem_gib"]), f2(mem)))
    return table(["FFN", "tokens/s", "vs SwiGLU", "peak GiB", "vs SwiGLU"], rows)


# ---------------------------------------------------------------------------------------------- pipeline

SCHEDULE_NAMES = {"1f1b": "1F1B", "interleaved": "interleaved 1F1B", "zb-h1": "ZB-H1", "v-min": "V-Min",
                  "v-half": "V-Half", "v-zb": "V-ZB"}


def _units(r: dict) -> str:
    measured, simulated = r["activation_units"], r["simulated_units"]
    worst = max(abs(m - s) / s for m, s in zip(measured, simulated))
    shown = (f"{measured[0]:.2f} each" if max(measured) - min(measured) < 0.005
             else " / ".join(f"{m:.2f}" for m in measured))
    return f"{shown} ({100 * worst:.1f}%)"


def pipeline_p4(name: str) -> Callable[[], str]:
    def render() -> str:
        results = load(name)["results"]
        ours = next(r for r in results if r["engine"] == "effdist" and r["schedule"] == "1f1b")
        theirs = next(r for r in results if r["engine"] == "megatron-core")
        rows = []
        for r in [theirs] + [r for r in results if r["engine"] == "effdist"]:
            mega = r is theirs
            rows.append(("1F1B (megatron-core, unfused)" if mega else SCHEDULE_NAMES[r["schedule"]],
                         n0(r["tokens_per_s"]), f2(r["tokens_per_s"] / ours["tokens_per_s"]),
                         f2(r["tokens_per_s"] / theirs["tokens_per_s"]),
                         " / ".join(f2(x) for x in r["peak_mem_gib"]), "" if mega else _units(r),
                         "" if mega else f"{pct(r['measured_bubble_rate'])} / {pct(r['simulated_bubble_rate'])}"))
        return table(["schedule", "tokens/s", "vs effdist 1F1B", "vs megatron 1F1B (not like for like)",
                      "peak GiB per rank", "activation units, measured (simulated within)",
                      "bubble measured / simulated"], rows)

    return render


# ---------------------------------------------------------------------------------------------- the rest

def checkpoint() -> str:
    d = load("bench_checkpoint_1b_h100.json")
    return table(["save", "training stall", ""],
                 [("synchronous (`checkpoint.async_save: false`)", f"{d['sync_stall_s']:.2f} s", "the whole write"),
                  ("async (default)", bold(f"{d['async_stall_s']:.2f} s ({d['stall_ratio_async_vs_sync']:.2f}×)"),
                   f"{d['async_save_call_s']:.2f} s in the saving step (copy into reused pinned host buffers), then the "
                   f"background write slows the next {d['async_steps_until_visible']} steps by "
                   f"{d['async_extra_in_following_steps_s']:.2f} s in total")])


def kv_ratio(x: float) -> str:
    return f2(x) if round(x, 2) == x else f3(x)


def decode() -> str:
    results = load("bench_decode_b32_h100.json")["results"]
    rows = []
    for context, regions in ((2048, (0, 8, 12)), (512, (0, 12))):
        for region in regions:
            (r,) = [r for r in results if r["context"] == context and r["variant"] == f"{region}-sdpa"]
            label = f"{region} (full trained region)" if (context, region) == (2048, 12) else str(region)
            speed = f3(r["decode_graphs_vs_best_dense"])
            rows.append((f"{r['batch']} × {context}" if region == 0 else "", label,
                         f"{n0(r['prefill_tokens_per_s'])} ({f2(r['prefill_vs_region0'])})",
                         f"{n0(r['decode_graphs_tokens_per_s'])} ({bold(speed) if (context, region) == (2048, 12) else speed})",
                         f"{n0(r['kv_cache_bytes'] / 2**20)} ({kv_ratio(r['kv_cache_vs_region0'])})"))
    return table(["batch × context", "region", "prefill tok/s (× r0)", "decode tok/s, graphs, sdpa (× best dense)",
                  "KV cache MiB (× r0)"], rows)


DEEPSPEED = (("default", "default (megatron DDP + effdist's fp32-master AdamW)"), ("zero2", "DeepSpeed ZeRO-2"),
             ("zero3", "DeepSpeed ZeRO-3"),
             ("zero3_offload", "DeepSpeed ZeRO-3 + optimizer and parameter offload (DeepSpeedCPUAdam)"))


def deepspeed_1gpu() -> str:
    name = "bench_deepspeed_1b_h100.json"
    base = run_of(name, "default")
    rows = []
    for variant, label in DEEPSPEED:
        r = run_of(name, variant)
        mem = r["peak_mem_gib"] / base["peak_mem_gib"]
        rows.append((label, n0(r["tokens_per_s"]), f3(r["tokens_per_s"] / base["tokens_per_s"]),
                     bold(f1(r["peak_mem_gib"])) if variant == "zero3_offload" else f1(r["peak_mem_gib"]),
                     bold(f2(mem)) if variant == "zero3_offload" else f2(mem)))
    return table(["engine", "tokens/s", "vs default", "peak GiB", "vs default"], rows)


def deepspeed_2gpu() -> str:
    runs = {v: run_of(f"bench_deepspeed_2gpu_{v}_h200x2.json") for v in ("default", "zero2", "zero3")}
    base = runs["default"]
    labels = {"default": "default (megatron DDP + fp32-master AdamW, replicated)", "zero2": "DeepSpeed ZeRO-2",
              "zero3": "DeepSpeed ZeRO-3"}
    rows = []
    for v, r in runs.items():
        mem = r["peak_mem_gib"] / base["peak_mem_gib"]
        rows.append((labels[v], n0(r["tokens_per_s"]), f3(r["tokens_per_s"] / base["tokens_per_s"]), f1(r["tflops"]),
                     bold(f1(r["peak_mem_gib"])) if v == "zero2" else f1(r["peak_mem_gib"]),
                     bold(f2(mem)) if v == "zero2" else f2(mem)))
    return table(["engine, 2 GPUs", "tokens/s (both)", "vs default", "TFLOP/s per GPU", "peak GiB per GPU",
                  "vs default"], rows)


FP8 = (("bf16", "bf16"), ("fp8", "fp8 tensorwise, compiled"), ("fp8_rowwise", "fp8 rowwise, compiled"),
       ("fp8_eager", "fp8 tensorwise, eager"))


FP8_SPEED_COLUMNS = ("tokens/s", "vs bf16", "model TFLOP/s", "of bf16 ceiling", "of bf16 datasheet", "of FP8 ceiling",
                     "of FP8 datasheet", "peak GiB")


def _fp8_speed_cells(r: dict, base: dict, device: str, is_fp8: bool) -> tuple[str, ...]:
    """FP8_SPEED_COLUMNS of one tools/bench_train.py run against its bf16 baseline."""
    return (n0(r["tokens_per_s"]), f3(r["tokens_per_s"] / base["tokens_per_s"]), f"{r['tflops']:.0f}",
            pct(r["fraction_of_ceiling"]), datasheet_mfu(r["tflops"], device),
            pct(r["fraction_of_fp8_ceiling"]) if is_fp8 else "–",
            datasheet_mfu(r["tflops"], device, fp8=True) if is_fp8 else "–", f1(r["peak_mem_gib"]))


def fp8() -> str:
    rows = []
    for card, name in (("H100", "bench_train_fp8_1b_h100.json"), ("H200", "bench_train_fp8_1b_h200.json")):
        device = load(name)["device"]
        base = run_of(name, "bf16")
        for variant, label in FP8:
            runs = [r for r in load(name)["runs"] if r.get("variant") == variant]
            if not runs:
                continue
            rows.append((card, label, *_fp8_speed_cells(runs[0], base, device, variant != "bf16")))
    return table(["card", "variant", *FP8_SPEED_COLUMNS], rows)


FP8_PROFILE = "bench_train_fp8_1b_profile_h100.json"
FP8_PROFILE_ROWS = (("bf16", "bf16"), ("fp8", "fp8 tensorwise, compiled"), ("bf16_mbs16", "bf16"),
                    ("fp8_mbs16", "fp8 tensorwise, compiled"))


def fp8_profile_speed() -> str:
    """The speed rows of the profile run (tools/gpu_h100_suite.sh fp8_profile): micro-batch 8 and 16."""
    device = load(FP8_PROFILE)["device"]
    base = run_of(FP8_PROFILE, "bf16")
    rows = []
    for variant, label in FP8_PROFILE_ROWS:
        r = run_of(FP8_PROFILE, variant)
        rows.append((label, r["micro_batch"], *_fp8_speed_cells(r, base, device, variant.startswith("fp8"))))
    columns = ["vs bf16 (mb 8)" if c == "vs bf16" else c for c in FP8_SPEED_COLUMNS]
    return table(["variant", "micro-batch", *columns], rows)


def _profile_categories(profile: dict) -> dict[str, float]:
    """GPU ms per step by category from a profile's per-kernel times, with tools/bench_train.py's categories.
    record_function ranges that torch.profiler also reports on the GPU ("Optimizer.step#AdamW.step") span
    kernels counted already: left out (the profiler of tools/bench_epas.py drops them since 2026-12-06)."""
    from bench_train import categorise  # a sibling: whoever imported this module has tools/ on sys.path

    return categorise({k: v for k, v in profile["kernels"].items() if "#" not in k})


def fp8_profile_categories() -> str:
    """Where the llama-1b step's GPU time goes, bf16 against FP8 (micro-batch 8, one profiled step each)."""
    bf16, fp8 = (run_of(FP8_PROFILE, v)["profile"] for v in ("bf16", "fp8"))
    cats = [_profile_categories(p) for p in (bf16, fp8)]
    order = sorted(set(cats[0]) | set(cats[1]), key=lambda c: -(cats[0].get(c, 0.0) + cats[1].get(c, 0.0)))
    rows = [(c, *(f1(x[c]) if c in x else "–" for x in cats),
             f"{cats[1].get(c, 0.0) - cats[0].get(c, 0.0):+.1f}") for c in order]
    kernel = [sum(x.values()) for x in cats]
    rows.append(("all GPU kernels", *(bold(f1(k)) for k in kernel), f"{kernel[1] - kernel[0]:+.1f}"))
    walls = [p["wall_ms_per_step"] for p in (bf16, fp8)]
    rows.append(("wall time of the profiled step", *(f1(w) for w in walls), f"{walls[1] - walls[0]:+.1f}"))
    return table(["category (GPU ms per step)", "bf16", "fp8", "fp8 - bf16"], rows)


TITAN_RUNS = (("25 timed steps", "bench_train_fp8_1b_titan_h100.json", "bench_torchtitan_1b_h100.json"),
              ("6 / 4 timed steps", "bench_train_fp8_1b_titan_short_h100.json", "bench_torchtitan_1b_short_h100.json"))


def fp8_torchtitan() -> str:
    """effdist bf16 / FP8 against torchtitan 0.2.2 float8 + compile (and bf16 + compile), llama-1b, same call."""
    rows = []
    for label, ours_name, titan_name in TITAN_RUNS:
        ours, titan = load(ours_name), load(titan_name)
        assert ours["device"] == titan["device"] and ours["date"] == titan["date"]
        tt = {r["variant"]: r for r in titan["runs"]}
        bf16, fp8 = run_of(ours_name, "bf16"), run_of(ours_name, "fp8")
        for r, name, tt_key in ((fp8, "effdist fp8 / torchtitan float8 + compile", "float8_compile"),
                                (bf16, "effdist bf16 / torchtitan bf16 + compile", "bf16_compile")):
            if tt_key not in tt:
                continue
            t = tt[tt_key]
            rows.append((label, name, n0(r["tokens_per_s"]), n0(t["tokens_per_s"]),
                         bold(f3(r["tokens_per_s"] / t["tokens_per_s"])), f1(r["peak_mem_gib"]), f1(t["peak_mem_gib"])))
        rows.append((label, "effdist fp8 / effdist bf16", n0(fp8["tokens_per_s"]), "", f3(fp8["tokens_per_s"] / bf16["tokens_per_s"]),
                     "", ""))
    return table(["run", "ratio", "effdist tokens/s", "torchtitan tokens/s", "ratio", "effdist peak GiB",
                  "torchtitan peak GiB"], rows)


FP8_QUALITY = (("loss_parity_125m_fp8_h200.json", "llama-125m", "H200", "2026-12-05", "fp8"),
               ("loss_parity_125m_fp8_500_h100.json", "llama-125m", "H100", "2026-12-06", "fp8"),
               ("loss_parity_1b_fp8_300_h100.json", "llama-1b", "H100", "2026-12-06", "fp8"),
               ("loss_parity_1b_fp8_500_h100.json", "llama-1b", "H100", "2026-12-06", "fp8"))


def fp8_quality() -> str:
    """FP8 (tensorwise) vs bf16 training loss after the same tokens, same seed and data order."""
    import math

    rows = []
    for name, model, card, date, key in FP8_QUALITY:
        base, run = _parity(name, "bf16"), _parity(name, key)
        steps = len(run["curve"])
        finite = all(math.isfinite(loss) for curve in (base["curve"], run["curve"]) for _, loss in curve)
        half = _window_ratio(run, base, steps // 2)
        ratio = run["ratio_vs_baseline"]
        rows.append((model, card, date, steps, f"{run['tokens'] / 1e6:.1f}M", f4(base["final_loss"]),
                     f4(run["final_loss"]), f4(half), bold(f4(ratio)),
                     "yes" if abs(ratio - 1) <= 0.005 else "no (below bf16)" if ratio < 1 else "no",
                     "none" if finite else "NaN/inf"))
    return table(["model", "card", "date", "steps", "tokens", "bf16 final loss", "fp8 final loss",
                  "fp8 / bf16 at half the steps", "fp8 / bf16 at the end", "within ±0.5%", "NaN"], rows)


FFN_GOALS = {"moc": ("MoC (K = 0.1875 f)", 0.95), "topk": ("top-k ReLU (10%)", 0.97)}


def ffn_train_fused_select() -> str:
    name = "bench_train_ffn_350m_fused_select_h100.json"
    base = run_of(name, "swiglu")
    rows = [("SwiGLU", n0(base["tokens_per_s"]), f3(1.0), f2(base["peak_mem_gib"]), f2(1.0), "—")]
    for variant, (label, goal) in FFN_GOALS.items():
        r = run_of(name, variant)
        speed, mem = r["tokens_per_s"] / base["tokens_per_s"], r["peak_mem_gib"] / base["peak_mem_gib"]
        short = [what for what, ok in (("speed", speed >= goal), ("memory", mem <= 0.80)) if not ok]
        met = f"not met ({', '.join(short)})" if short else "met"
        rows.append((label, n0(r["tokens_per_s"]), f3(speed), f2(r["peak_mem_gib"]), f2(mem),
                     f"≥ {goal:.2f} at ≤ 0.80: {met}"))
    return table(["FFN", "tokens/s", "vs SwiGLU", "peak GiB", "vs SwiGLU", "goal"], rows)


# Issue 23 after the training launch configuration of the fused top-k kernel (2026-12-07, 1x H100): one JSON per
# run, each variant in its own process; every run's SwiGLU variants are baselines, the slower ratio decides.
FFN_SELECT_RUNS = (("llama-350m", "bench_train_ffn_350m_select64_h100.json", ("swiglu",)),
                   ("llama-350m", "bench_train_ffn_350m_select64_confirm_h100.json", ("swiglu", "swiglu_again")),
                   ("llama-1b", "bench_train_ffn_1b_select64_h100.json", ("swiglu",)))


def ffn_train_select() -> str:
    rows = []
    for model, name, baselines in FFN_SELECT_RUNS:
        bases = [run_of(name, b) for b in baselines]
        best = max(bases, key=lambda r: r["tokens_per_s"])  # the faster baseline: the less favourable ratio
        shown = " / ".join(n0(b["tokens_per_s"]) for b in bases)
        for variant, (label, goal) in FFN_GOALS.items():
            try:
                r = run_of(name, variant)
            except KeyError:
                continue
            speed, mem = r["tokens_per_s"] / best["tokens_per_s"], r["peak_mem_gib"] / best["peak_mem_gib"]
            short = [what for what, ok in (("speed", speed >= goal), ("memory", mem <= 0.80)) if not ok]
            met = f"not met ({', '.join(short)})" if short else "met"
            rows.append((model, f"`{name}`", label, n0(r["tokens_per_s"]), shown, bold(f3(speed)), f2(r["peak_mem_gib"]),
                         f2(best["peak_mem_gib"]), f2(mem), f"≥ {goal:.2f} at ≤ 0.80: {met}"))
    return table(["model", "run (docs/results)", "FFN", "tokens/s", "SwiGLU tokens/s", "vs SwiGLU", "peak GiB",
                  "SwiGLU peak GiB", "vs SwiGLU", "goal"], rows)


# Issue 23 after the fix of the dense fc2 input the compact kinds kept alive (2026-12-07, 1x H100): one process per
# variant. At llama-350m one run of 3 rounds (ABCDE x 3): each round's ratio to that round's baseline, the median
# shown with the range; at llama-1b two single runs, against the faster baseline of each run.
FFN_AFTER_FIX_RUNS = (("llama-350m", "bench_train_ffn_350m_fc2fix_rounds_h100.json"),
                      ("llama-1b", "bench_train_ffn_1b_fc2fix_h100.json"),
                      ("llama-1b", "bench_train_ffn_1b_fc2fix_repeat_h100.json"))
FFN_AFTER_FIX_KINDS = (("moc", "MoC (K = 0.1875 f)", ("swiglu", "swiglu_again"), "SwiGLU", 0.95),
                       ("topk", "top-k ReLU (10%)", ("swiglu", "swiglu_again"), "SwiGLU", 0.97),
                       ("elas", "ELAS (identity STE, dense GEMMs)", ("relu2",), "ReLU² (1.5 f)", 1.00))


def ffn_after_fix_ratios(name: str, variant: str, baselines: Sequence[str]) -> list[tuple[float, float, float, float]]:
    """Per round of a run (one round for a run without rounds): (tokens/s, baseline tokens/s, peak, baseline peak),
    the baseline being the faster of `baselines` in that round."""
    runs = [r for r in load(name)["runs"] if "tokens_per_s" in r]
    out = []
    for round_ in dict.fromkeys(r.get("round") for r in runs):
        mine = [r for r in runs if r.get("round") == round_ and r["variant"] == variant]
        bases = [r for r in runs if r.get("round") == round_ and r["variant"] in baselines]
        if mine and bases:
            base = max(bases, key=lambda r: r["tokens_per_s"])
            out.append((mine[0]["tokens_per_s"], base["tokens_per_s"], mine[0]["peak_mem_gib"], base["peak_mem_gib"]))
    return out


def ffn_after_fix_points() -> list[dict]:
    """One point per model, run and kind of FFN_AFTER_FIX_RUNS: the median, least and largest per-round speed ratio,
    the median tokens/s of the kind and of its baseline, their largest peaks and the peak ratio."""
    import statistics

    out = []
    for model, name in FFN_AFTER_FIX_RUNS:
        for variant, label, baselines, base_label, goal in FFN_AFTER_FIX_KINDS:
            per_round = ffn_after_fix_ratios(name, variant, baselines)
            if not per_round:
                continue
            speeds = [t / b for t, b, _, _ in per_round]
            peak, base_peak = max(p for _, _, p, _ in per_round), max(bp for _, _, _, bp in per_round)
            out.append({"model": model, "run": name, "kind": variant, "label": label, "baseline": base_label,
                        "goal": goal, "speed": statistics.median(speeds), "speed_min": min(speeds),
                        "speed_max": max(speeds), "rounds": len(speeds),
                        "tokens_per_s": statistics.median(t for t, _, _, _ in per_round),
                        "baseline_tokens_per_s": statistics.median(b for _, b, _, _ in per_round),
                        "peak": peak, "baseline_peak": base_peak, "memory": peak / base_peak})
    return out


def ffn_train_after_fix() -> str:
    rows = []
    for p in ffn_after_fix_points():
        speed, mem, goal = p["speed"], p["memory"], p["goal"]
        shown = bold(f3(speed)) + (f" ({f3(p['speed_min'])}-{f3(p['speed_max'])}, {p['rounds']} rounds)"
                                   if p["rounds"] > 1 else "")
        if p["kind"] == "elas":
            met = "not met (speed; and the goal asks for 2:4 GEMMs, which these runs do not use)" \
                if speed < goal else "speed met; the goal asks for 2:4 GEMMs, which these runs do not use"
            goal_text = f"≥ {goal:.2f} at 1b: {met}"
        else:
            short = [what for what, ok in (("speed", speed >= goal), ("memory", mem <= 0.80)) if not ok]
            goal_text = f"≥ {goal:.2f} at ≤ 0.80: {'not met (' + ', '.join(short) + ')' if short else 'met'}"
        rows.append((p["model"], f"`{p['run']}`", p["label"], p["baseline"], n0(p["tokens_per_s"]),
                     n0(p["baseline_tokens_per_s"]), shown, f2(p["peak"]), f2(p["baseline_peak"]), f2(mem),
                     goal_text))
    return table(["model", "run (docs/results)", "FFN", "baseline", "tokens/s", "baseline tokens/s", "vs baseline",
                  "peak GiB", "baseline peak GiB", "vs baseline", "goal"], rows)


MOC_KERNELS = ("_topk_select_activate_kernel", "_select_activate_backward_kernel", "_scatter_activated_kernel")
MOC_MASK_KERNELS = ("_topk_select_activate_kernel", "_select_activate_backward_masked_kernel",
                    "_scatter_activated_masked_kernel")


def moc_profile(name: str = "bench_train_ffn_1b_profile_fc2fix_h100.json", kernels: Sequence[str] = MOC_KERNELS) -> str:
    """Where MoC's llama-1b step goes against SwiGLU's (one profiled step each): GPU ms per step by kernel category,
    then MoC's own kernels."""
    runs = {r["variant"]: r["profile"] for r in load(name)["runs"]}
    swiglu, moc = runs["swiglu"], runs["moc"]
    cats = list(dict.fromkeys([*swiglu["categories_ms"], *moc["categories_ms"]]))
    rows = [(c, f1(swiglu["categories_ms"].get(c, 0.0)), f1(moc["categories_ms"].get(c, 0.0)),
             f"{moc['categories_ms'].get(c, 0.0) - swiglu['categories_ms'].get(c, 0.0):+.1f}") for c in cats]
    rows.append(("all GPU kernels", f1(swiglu["kernel_ms_per_step"]), f1(moc["kernel_ms_per_step"]),
                 f"{moc['kernel_ms_per_step'] - swiglu['kernel_ms_per_step']:+.1f}"))
    for kernel_name in kernels:
        kernel = moc["kernels"][kernel_name]
        each = f2(kernel["ms"] / kernel["calls"])
        rows.append((f"of which `{kernel_name}` ({kernel['calls']} calls, {each} ms each)", "–", f1(kernel["ms"]), ""))
    return table(["GPU ms per step (llama-1b, mbs 8, 2 micro-batches)", "SwiGLU", "MoC", "MoC - SwiGLU"], rows)


# The runs after the selection was kept as a bit mask (2026-12-07, evening): (model, run, variant, kept as, search,
# masked kernels). "whole rows": the first masked kernels; "chunks": the row walked in chunks (the current ones).
FFN_MASK_ROWS = (
    *(("llama-1b", "bench_train_ffn_1b_bisect4_h100.json", kind + suffix, "mask", search, "chunks")
      for kind in ("moc", "topk") for suffix, search in (("", "bisect"), ("_bisect4", "bisect4"))),
    *(("llama-1b", "bench_train_ffn_1b_mask_chunks_h100.json", kind + suffix, kept, "bisect", kernels)
      for kind in ("moc", "topk")
      for suffix, kept, kernels in (("", "mask", "chunks"), ("_indices", "indices", "–"))),
    *((model, run, kind + suffix, "mask", search, "whole rows")
      for model, run in (("llama-1b", "bench_train_ffn_1b_radix_h100.json"),
                         ("llama-350m", "bench_train_ffn_350m_radix_rounds_h100.json"))
      for kind in ("moc", "topk") for suffix, search in (("", "bisect"), ("_radix", "radix"))),
)


def ffn_train_mask() -> str:
    """MoC and top-k against SwiGLU with the selection kept as a bit mask or as indices, and with each threshold
    search (one process per variant; a run with rounds: the median of the rounds' ratios and their range)."""
    import statistics

    rows = []
    for model, name, variant, kept, search, kernels in FFN_MASK_ROWS:
        per_round = ffn_after_fix_ratios(name, variant, ("swiglu",))
        speeds = [t / b for t, b, _, _ in per_round]
        speed = statistics.median(speeds)
        peak, base_peak = max(p for _, _, p, _ in per_round), max(bp for _, _, _, bp in per_round)
        goal = 0.95 if variant.startswith("moc") else 0.97
        short = [what for what, ok in (("speed", speed >= goal), ("memory", peak / base_peak <= 0.80)) if not ok]
        shown = bold(f3(speed)) + (f" ({f3(min(speeds))}-{f3(max(speeds))}, {len(speeds)} rounds)"
                                   if len(speeds) > 1 else "")
        rows.append((model, f"`{name}`", "MoC (K = 0.1875 f)" if variant.startswith("moc") else "top-k ReLU (10%)",
                     kept, search, kernels, n0(statistics.median(t for t, _, _, _ in per_round)),
                     n0(statistics.median(b for _, b, _, _ in per_round)), shown, f2(peak), f2(base_peak),
                     f3(peak / base_peak),
                     f"≥ {goal:.2f} at ≤ 0.80: {'not met (' + ', '.join(short) + ')' if short else 'met'}"))
    return table(["model", "run (docs/results)", "FFN", "selection kept as", "search", "masked kernels", "tokens/s",
                  "SwiGLU tokens/s", "vs SwiGLU", "peak GiB", "SwiGLU peak GiB", "vs SwiGLU", "goal"], rows)


def masked_backward_sweep() -> str:
    """The backward side of one MoC / top-k layer (fc1-output gradient + fc2 input rebuilt), indices against the
    bit mask walked as whole rows (the first kernels) and in chunks (now), 16k rows."""
    rows = []
    for r in load("bench_topk_select_mask_chunks_h100.json")["backward"]:
        whole = f"(1, {1 << (r['width'] - 1).bit_length()}, 16)"
        default = str(tuple(r["default_config"]))
        same = all(r["same_output_as_index"].values())
        rows.append(("MoC (SwiGLU)" if r["act"] == "swiglu" else "top-k (ReLU)", f"{r['rows']:,} x {r['width']:,}",
                     f"{r['k']:,}", f3(r["index_ms"]), f3(r["mask_ms"][whole]),
                     f"{default} {f3(r['mask_ms'][default])}",
                     f"{r['best_mask_config']} {f3(r['mask_ms'][r['best_mask_config']])}",
                     bold(f2(r["index_ms"] / r["mask_ms"][default])), "yes" if same else bold("no")))
    return table(["layer", "rows x width", "K", "indices ms", "mask, whole rows ms", "mask, chunks (run's default) ms",
                  "mask, fastest chunks ms", "indices / run's default", "outputs equal to indices"], rows)


def radix_sweep() -> str:
    """The fused top-K select + activate kernel with each threshold search: the default configuration and the
    fastest of each search over the sweep's launch configurations (16k rows)."""
    rows = []
    for r in load("bench_topk_select_mask_h100.json")["fused"]:
        ms = r["fused_ms"]
        bisect = {c: t for c, t in ms.items() if "/" not in c}  # the plain bisection (other searches: "name/cfg")
        radix = {c: t for c, t in ms.items() if c.startswith("radix/")}
        best_b, best_r = min(bisect, key=bisect.get), min(radix, key=radix.get)
        default = str(tuple(r["default_config"]))
        rows.append(("MoC (SwiGLU)" if r["act"] == "swiglu" else "top-k (ReLU)", f"{r['rows']:,} x {r['width']:,}",
                     f"{r['k']:,}", f3(r["torch_topk_plus_select_activate_ms"]),
                     f"{default} {f3(ms[default])}" if default in ms else "–", f"{best_b} {f3(bisect[best_b])}",
                     f"{best_r[len('radix/'):]} {f3(radix[best_r])}", bold(f2(radix[best_r] / bisect[best_b])),
                     "yes" if all(r["same_output_as_default"].values()) else bold("no")))
    return table(["layer", "rows x width", "K", "torch.topk + select_activate ms", "bisection, default ms",
                  "bisection, fastest ms", "radix, fastest ms", "radix / bisection (fastest)",
                  "outputs equal to the default"], rows)


def ffn_parity_after() -> str:
    """The 125M loss ratios of the sparse FFNs after the kernel changes (issue 23 item 5)."""
    before = load("loss_parity_125m_h100.json")
    rows = []
    for key, label, _ in PARITY_125M:
        if key == "epas":
            continue
        r = _parity("loss_parity_125m_ffn_h100.json", key)
        ratio = r["ratio_vs_baseline"]
        base = {"dense": "dense", "relu2": "ReLU²"}[r["baseline"]] if key != "dense" else "—"
        verdict = "" if key in ("dense", "relu2") else "≤ 1.01: " + ("met" if ratio <= 1.01 else bold("not met"))
        rows.append((label, base, f3(r["final_loss"]), bold(f4(ratio)) if key != "dense" else f4(ratio),
                     f4(before[key]["ratio_vs_baseline"]), n0(r["median_tokens_per_s"]), verdict))
    return table(["variant", "baseline", "final loss", "vs baseline", "vs baseline, 2026-11-22", "tokens/s (median)",
                  "goal"], rows)


DECODE_KINDS = (("moc", "MoC (SwiGLU)"), ("topk", "top-k ReLU (ReLU)"), ("elas", "ELAS (ReLU² at 1.5 f)"))


def decode_ffn() -> str:
    results = load("bench_decode_ffn_h100.json")["results"]

    def ratio(kind, batch, region):
        (r,) = [r for r in results if r["ffn_kind"] == kind and r["batch"] == batch and r["region"] == region]
        return f3(r["decode_graphs_vs_dense"])

    points = [(b, g) for b in (1, 8, 32) for g in (0, 8)]
    header = ["kind (dense model)"] + [f"batch {b}, region {g}" if b == 1 else f"batch {b}, r{g}" for b, g in points]
    return table(header, [(label,) + tuple(ratio(kind, b, g) for b, g in points) for kind, label in DECODE_KINDS])


def plan_validation(name: str = "plan_validation_h100.json") -> str:
    rows = [(r["choice"], n0(r["predicted_tokens_per_s"]), n0(r["measured_tokens_per_s"]), f3(r["tokens_per_s_ratio"]),
             f2(r["predicted_peak_mem_gib"]), f2(r["measured_peak_mem_gib"]), f3(r["peak_mem_ratio"]))
            for r in load(name)["rows"]]
    return table(["choice", "predicted tokens/s", "measured tokens/s", "ratio", "predicted peak GiB",
                  "measured peak GiB", "ratio"], rows)


def plan_ffn_memory() -> str:
    rows = [(f"`{r['run']}`", r["model"], r["variant"], f2(r["predicted_peak_gib"]), f2(r["measured_peak_gib"]),
             f3(r["ratio"]), f2(r["held_before_fix_gib"]), f3(r["ratio_without_held"]))
            for r in load("ffn_memory_accounting.json")["planner"]]
    return table(["run (docs/results)", "model", "variant", "predicted peak GiB", "measured peak GiB", "ratio",
                  "fc2 inputs held before the fix, GiB", "ratio to measured without them"], rows)


PLAN_VALIDATION_P4 = "plan_validation_p4_h200.json"


def plan_validation_p4(path: Path | None = None) -> str:
    """The planner against the p=4 pipeline runs (`tools/bench_plan.py --predict-pipeline`): one row per measured
    (run, schedule), rows the planner cannot express said so, then the calibrations, skipped runs and the misses."""
    path = RESULTS / PLAN_VALIDATION_P4 if path is None else Path(path)
    if not path.exists():
        return (f"*Not yet predicted: {path.name} does not exist in docs/results. Write it with `python "
                "tools/bench_plan.py --predict-pipeline docs/results/pipeline_p4_*.json --device-prefix h200 --json "
                f"docs/results/{PLAN_VALIDATION_P4}` once configs/calibrations/h200-llama-1b.json and "
                "h200-llama-7b.json exist (`effdist calibrate` on one H200).*")
    data = json.loads(path.read_text())
    rows = []
    for r in data["rows"]:
        run = f"{r['model']} mb{r['micro_batch']}"
        schedule = SCHEDULE_NAMES.get(r["schedule"], r["schedule"])
        if r["engine"] != "effdist":
            schedule += f" ({r['engine']})"
        if not r["predicted"]:
            rows.append((run, schedule, f"not predicted: {r['not_predicted']}", "", "", "", "", "", ""))
            continue
        bubble = "–" if r["measured_bubble"] is None else pct(r["measured_bubble"])
        rows.append((run, schedule, n0(r["predicted_tokens_per_s"]), n0(r["measured_tokens_per_s"]),
                     f3(r["tokens_per_s_ratio"]), f2(r["predicted_peak_mem_gib"]), f2(r["measured_peak_mem_gib"]),
                     f3(r["peak_mem_ratio"]), f"{pct(r['predicted_bubble'])} / {bubble}"))
    text = table(["run (p=4)", "schedule", "predicted tokens/s", "measured tokens/s", "ratio",
                  "predicted peak GiB (largest rank)", "measured peak GiB", "ratio", "bubble predicted / measured"],
                 rows)
    notes = ["Calibrations: " + "; ".join(f"{c['path']} ({c['device']}, {c['date'] or 'undated'})"
                                          for c in data["calibrations"]) + "."]
    notes += [f"Skipped {s['file']}: {s['reason']}." for s in data["skipped"]]
    done = [r for r in data["rows"] if r["predicted"]]
    if done:
        goal = data["goal"]
        for key, within, what in (("tokens_per_s_ratio", goal["tokens_per_s_within"], "tokens/s"),
                                  ("peak_mem_ratio", goal["peak_mem_within"], "peak memory")):
            worst = max(done, key=lambda r: abs(r[key] - 1))
            ok = sum(abs(r[key] - 1) <= within for r in done)
            notes.append(f"{what}: {ok} of {len(done)} within {within:.0%}; largest miss {worst['model']} "
                         f"mb{worst['micro_batch']} {SCHEDULE_NAMES.get(worst['schedule'], worst['schedule'])} "
                         f"({f3(worst[key])}).")
    return text + "\n\n" + "\n".join(notes)


def plan_timings() -> str:
    """Every measured pp=1 and p=4 row predicted with calibrations timed differently (`tools/bench_plan.py
    --compare-timings`): predicted / measured tokens/s per table."""
    data = load("plan_timing_h100.json")
    names = list(data["calibrations"])
    rows = [(r["run"], SCHEDULE_NAMES.get(r["choice"], r["choice"]), n0(r["measured_tokens_per_s"]),
             *("–" if r["ratios"][n] is None else f3(r["ratios"][n]) for n in names)) for r in data["rows"]]
    heads = [f"{n} ({data['calibrations'][n]['timing']} timing, {data['calibrations'][n]['date']})" for n in names]
    return table(["run", "choice / schedule", "measured tokens/s", *heads], rows)


TABLES: dict[str, Callable[[], str]] = {
    "bench-plan-timings": plan_timings,
    "bench-dense-baseline": dense_baseline, "bench-dense-levers": dense_levers, "bench-dense-presets": dense_presets,
    "bench-kernels": kernels, "bench-rope-ab": rope_ab, "bench-epas-h100": epas_h100, "bench-epas-history": epas_history,
    "bench-epas-mbs4": epas_mbs4, "bench-epas-h200": epas_h200, "bench-parity-125m": parity_125m,
    "bench-parity-transitions": transitions, "bench-parity-clipping": clipping, "bench-parity-350m": parity_350m,
    "bench-parity-regions": regions, "bench-parity-long": long_runs, "bench-epas-quality": epas_quality,
    "bench-epas-quality-regions": epas_quality_regions, "bench-ffn-block": ffn_block,
    "bench-ffn-train": ffn_train, "bench-pipeline-p4-7b": pipeline_p4("pipeline_p4_7b_mb1_h200x4.json"),
    "bench-pipeline-p4-1b-mb4": pipeline_p4("pipeline_p4_1b_mb4_h200x4.json"),
    "bench-pipeline-p4-1b-mb1": pipeline_p4("pipeline_p4_1b_mb1_h200x4.json"), "bench-checkpoint": checkpoint,
    "bench-decode": decode, "bench-deepspeed-1gpu": deepspeed_1gpu, "bench-deepspeed-2gpu": deepspeed_2gpu,
    "bench-fp8": fp8, "bench-plan-validation": plan_validation, "bench-plan-ffn-memory": plan_ffn_memory,
    "bench-plan-validation-first": lambda: plan_validation("plan_validation_h100_2026-12-05.json"),
    "bench-ffn-train-fused-select": ffn_train_fused_select, "bench-ffn-train-select": ffn_train_select,
    "bench-ffn-train-after-fix": ffn_train_after_fix, "bench-decode-ffn": decode_ffn,
}

# Tables whose section of docs/benchmarks.md is not written yet: registered once the doc holds their markers
# (until then the registry and the doc's markers stay equal, tests/test_render_docs.py).
PENDING_TABLES: dict[str, Callable[[], str]] = {"bench-plan-validation-p4": plan_validation_p4}
# The same comparison with the H100 calibration (no H200 one yet): the wrong card, kept for what it shows.
TABLES["bench-plan-validation-p4-h100cal"] = lambda: plan_validation_p4(RESULTS / "plan_validation_p4_h100cal.json")


# ---------------------------------------------------------------------------------------------- docs/sparse_ffn.md

SPARSE_FFN_DOC = "docs/sparse_ffn.md"
FFN_BLOCK_ROWS = (("swiglu", "swiglu"), ("moc", "moc (K = 0.1875 f)"), ("moc-2:8", "moc-2:8"),
                  ("topk-relu", "topk-relu (10%, non-gated, width f)"), ("relu2", "relu2 (width 1.5 f)"),
                  ("elas", "elas (identity STE)"), ("elas-masked", "elas-masked"),
                  ("elas-cslt", "elas-cslt (cuSPARSELt forced)"), ("elas-masked-cslt", "elas-masked-cslt"),
                  ("relu2-lowrank", "relu2-lowrank (r = h/4)"), ("elas-lowrank", "elas-lowrank"))
FFN_BLOCK_POINTS = (("llama-350m", 16384, "350m 16k"), ("llama-350m", 65536, "350m 64k"),
                    ("llama-1b", 16384, "1b 16k"), ("llama-1b", 65536, "1b 64k"))


def ffn_block_all_shapes() -> str:
    """Every variant at every shape of one bench_ffn run: ms (time vs its baseline), saved bytes vs baseline."""
    results = load("bench_ffn_h100.json")["results"]

    def find(variant, shape, tokens):
        (r,) = [r for r in results if (r["variant"], r["shape"], r["tokens"]) == (variant, shape, tokens)]
        return r

    rows = []
    for variant, label in FFN_BLOCK_ROWS:
        points = [find(variant, shape, tokens) for shape, tokens, _ in FFN_BLOCK_POINTS]
        baseline = points[0].get("baseline")
        cells = [f2(r["ms"]) + (f" ({r['time_vs_baseline']:.2f})" if baseline else "") for r in points]
        rows.append((label, baseline or "—", *cells, f3(points[0]["bytes_vs_baseline"]) if baseline else "—"))
    return table(["variant", "baseline", *(name for _, _, name in FFN_BLOCK_POINTS), "saved vs baseline"], rows)


FFN_ACCOUNTING_LABELS = {"moc": "MoC (K = 0.1875 f)", "topk": "top-k ReLU (10%)", "elas": "ELAS (identity STE)",
                         "relu2": "ReLU² (width 1.5 f)"}


def ffn_memory_accounting() -> str:
    """Each sparse FFN's training peak against SwiGLU's, split into parameters and activations per token and
    layer, against the saved-tensor accounting (tools/ffn_memory_accounting.py)."""
    rows = []
    for r in load("ffn_memory_accounting.json")["rows"]:
        rows.append((r["model"], f"`{r['run']}`", FFN_ACCOUNTING_LABELS.get(r["ffn_kind"], r["ffn_kind"]),
                     f2(r["peak_gib"]), f3(r["peak_ratio"]), n0(r["activation_bytes_per_token_layer_vs_swiglu"]),
                     n0(r["accounted_bytes_per_token_layer_vs_swiglu"]), n0(r["gap_bytes_per_token_layer"]),
                     n0(r["dense_fc2_input_bytes_per_token"]), f3(r["peak_ratio_without_gap"])))
    return table(["model", "run (docs/results)", "FFN", "peak GiB", "vs SwiGLU", "activations vs SwiGLU, B/token/layer",
                  "accounting says", "gap", "fc2 dense input, B/token", "vs SwiGLU without the gap"], rows)


SPARSE_FFN_TABLES: dict[str, Callable[[], str]] = {
    "sparse-ffn-block": ffn_block_all_shapes, "sparse-ffn-train": ffn_train_fused_select,
    "sparse-ffn-train-select": ffn_train_select, "sparse-ffn-train-after-fix": ffn_train_after_fix,
    "sparse-ffn-moc-profile": moc_profile, "sparse-ffn-decode": decode_ffn,
    "sparse-ffn-memory-accounting": ffn_memory_accounting, "sparse-ffn-train-mask": ffn_train_mask,
    "sparse-ffn-masked-backward": masked_backward_sweep, "sparse-ffn-radix": radix_sweep,
    "sparse-ffn-moc-profile-mask": lambda: moc_profile("bench_train_ffn_1b_profile_mask_h100.json", MOC_MASK_KERNELS),
    "sparse-ffn-parity-after": ffn_parity_after,
}


# ---------------------------------------------------------------------------------------------- docs/fp8.md

FP8_DOC = "docs/fp8.md"
FP8_TABLES: dict[str, Callable[[], str]] = {
    "fp8-speed": fp8, "fp8-profile-speed": fp8_profile_speed, "fp8-profile": fp8_profile_categories,
    "fp8-quality": fp8_quality, "fp8-torchtitan": fp8_torchtitan,
}


def register(generated) -> None:
    """Add every table to tools/render_docs.py's registry (`generated` is its decorator)."""
    for name, render in TABLES.items():
        generated(DOC, name)(render)
    doc = (ROOT / DOC).read_text()
    for name, render in PENDING_TABLES.items():
        if f"<!-- generated:{name} -->" in doc:
            generated(DOC, name)(render)
    for name, render in SPARSE_FFN_TABLES.items():
        generated(SPARSE_FFN_DOC, name)(render)
    for name, render in FP8_TABLES.items():
        generated(FP8_DOC, name)(render)
