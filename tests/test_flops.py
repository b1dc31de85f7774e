"""Executed vs dense training FLOPs per token (effdist.train.flops), by hand, and the console line that shows them."""

from __future__ import annotations

import io

import pytest

from effdist.config import load_config
from effdist.train.flops import flops_per_token
from effdist.train.metrics import ProgressBar, model_flops_per_token, peak_bf16_tflops, peak_fp8_tflops

LLAMA_1B = ["model.num_layers=16", "model.hidden_size=2048", "model.num_attention_heads=32",
            "model.num_query_groups=32", "model.ffn_hidden_size=5632", "model.vocab_size=32000",
            "data.seq_length=2048", "model.max_position_embeddings=2048"]
# L=2, h=8, 2 heads, 1 KV group (kv width 4), ffn 16, vocab 10, seq 4: the shape of test_metrics' hand count.
SMALL = ["model.num_layers=2", "model.hidden_size=8", "model.num_attention_heads=2", "model.num_query_groups=1",
         "model.ffn_hidden_size=16", "model.vocab_size=10", "data.seq_length=4", "model.max_position_embeddings=4",
         "train.micro_batch=1", "train.global_batch=1"]


def _cfg(*overrides):
    return load_config(None, list(overrides))


def test_dense_count_is_model_flops_per_token():
    f = flops_per_token(_cfg(*LLAMA_1B))
    assert f.dense == f.executed == model_flops_per_token(16, 2048, 5632, 32, 32, 32000, 2048)
    assert f.executed_fraction == 1.0


def test_epas_three_quarters_of_the_1b_model_by_hand():
    # Per layer (MHA, h=2048, ffn 5632): Q,K,V,O 4h² + SwiGLU 3·h·5632; per token x6, + 6·h·S attention.
    h, f, s, v, layers = 2048, 5632, 2048, 32000, 16
    per_layer = 6 * (4 * h * h + 3 * h * f) + 6 * h * s
    dense = layers * per_layer + 6 * h * v
    executed = dense - 12 * 6 * (2 * h * h)  # 12 sharing layers skip Q and K: 2h² multiply-adds each
    count = flops_per_token(_cfg(*LLAMA_1B, "epas.enabled=true"), sharing_layers=12)
    assert (count.dense, count.executed) == (dense, executed)
    # The ×1.118 the dense count overstated EPAS at 3L/4 by (issue 24).
    assert count.dense / count.executed == pytest.approx(1.1179, abs=1e-4)


def test_gqa_sharing_layer_skips_q_and_the_narrow_k():
    base = flops_per_token(_cfg(*SMALL))
    shared = flops_per_token(_cfg(*SMALL), sharing_layers=1)
    assert base.dense - shared.executed == 6 * (8 * 8 + 8 * 4)  # Wq h×h, Wk h×kv_width
    assert shared.dense == base.dense


def test_elas_low_rank_counts_the_two_factors():
    # width = 1.5 x 16 = 24, rank 4: fc1 8->4->24, fc2 24->4->8 = 2·4·(8+24) = 256 instead of 2·8·24 = 384.
    full = flops_per_token(_cfg(*SMALL, "ffn.kind=elas"))
    low = flops_per_token(_cfg(*SMALL, "ffn.kind=elas", "ffn.elas_rank=4"))
    assert full.executed == full.dense == low.dense
    assert low.dense - low.executed == 2 * 6 * (384 - 256)


def test_elas_cusparselt_halves_only_the_fc2_forward():
    full = flops_per_token(_cfg(*SMALL, "ffn.kind=elas"), sparse_fc2_layers=1)
    # fc2 (24 -> 8) forward: 2·192 FLOPs, half of them skipped.
    assert full.dense - full.executed == 192
    low = flops_per_token(_cfg(*SMALL, "ffn.kind=elas", "ffn.elas_rank=4"), sparse_fc2_layers=2)
    # low-rank fc2's first factor (24 -> 4) takes the 2:4 operand: 2·96 forward FLOPs, half skipped, x2 layers.
    assert low.dense - low.executed == 2 * 6 * (384 - 256) + 2 * 96
    with pytest.raises(ValueError, match="sparse_fc2_layers=3"):
        flops_per_token(_cfg(*SMALL, "ffn.kind=elas"), sparse_fc2_layers=3)


@pytest.mark.parametrize("kind", ["moc", "topk", "relu2"])
def test_channel_selecting_ffns_execute_their_dense_gemms(kind):
    f = flops_per_token(_cfg(*SMALL, f"ffn.kind={kind}"))
    assert f.executed == f.dense


def test_ffn_on_some_layers_counts_each_layer_with_its_own_width():
    # Layer 1 ELAS (width 24, not gated: 2·8·24), layer 0 SwiGLU (3·8·16).
    f = flops_per_token(_cfg(*SMALL, "ffn.kind=elas", "ffn.layers=[1]"))
    attention = 2 * 64 + 2 * 8 * 4
    assert f.dense == 6 * (2 * attention + 384 + 384 + 80) + 2 * 6 * 8 * 4


def test_sharing_layers_out_of_range():
    with pytest.raises(ValueError, match="sharing_layers=2"):
        flops_per_token(_cfg(*SMALL), sharing_layers=2)


@pytest.mark.parametrize("name, bf16, fp8", [("NVIDIA H100 80GB HBM3", 989.0, 1979.0), ("NVIDIA H200", 989.0, 1979.0),
                                             ("NVIDIA A100-SXM4-80GB", 312.0, None)])
def test_datasheet_peaks(name, bf16, fp8):
    assert (peak_bf16_tflops(name), peak_fp8_tflops(name)) == (bf16, fp8)


def test_console_line_shows_executed_flops_and_dense_equivalent_tokens():
    out = io.StringIO()
    bar = ProgressBar(total_steps=1, stream=out)
    bar.update(1, {"loss": 2.0, "tokens_per_s": 1000.0, "tokens_per_s_dense_equiv": 894.6, "tflops": 2.0, "mfu": 0.5,
                   "tflops_executed": 1.789, "mfu_executed": 0.4473})
    line = out.getvalue()
    assert "1.79 TFLOP/s" in line and "MFU 44.7%" in line and "(dense-equiv 895)" in line
    assert "2 TFLOP/s" not in line and "MFU 50.0%" not in line
