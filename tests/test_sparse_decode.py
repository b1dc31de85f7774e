"""Sparse-FFN generation (effdist.infer.ffn): MoC, top-k, ReLU² and ELAS models.

* the inference forward's dense FFN math equals megatron GPTModel's eval logits for every sparse
  kind (MoC top-K and 2:8, top-k ReLU and ReLU², ELAS full and low rank, ELAS before and after its
  warm-up), at region 0 and with EPAS sharing;
* a sparse decode step reads only the weight rows of the channels a token keeps (the others can be
  NaN) and computes the dense math's output;
* greedy generation with sparse decode gives the same tokens as dense-math decode and as
  recomputing the whole sequence, with EPAS regions and a left-padded batch (CPU: the torch
  references of the gather-GEMV kernels);
* end to end: `effdist train` of a tiny MoC model, then `effdist generate` on its checkpoint;
* tools/bench_decode.py --ffn-kinds on a tiny shape.
"""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import torch

# First: importing it chooses Triton's CPU interpreter (on machines without CUDA) before triton is imported.
from tests.kernel_testing import needs_interpreter  # isort: skip

from effdist.infer.cache import SharingPlan
from effdist.infer.ffn import GatedFFN, PlainFFN, dense_counterpart
from effdist.infer.generate import Generator, main
from effdist.infer.model import InferenceModel, ModelShape
from tests.launching import ROOT, run_train

SHAPE = ModelShape(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=200,
                   padded_vocab_size=256, max_positions=64)
WIDTH = 96
PROMPTS = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [150]]

# (name, ffn kind, random_ffn options)
KINDS = [
    ("moc", "moc", {"k": 18}),
    ("moc-2:8", "moc", {"moc_structured": True}),
    ("topk-relu", "topk", {"k": 10}),
    ("topk-relu2", "topk", {"k": 10, "topk_activation": "relu2"}),
    ("relu2", "relu2", {}),
    ("elas", "elas", {}),
    ("elas-lowrank", "elas", {"rank": 16}),
]


def random_model(kind: str, options: dict, seed: int = 0) -> InferenceModel:
    # Weights larger than training's init, so that logits are far apart and greedy choices are
    # decided by the model, not by rounding.
    model = InferenceModel.random(SHAPE, WIDTH, seed=seed, std=0.25, ffn_kind=kind, ffn_options=options)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in model.layers:
        layer.input_norm.uniform_(0.5, 1.5, generator=gen)
        layer.mlp_norm.uniform_(0.5, 1.5, generator=gen)
        # These tests are about the sparse path: keep it for every batch here (the byte rule that
        # decodes large batches densely has its own test).
        layer.ffn.sparse_max_batch = 64
    return model


# ---------------------------------------------------------------------------------------- dense math = training

# (ffn overrides, region, ELAS checkpoint step, the step whose on_train_step the trained model last saw)
MEGATRON_CASES = [
    ({"kind": "moc", "moc_k": 0.25}, 0, None, None),
    ({"kind": "moc", "moc_structured": True}, 2, None, None),
    ({"kind": "topk", "topk_k": 0.2}, 2, None, None),
    ({"kind": "topk", "topk_k": 0.2, "topk_activation": "relu2"}, 0, None, None),
    ({"kind": "elas", "elas_rank": 16}, 3, None, None),
    ({"kind": "elas", "elas_warmup_steps": 5}, 0, 5, 4),  # still dense: its last step was step 4
    ({"kind": "elas", "elas_warmup_steps": 5}, 2, 6, 5),  # sparse from step 5 on
    ({"kind": "elas", "layers": [1, 3]}, 2, None, None),  # ELAS on some layers, SwiGLU on the others
]


@pytest.mark.parametrize("ffn,region,step,last_step", MEGATRON_CASES)
def test_dense_math_equals_megatron_gptmodel(ffn, region, step, last_step):
    from effdist.config import Config
    from effdist.epas import set_region
    from effdist.model.ffn.elas import ElasMLP
    from effdist.model.gpt import build_gpt
    from effdist.runtime.distributed import one_process_megatron

    cfg = Config()
    cfg.epas.enabled, cfg.epas.final_region = True, 3
    cfg.model.init_std = 0.1
    for key, value in ffn.items():
        setattr(cfg.ffn, key, value)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with one_process_megatron():
        torch.manual_seed(0)
        gpt = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32,
                        torch.device("cpu")).eval()
        with torch.no_grad():
            for name, p in gpt.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        elas = [m for m in gpt.modules() if isinstance(m, ElasMLP)]
        if last_step is not None:
            for m in elas:
                m.on_train_step(last_step)
        model = InferenceModel.from_state_dict(gpt.state_dict(), cfg, step=step)
        positions = torch.arange(24).expand(2, 24)
        with torch.no_grad():
            set_region([gpt], region)
            expected = gpt(tokens, positions, None)
            if elas:  # the other side of the warm-up: the comparison below could fail
                for m in elas:
                    m.sparsity_active = not m.sparsity_active
                other = gpt(tokens, positions, None)
    kinds = [layer.ffn.kind for layer in model.layers]
    assert kinds == [ffn["kind"] if i in ffn.get("layers", range(4)) else "swiglu" for i in range(4)]
    got = model(tokens, SharingPlan.for_region(4, region))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if elas:
        assert (got - other).abs().max() > 1e-3
    # And a decode step's sparse math on those trained weights equals the dense math.
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    for layer in model.layers:
        torch.testing.assert_close(layer.ffn.decode(x), layer.ffn.dense(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- sparse reads

def _inactive_rows_poisoned(ffn, x: torch.Tensor) -> None:
    """NaN into every weight row of a channel that no token of x keeps (what sparse decode must not read)."""
    if isinstance(ffn, GatedFFN):
        w = ffn.width
        h = torch.nn.functional.linear(x, ffn.fc1)
        idx = ffn._select(h[:, :w]).long()
        used = torch.zeros(w, dtype=torch.bool).scatter_(0, idx.flatten(), True)
        ffn.fc1[w:][~used] = float("nan")  # up rows
        ffn.fc2[~used] = float("nan")  # fc2 stored [F, h]
    else:
        used = (ffn._activation(ffn._up(x)) != 0).any(dim=0)
        ffn.fc2_in[~used] = float("nan")


@pytest.mark.parametrize("name,kind,options", KINDS, ids=[k[0] for k in KINDS])
def test_decode_reads_only_the_active_channels(name, kind, options):
    ffn = random_model(kind, options).layers[1].ffn
    assert ffn.sparse
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    want = ffn.dense(x)
    _inactive_rows_poisoned(ffn, x)
    assert torch.isnan(ffn.dense(x)).any()  # the dense math reads every row: the poisoning shows
    got = ffn.decode(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fewer_rows_are_active_than_the_width():
    """What makes decode cheaper: the channels a token keeps (top-k: k; MoC: K; ELAS: at most half)."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    for name, kind, options in KINDS:
        ffn = random_model(kind, options).layers[0].ffn
        if isinstance(ffn, GatedFFN):
            assert ffn.k == (WIDTH // 4 if options.get("moc_structured") else 18)
            continue
        active = (ffn._activation(ffn._up(x)) != 0).sum(dim=1)
        bound = {"topk": 10, "elas": WIDTH // 2, "relu2": WIDTH}[kind]
        assert int(active.max()) <= bound and int(active.min()) > 0, name


def test_dense_counterpart_has_the_same_weights():
    moc = random_model("moc", {"k": 18}).layers[0].ffn
    dense = dense_counterpart(moc)
    assert isinstance(dense, GatedFFN) and dense.kind == "swiglu" and not dense.sparse
    assert torch.equal(dense.fc1, moc.fc1) and torch.equal(dense.fc2, moc.fc2.t())
    topk = random_model("topk", {"k": 10}).layers[0].ffn
    plain = dense_counterpart(topk)
    x = torch.randn(2, 64)
    h = torch.nn.functional.linear(x, topk.fc1)
    torch.testing.assert_close(plain.decode(x), torch.nn.functional.linear(torch.relu(h), topk.fc2_in.t()))
    elas = random_model("elas", {"rank": 16}).layers[0].ffn
    assert isinstance(dense_counterpart(elas), PlainFFN) and dense_counterpart(elas).low_rank


# ---------------------------------------------------------------------------------------- greedy generation

@pytest.mark.parametrize("name,kind,options", KINDS, ids=[k[0] for k in KINDS])
def test_sparse_decode_greedy_equals_dense_math(name, kind, options):
    model = random_model(kind, options)
    gen = Generator(model, trained_region=3)
    for region in (0, 2):
        sparse = gen.generate(PROMPTS, max_new_tokens=12, epas_region=region)
        model.sparse_decode = False
        dense = gen.generate(PROMPTS, max_new_tokens=12, epas_region=region)
        recomputed = gen.generate(PROMPTS, max_new_tokens=12, epas_region=region, use_cache=False)
        model.sparse_decode = True
        assert sparse.tokens == dense.tokens == recomputed.tokens, (name, region)
        assert [len(t) for t in sparse.tokens] == [12, 12, 12]
    if kind == "relu2":  # dense ReLU² is its own dense counterpart; only the reads differ (tested above)
        return
    # The FFN kind matters, so the comparison above could fail: the same weights run densely differ.
    for layer in model.layers:
        layer.ffn = dense_counterpart(layer.ffn)
    assert gen.generate(PROMPTS, max_new_tokens=12, epas_region=2).tokens != sparse.tokens


@needs_interpreter
@pytest.mark.parametrize("name,kind,options", [KINDS[0], KINDS[6]], ids=["moc", "elas-lowrank"])
def test_greedy_through_the_triton_kernels(name, kind, options, monkeypatch):
    """The decode path with the Triton gather-GEMV kernels (as on a GPU; here Triton's interpreter)."""
    import effdist.infer.ffn as ffn_module
    from effdist.kernels import gather_gemv

    model = random_model(kind, options)
    gen = Generator(model, trained_region=3)
    model.sparse_decode = False
    dense = gen.generate(PROMPTS, max_new_tokens=4, epas_region=2)
    model.sparse_decode = True
    calls = []

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(ffn_module, "gather_rows_combine", counted(gather_gemv.gather_rows_combine_triton))
    monkeypatch.setattr(ffn_module, "gather_rows_matvec", counted(gather_gemv.gather_rows_matvec_triton))
    assert gen.generate(PROMPTS, max_new_tokens=4, epas_region=2).tokens == dense.tokens
    assert calls.count("gather_rows_combine_triton") == 3 * 4  # 3 decode steps x 4 layers
    assert calls.count("gather_rows_matvec_triton") == (3 * 4 if kind == "moc" else 0)


def test_sparse_decode_step_logits_equal_dense_math():
    from effdist.infer.cache import KVCache

    model = random_model("moc", {"k": 18})
    plan = SharingPlan.for_region(4, 2)
    tokens = torch.randint(0, 200, (3, 10), generator=torch.Generator().manual_seed(5))
    out = {}
    for sparse in (True, False):
        model.sparse_decode = sparse
        cache = KVCache(plan, 3, 20, 2, 16, torch.float32, "cpu")
        with torch.inference_mode():
            first = model.prefill(tokens, plan, cache)
            cache.tokens.copy_(first[:, :200].argmax(-1))
            out[sparse] = model.decode_step(cache, plan)
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_generate_cli_on_a_trained_moc_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["train.steps=2", "ffn.kind=moc", "ffn.select_method=radix", "epas.enabled=true",
                        "epas.interval=1", "epas.final_region=2", "data.sample_documents=200", "data.seq_length=64",
                        "train.global_batch=4", "logging.tensorboard=false", "logging.progress_bar=false"],
              resume="none")
    outs = {}
    for flag in ([], ["--dense-ffn-decode"]):
        rc = main(["--checkpoint", str(run_dir), "--prompt", "The cat", "--prompt", "A", "--max-new-tokens", "8",
                   "--temperature", "0", "--ignore-eod", "--json", "--device", "cpu", *flag])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        outs[bool(flag)] = json.loads(captured.out)
    assert outs[False]["region"] == 2 and [len(t) for t in outs[False]["tokens"]] == [8, 8]
    assert outs[False]["tokens"] == outs[True]["tokens"]
    gen = Generator.from_checkpoint(run_dir, device="cpu")
    assert {(layer.ffn.kind, layer.ffn.select_method) for layer in gen.model.layers} == {("moc", "radix")}
    recomputed = gen.generate(["The cat", "A"], max_new_tokens=8, stop_at_eod=False, use_cache=False)
    assert recomputed.tokens == outs[False]["tokens"]


# ---------------------------------------------------------------------------------------- benchmark

def test_bench_decode_ffn_kinds_tiny(tmp_path, monkeypatch, capsys):
    out = tmp_path / "decode_ffn.json"
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--tiny", "--ffn-kinds", "swiglu,moc,topk,elas",
                                      "--batches", "1,2", "--contexts", "12", "--new-tokens", "3", "--regions", "0,2",
                                      "--json", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "tools" / "bench_decode.py"), run_name="__main__")
    assert done.value.code == 0
    assert "x dense" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["mode"] == "ffn_kinds" and result["ffn_kinds"] == ["swiglu", "moc", "topk", "elas"]
    rows = result["results"]
    assert {(r["ffn_kind"], r["batch"], r["region"]) for r in rows} == {
        (k, b, reg) for k in ("swiglu", "moc", "topk", "elas") for b in (1, 2) for reg in (0, 2)}
    for r in rows:
        assert r["decode_eager_tokens_per_s"] > 0 and r["dense_decode_eager_tokens_per_s"] > 0
        assert r["decode_eager_vs_dense"] == pytest.approx(
            r["decode_eager_tokens_per_s"] / r["dense_decode_eager_tokens_per_s"])
        assert r["sparse_decode"] == (r["ffn_kind"] != "swiglu")
        assert r["kernel"] == "torch-reference" and r["select_method"] == "bisect"  # on CPU; "triton" on a GPU
    moc = next(r for r in rows if r["ffn_kind"] == "moc")
    assert moc["dense_kind"] == "swiglu" and moc["active_channels"] == moc["k"] < moc["ffn_width"]


def test_batches_beyond_the_byte_rule_decode_densely():
    """Past width / (rows a token reads) tokens the gathers read more than the dense projections:
    decode then runs the dense math (it would read the poisoned rows: NaN shows it did)."""
    moc = random_model("moc", {"k": 18}).layers[1].ffn
    topk = random_model("topk", {"k": 10}).layers[1].ffn
    elas = random_model("elas", {}).layers[1].ffn
    for ffn in (moc, topk, elas):
        ffn.sparse_max_batch = None  # the byte rule
    assert moc.sparse_batch_limit() == WIDTH // 18
    assert topk.sparse_batch_limit() == WIDTH // 10
    assert elas.sparse_batch_limit() == 2
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    for ffn in (moc, elas):
        want = ffn.dense(x)
        _inactive_rows_poisoned(ffn, x)
        ffn.sparse_max_batch = 3
        assert torch.isfinite(ffn.decode(x)).all()
        ffn.sparse_max_batch = 2
        assert torch.isnan(ffn.decode(x)).any()
        assert not torch.isnan(want).any()
