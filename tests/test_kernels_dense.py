"""Dense-model kernels (RMSNorm, SwiGLU, RoPE, LM head + cross-entropy): each Triton kernel against its
torch reference, forward and backward, bf16 and fp32, odd sizes (on CPU through Triton's interpreter,
on the GPU when there is one); their integration into megatron's GPT (effdist.model.fused) against
the stock model, in one process and under TP=2 with and without sequence parallelism (gloo
processes); and the kernel benchmark's CPU smoke run.

This file is also the TP worker: ``torchrun --nproc_per_node=2 tests/test_kernels_dense.py --worker OUT``.
"""

from __future__ import annotations

import os

import torch  # (torch does not import triton)

HAVE_CUDA = torch.cuda.is_available()
if not HAVE_CUDA and __name__ != "__main__":
    # Triton reads this when a kernel is decorated; effdist's dense kernels are decorated on first use,
    # so this works even when megatron imported triton earlier in the process. (Run as a script, the
    # file decides itself: see the bottom.)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402

from effdist.kernels import cross_entropy as ce_mod  # noqa: E402
from effdist.kernels import rmsnorm as rmsnorm_mod  # noqa: E402
from effdist.kernels import rope as rope_mod  # noqa: E402
from effdist.kernels import swiglu as swiglu_mod  # noqa: E402
from effdist.kernels.cross_entropy import (  # noqa: E402
    cross_entropy_grad_,
    cross_entropy_grad_reference,
    cross_entropy_stats,
    cross_entropy_stats_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from effdist.kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402
from effdist.kernels.rope import apply_rope, rope_reference  # noqa: E402
from effdist.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if HAVE_CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
# Max error relative to the reference's largest magnitude. bf16: a couple of ulps (the interpreter
# truncates where the GPU rounds to nearest).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

if not HAVE_CUDA:
    for module in (rmsnorm_mod, swiglu_mod, ce_mod):
        module._kernels.cache_clear()
    rope_mod._kernel.cache_clear()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() or 1.0
    assert err <= TOL[dtype] * scale, f"{what} ({dtype}): max error {err:.3g}, reference max {scale:.3g}"


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(DEVICE)


# ---------------------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 37), (1, 1, 5), (4, 300)])
def test_rmsnorm_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype, seed=1).requires_grad_()
    w = (1 + randn(shape[-1], dtype=torch.float64, seed=2, scale=0.2)).to(dtype).requires_grad_()
    dy = randn(*shape, dtype=dtype, seed=3)
    y = rmsnorm(x, w, 1e-5, use_triton=True)
    y_ref = rmsnorm_reference(x, w, 1e-5)
    assert_close(y, y_ref, dtype, "rmsnorm forward")
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
    assert_close(dx, dx_ref, dtype, "rmsnorm dx")
    assert_close(dw, dw_ref, dtype, "rmsnorm dweight")


def test_rmsnorm_reads_strided_rows():
    base = randn(5, 3, 50, dtype=torch.float32, seed=4).requires_grad_()
    w = (1 + randn(37, dtype=torch.float32, seed=5, scale=0.2)).requires_grad_()
    x = base[..., 5:42]  # rows 50 elements apart
    dy = randn(5, 3, 37, dtype=torch.float32, seed=6)
    (g_base, g_w) = torch.autograd.grad(rmsnorm(x, w, 1e-6, use_triton=True), (base, w), dy)
    (r_base, r_w) = torch.autograd.grad(rmsnorm_reference(x, w, 1e-6), (base, w), dy)
    assert_close(g_base, r_base, torch.float32, "dx through a strided view")
    assert_close(g_w, r_w, torch.float32, "dweight")


def test_rmsnorm_module_is_todays_norm_unless_fused():
    from types import SimpleNamespace

    from effdist.model.norm import RMSNorm, rmsnorm_spec

    config = SimpleNamespace(params_dtype=torch.float32, use_cpu_initialization=True, sequence_parallel=True)
    plain, fused = RMSNorm(config, 37, eps=1e-6), RMSNorm(config, 37, eps=1e-6, fused=True)
    assert plain.weight.sequence_parallel and fused.weight.sequence_parallel
    x = randn(4, 37, dtype=torch.float32, seed=7).cpu()
    expected = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * plain.weight
    assert torch.equal(plain(x), expected)
    assert torch.equal(fused(x), expected)  # on CPU the fused module runs the reference
    assert rmsnorm_spec(False) is RMSNorm and rmsnorm_spec(True).params == {"fused": True}


# ---------------------------------------------------------------------------------------- SwiGLU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 2 * 37), (2, 2 * 1100), (1, 2)])
def test_swiglu_matches_reference(dtype, shape):
    x = randn(*shape, dtype=dtype, seed=8, scale=2.0).requires_grad_()
    dy = randn(*shape[:-1], shape[-1] // 2, dtype=dtype, seed=9)
    y, y_ref = swiglu(x, use_triton=True), swiglu_reference(x)
    assert_close(y, y_ref, dtype, "swiglu forward")
    (dx,), (dx_ref,) = torch.autograd.grad(y, (x,), dy), torch.autograd.grad(y_ref, (x,), dy)
    assert_close(dx, dx_ref, dtype, "swiglu dx")


def test_swiglu_reads_strided_rows_and_rejects_odd_widths():
    base = randn(6, 90, dtype=torch.float32, seed=10).requires_grad_()
    x = base[:, 3:77]
    dy = randn(6, 37, dtype=torch.float32, seed=11)
    (g,), (r,) = (torch.autograd.grad(swiglu(x, use_triton=True), (base,), dy),
                  torch.autograd.grad(swiglu_reference(x), (base,), dy))
    assert_close(g, r, torch.float32, "swiglu dx through a strided view")
    with pytest.raises(ValueError, match="must be even"):
        swiglu(torch.zeros(2, 5))


# ---------------------------------------------------------------------------------------- RoPE

def rope_freqs(seq: int, rot_dim: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    f = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    return torch.cat([f, f], dim=-1)[:, None, None, :].to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_reference_is_megatrons_unfused_rope(dtype, interleaved):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t = randn(9, 2, 3, 16, dtype=dtype, seed=12)
    for freqs in (rope_freqs(9, 16), rope_freqs(9, 8)):  # full and partial rotary dim
        assert torch.equal(rope_reference(t, freqs, interleaved),
                           _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq,batch,groups,per_group,head_dim", [(7, 3, 2, 2, 12), (2, 1, 70, 1, 128)])
def test_rope_matches_reference_on_megatrons_qkv_views(dtype, seq, batch, groups, per_group, head_dim):
    # Q and K as megatron's attention hands them over: views into the fused QKV GEMM output.
    mixed = randn(seq, batch, groups, (per_group + 2) * head_dim, dtype=dtype, seed=13).requires_grad_()
    q, k, _ = torch.split(mixed, [per_group * head_dim, head_dim, head_dim], dim=3)
    q = q.reshape(seq, batch, groups * per_group, head_dim)
    freqs = rope_freqs(seq, head_dim) + 0.3  # an offset, so the two halves' angles are not trivial
    dq = randn(*q.shape, dtype=dtype, seed=14)
    dk = randn(*k.shape, dtype=dtype, seed=15)
    outs = [apply_rope(q, freqs, use_triton=True), apply_rope(k, freqs, use_triton=True)]
    refs = [rope_reference(q, freqs), rope_reference(k, freqs)]
    for out, ref, name in zip(outs, refs, "qk"):
        assert out.is_contiguous()
        assert_close(out, ref, dtype, f"rope {name}")
    (g,), (r,) = (torch.autograd.grad(outs, (mixed,), (dq, dk)), torch.autograd.grad(refs, (mixed,), (dq, dk)))
    assert_close(g, r, dtype, "rope gradient into the QKV output")


def test_rope_tables_are_made_once_per_freqs_and_again_when_it_changes():
    # megatron hands every layer the same freqs tensor: its cos/sin tables are made once, and made again when
    # the tensor is another one or was written in place (a stale table would rotate by the old angles).
    t = randn(6, 2, 4, 16, dtype=torch.bfloat16, seed=20)
    freqs = rope_freqs(6, 16) + 0.3
    first = rope_mod._cos_sin(freqs, torch.bfloat16)
    assert all(a is b for a, b in zip(rope_mod._cos_sin(freqs, torch.bfloat16), first))
    assert torch.equal(first[0], torch.cos(freqs).reshape(6, 16).to(torch.bfloat16))
    assert rope_mod._cos_sin(freqs, torch.float32)[0].dtype == torch.float32
    assert_close(apply_rope(t, freqs, use_triton=True), rope_reference(t, freqs), torch.bfloat16, "rope")
    freqs.mul_(2.0)
    assert_close(apply_rope(t, freqs, use_triton=True), rope_reference(t, freqs), torch.bfloat16, "rope, freqs changed")
    other = rope_freqs(6, 16) + 0.7
    assert_close(apply_rope(t, other, use_triton=True), rope_reference(t, other), torch.bfloat16, "rope, other freqs")


def test_rope_layouts_the_kernel_does_not_cover_use_the_reference():
    t = randn(5, 2, 3, 16, dtype=torch.float32, seed=16)
    for freqs, interleaved in ((rope_freqs(5, 16), True), (rope_freqs(5, 8), False)):
        assert not rope_mod.triton_supports(t, freqs, interleaved)
        assert torch.equal(apply_rope(t, freqs, interleaved, use_triton=True), rope_reference(t, freqs, interleaved))


# ---------------------------------------------------------------------------------------- cross-entropy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [37, 4500])  # 4500: more than one block of the row loop
def test_cross_entropy_kernels_match_reference(dtype, vocab):
    rows, start = 7, 100
    logits = randn(rows, vocab, dtype=dtype, seed=17, scale=3.0)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(18)).to(DEVICE) + start
    labels[1], labels[4] = start - 1, start + vocab  # owned by other vocab slices: target logit 0
    grad = torch.rand(rows, generator=torch.Generator().manual_seed(19)).to(DEVICE)
    lse, target = cross_entropy_stats(logits, labels, start, use_triton=True)
    lse_ref, target_ref = cross_entropy_stats_reference(logits, labels - start)
    assert_close(lse, lse_ref, torch.float32, "log-sum-exp")
    assert torch.equal(target, target_ref)
    assert target[1] == 0 and target[4] == 0
    d = cross_entropy_grad_(logits.clone(), lse_ref, labels, grad, start, use_triton=True)
    assert_close(d, cross_entropy_grad_reference(logits, lse_ref, labels - start, grad), dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_tokens", [None, 5])
@pytest.mark.parametrize("use_triton", [True, False])
def test_linear_cross_entropy_matches_autograd_reference(dtype, chunk_tokens, use_triton):
    tokens, hidden_size, vocab = 13, 24, 301
    hidden = randn(tokens, hidden_size, dtype=dtype, seed=20).requires_grad_()
    weight = randn(vocab, hidden_size, dtype=dtype, seed=21, scale=0.3).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(22)).to(DEVICE)
    dloss = torch.rand(tokens, generator=torch.Generator().manual_seed(23)).to(DEVICE)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk_tokens, use_triton=use_triton)
    ref = linear_cross_entropy_reference(hidden, weight, labels)
    assert loss.dtype == torch.float32
    assert_close(loss, ref, torch.float32 if dtype == torch.float32 else dtype, "loss")
    grads = torch.autograd.grad(loss, (hidden, weight), dloss)
    grads_ref = torch.autograd.grad(ref, (hidden, weight), dloss)
    for g, r, name in zip(grads, grads_ref, ("dhidden", "dweight")):
        assert g.dtype == dtype
        assert_close(g, r, dtype, name)


def test_linear_cross_entropy_refuses_a_second_backward_over_overwritten_logits():
    hidden = randn(4, 8, dtype=torch.float32, seed=24).requires_grad_()
    weight = randn(11, 8, dtype=torch.float32, seed=25).requires_grad_()
    loss = linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4], device=DEVICE), use_triton=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------------- compiled for the GPU

def _h100_compile_cases():
    """(name, kernel, signature, constexprs, num_warps) at the block sizes LLaMA-1B/7B shapes launch with."""
    fwd, bwd = rmsnorm_mod._kernels()
    swiglu_fwd, swiglu_bwd = swiglu_mod._kernels()
    stats, grad = ce_mod._kernels()
    act = "*bf16"
    rows = {"rows": "i32", "rows_per_program": "i32", "dy_row_stride": "i32", "x_row_stride": "i32",
            "dx_row_stride": "i32", "hidden": "i32"}
    cases = []
    for block in (2048, 4096):
        warps = rmsnorm_mod._num_warps(block)
        cases.append((f"rmsnorm forward {block}", fwd, {"x_ptr": act, "w_ptr": act, "y_ptr": act, "rstd_ptr": "*fp32",
                                                        "x_row_stride": "i32", "y_row_stride": "i32", "hidden": "i32",
                                                        "eps": "fp32"}, {"BLOCK": block}, warps))
        cases.append((f"rmsnorm backward {block}", bwd, {"dy_ptr": act, "x_ptr": act, "w_ptr": act, "rstd_ptr": "*fp32",
                                                         "dx_ptr": act, "dw_partial_ptr": "*fp32", **rows},
                       {"BLOCK": block}, warps))
    cases.append(("swiglu forward", swiglu_fwd, {"x_ptr": act, "y_ptr": act, "x_row_stride": "i32",
                                                 "y_row_stride": "i32", "width": "i32"}, {"BLOCK": swiglu_mod._BLOCK}, 4))
    cases.append(("swiglu backward", swiglu_bwd, {"dy_ptr": act, "x_ptr": act, "dx_ptr": act, "dy_row_stride": "i32",
                                                  "x_row_stride": "i32", "dx_row_stride": "i32", "width": "i32"},
                  {"BLOCK": swiglu_mod._BLOCK}, 4))
    for backward in (False, True):
        cases.append((f"rope backward={backward}", rope_mod._kernel(), {
            "t_ptr": act, "cos_ptr": act, "sin_ptr": act, "out_ptr": act, "batch": "i32", "heads": "i32",
            "half": "i32", "t_stride_s": "i32", "t_stride_b": "i32", "t_stride_h": "i32"},
            {"BACKWARD": backward, "BLOCK_H": 32, "BLOCK_D": 64}, 4))
    ce_sig = {"logits_ptr": act, "labels_ptr": "*i64", "lse_ptr": "*fp32", "row_stride": "i32", "vocab": "i32",
              "vocab_start": "i32"}
    cases.append(("cross-entropy stats", stats, {**ce_sig, "target_ptr": "*fp32"}, {"BLOCK": ce_mod._BLOCK_V}, 8))
    cases.append(("cross-entropy grad", grad, {**ce_sig, "grad_ptr": "*fp32"}, {"BLOCK": ce_mod._BLOCK_V}, 8))
    return cases


def compile_check() -> int:
    """Compile every kernel for sm_90 with Triton's compiler (no GPU needed). Exit status 3: this triton
    cannot compile for CUDA at all (no toolchain); 0: all compiled. Needs TRITON_INTERPRET unset when
    triton is first imported (its own library functions are decorated then)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)

    @triton.jit
    def probe(x_ptr):
        tl.store(x_ptr, 1.0)

    try:
        triton.compile(ASTSource(fn=probe, signature={"x_ptr": "*fp32"}), target=target)
    except Exception as exc:
        print(f"triton cannot compile for sm_90 here: {type(exc).__name__}: {exc}")
        return 3
    for name, kernel, signature, constexprs, warps in _h100_compile_cases():
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                       options={"num_warps": warps})
        print("compiled", name)
    return 0


def test_kernels_compile_for_h100():
    """Every kernel passes Triton's compiler for sm_90 in bf16 (no GPU needed): what the interpreter
    cannot check (types of loop-carried values, scalar masks, ...)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--compile-check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("compiled") == len(_h100_compile_cases())


# ---------------------------------------------------------------------------------------- model integration

SEQ, BATCH = 16, 2


def tiny_cfg(*overrides: str):
    from effdist.config import load_config

    return load_config(None, ["model.num_layers=3", "model.hidden_size=64", "model.num_attention_heads=4",
                              "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.vocab_size=128",
                              *overrides])


def build_model(cfg, fused, seed: int = 7, device: torch.device = torch.device("cpu"), dtype=torch.float32):
    """build_gpt with the integration steps of docs/dense_speed.md for ``train.fused_kernels = fused``."""
    from megatron.core.models.gpt import GPTModel

    from effdist.model.fused import FusedLossGPTModel, fused_block_spec, fused_kernel_set, install_fused_rope
    from effdist.model.gpt import padded_vocab_size, transformer_config
    from effdist.model.spec import block_spec

    torch.manual_seed(seed)
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        from effdist.runtime.distributed import _seed_cpu_tracker

        _seed_cpu_tracker(seed)
    layers = list(range(cfg.model.num_layers))
    kernels = fused_kernel_set(fused)
    if "rope" in kernels:
        install_fused_rope()
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.ffn, dtype, device)
    tcfg.apply_rope_fusion = "rope" in kernels  # (the lead passes it to TransformerConfig itself)
    spec = fused_block_spec(block_spec(cfg.model, cfg.ffn, cfg.epas, layers), kernels)
    model = (FusedLossGPTModel if "loss" in kernels else GPTModel)(
        config=tcfg, transformer_layer_spec=spec, vocab_size=padded_vocab_size(cfg),
        max_sequence_length=cfg.model.max_position_embeddings, pre_process=True, post_process=True,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings, position_embedding_type="rope",
        rotary_base=int(cfg.model.rotary_base), parallel_output=True)
    for layer, idx in zip(model.decoder.layers, layers):
        layer.effdist_layer_index = idx
    return model.to(device)


def loss_and_grads(model, seed: int = 3, seq: int = SEQ, batch: int = BATCH):
    device = next(model.parameters()).device
    vocab = model.vocab_size
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    positions = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
    model.zero_grad(set_to_none=True)
    per_token = model(tokens, positions, None, labels=labels)
    assert per_token.shape == (batch, seq)
    # A loss mask / token weighting, as the trainer applies.
    weights = torch.rand(batch, seq, generator=g).to(device)
    (per_token.float() * weights).sum().backward()
    return per_token.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def assert_models_agree(fused_model, stock_model, tol: float, **batch) -> None:
    loss, grads = loss_and_grads(fused_model, **batch)
    loss_ref, grads_ref = loss_and_grads(stock_model, **batch)
    assert (loss - loss_ref).abs().max() <= tol * loss_ref.abs().max()
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        r = grads_ref[name]
        assert (g - r).abs().max() <= tol * r.abs().max(), f"gradient of {name}"


@pytest.fixture
def force_triton_on_cpu(monkeypatch):
    """Route the fused model's kernels through Triton (its interpreter on CPU) and count the calls."""
    from megatron.core.models.common.embeddings import rope_utils

    import effdist.model.fused as fused
    import effdist.model.norm as norm

    calls = {"rmsnorm": 0, "rope": 0, "swiglu": 0, "loss": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            kwargs["use_triton"] = True
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(norm, "rmsnorm", counted("rmsnorm", rmsnorm))
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", counted("rope", apply_rope))
    monkeypatch.setattr(fused, "swiglu", counted("swiglu", swiglu))
    monkeypatch.setattr(fused, "linear_cross_entropy", counted("loss", linear_cross_entropy))
    return calls


@pytest.mark.parametrize("setting", [True, False, ["rmsnorm"], ["rope"], ["swiglu"], ["loss"]])
def test_fused_model_is_assembled_from_the_chosen_pieces(megatron_one_process, setting):
    from megatron.core.transformer.mlp import MLP

    from effdist.model.fused import FusedLossGPTModel, FusedSwiGLUMLP, fused_kernel_set
    from effdist.model.norm import RMSNorm

    kernels = fused_kernel_set(setting)
    model = build_model(tiny_cfg(), fused=setting)
    assert isinstance(model, FusedLossGPTModel) == ("loss" in kernels)
    assert model.config.apply_rope_fusion == ("rope" in kernels)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 3 + 1 and all(n.fused == ("rmsnorm" in kernels) for n in norms)
    for layer in model.decoder.layers:
        assert type(layer.mlp) is (FusedSwiGLUMLP if "swiglu" in kernels else MLP)
        assert (layer.mlp.config is model.config) == ("swiglu" not in kernels)  # the fused MLP has a private copy


def test_switched_off_it_is_todays_model_bit_for_bit(megatron_one_process):
    from effdist.model.gpt import build_gpt
    from effdist.runtime.distributed import _seed_cpu_tracker

    cfg = tiny_cfg("train.fused_kernels=false")  # the switch off: megatron's own code paths
    torch.manual_seed(7)
    _seed_cpu_tracker(7)
    today = build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"))
    loss, grads = loss_and_grads(build_model(cfg, fused=False))
    loss_today, grads_today = loss_and_grads(today)
    assert torch.equal(loss, loss_today)
    assert all(torch.equal(grads[name], g) for name, g in grads_today.items())


def test_fused_kernel_setting_is_validated():
    from effdist.model.fused import FUSED_KERNELS, fused_kernel_set

    assert fused_kernel_set(True) == set(FUSED_KERNELS) and fused_kernel_set([]) == fused_kernel_set(False) == set()
    assert fused_kernel_set("rope, loss") == {"rope", "loss"}
    with pytest.raises(ValueError, match="train.fused_kernels.*unknown ropes"):
        fused_kernel_set(["ropes"])


def test_fused_model_on_cpu_matches_the_stock_model(megatron_one_process):
    # On CPU the fused model runs the kernels' torch references (and the fused loss's orchestration).
    cfg = tiny_cfg()
    assert_models_agree(build_model(cfg, fused=True), build_model(cfg, fused=False), tol=1e-5)


needs_interpreter = pytest.mark.skipif(HAVE_CUDA, reason="Triton on CPU tensors needs the interpreter; on a GPU "
                                       "test_fused_model_on_gpu_matches_the_stock_model covers the compiled kernels")


@needs_interpreter
def test_fused_model_with_triton_kernels_matches_the_stock_model(megatron_one_process, force_triton_on_cpu):
    cfg = tiny_cfg()
    assert_models_agree(build_model(cfg, fused=True), build_model(cfg, fused=False), tol=1e-5)
    layers = 3
    assert force_triton_on_cpu == {"rmsnorm": 2 * layers + 1, "rope": 2 * layers, "swiglu": layers, "loss": 1}


@needs_interpreter
def test_fused_rope_serves_epas_shared_qk_layers(megatron_one_process, force_triton_on_cpu):
    from effdist.epas import apply_region

    cfg = tiny_cfg("epas.enabled=true", "epas.final_region=2")
    fused, stock = build_model(cfg, fused=True), build_model(cfg, fused=False)
    for model in (fused, stock):
        apply_region([model], [2])
    assert_models_agree(fused, stock, tol=1e-5)
    # Layer 2 shares layer 1's rotated Q/K: RoPE runs in layers 0 and 1 only.
    assert force_triton_on_cpu["rope"] == 2 * 2


# ---------------------------------------------------------------------------------------- TP = 2

def tp_worker(out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from effdist.runtime import cpu_compat

    cpu_compat.install()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(2, 1, create_gloo_process_groups=False)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank()
    errors = {}

    # The loss function alone: each rank holds half of the vocab; Triton kernels (interpreter).
    tokens, hidden_size, vocab = 11, 16, 40
    hidden = randn(tokens, hidden_size, dtype=torch.float32, seed=30).requires_grad_()
    weight_full = randn(vocab, hidden_size, dtype=torch.float32, seed=31, scale=0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(32))
    weight = weight_full[rank * 20:(rank + 1) * 20].clone().requires_grad_()
    dloss = torch.rand(tokens, generator=torch.Generator().manual_seed(33))
    for chunk in (None, 4):
        loss = linear_cross_entropy(hidden, weight, labels, tp_group=group, vocab_start=rank * 20,
                                    chunk_tokens=chunk, use_triton=True)
        dh, dw = torch.autograd.grad(loss, (hidden, weight), dloss)
        dist.all_reduce(dh, group=group)  # what copy_to_tensor_model_parallel_region's backward does
        full = weight_full.clone().requires_grad_()
        ref = linear_cross_entropy_reference(hidden, full, labels)
        rdh, rdw = torch.autograd.grad(ref, (hidden, full), dloss)
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
        errors[f"function_chunk{chunk}"] = max(rel(loss, ref), rel(dh, rdh), rel(dw, rdw[rank * 20:(rank + 1) * 20]))

    # The whole model, stock vs fused, without and with sequence parallelism.
    for sp in (False, True):
        cfg = tiny_cfg("parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}")
        fused, stock = build_model(cfg, fused=True), build_model(cfg, fused=False)
        loss, grads = loss_and_grads(fused)
        loss_ref, grads_ref = loss_and_grads(stock)
        worst = ((loss - loss_ref).abs().max() / loss_ref.abs().max()).item()
        for name, g in grads.items():
            worst = max(worst, ((g - grads_ref[name]).abs().max() / grads_ref[name].abs().max()).item())
        errors[f"model_sp{int(sp)}"] = worst
    Path(f"{out}.rank{rank}").write_text(json.dumps(errors))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.fixture(scope="module", autouse=True)
def subprocess_checks(tmp_path_factory):
    """The TP=2 worker launch and the benchmark's smoke run, started with this module's first test so that they
    run beside the in-process tests (which leave the second core idle): {name: (output path, future of the
    finished process)}; the two tests below wait for theirs."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("subprocesses")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    tp_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
              "--worker", str(root / "errors")]
    bench_env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    bench_cmd = [sys.executable, str(ROOT / "tools" / "bench_kernels.py"), "--tiny", "--json", str(root / "kernels.json")]
    with ThreadPoolExecutor(1) as pool:  # one launch at a time, beside the in-process tests
        yield {"tp": (root / "errors", pool.submit(subprocess.run, tp_cmd, cwd=ROOT, env=env, capture_output=True,
                                                   text=True, timeout=300)),
               "bench": (root / "kernels.json", pool.submit(subprocess.run, bench_cmd, cwd=ROOT, env=bench_env,
                                                            capture_output=True, text=True, timeout=300))}


@pytest.mark.slow
def test_fused_loss_and_model_under_tensor_parallelism(subprocess_checks):
    out, future = subprocess_checks["tp"]
    proc = future.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for rank in (0, 1):
        errors = json.loads(Path(f"{out}.rank{rank}").read_text())
        assert set(errors) == {"function_chunkNone", "function_chunk4", "model_sp0", "model_sp1"}
        for name, err in errors.items():
            assert err < 1e-5, f"rank {rank} {name}: relative error {err}"


# ---------------------------------------------------------------------------------------- benchmark

def test_bench_kernels_tiny_runs_on_cpu(subprocess_checks):
    out, future = subprocess_checks["bench"]
    proc = future.result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    seen = {(r["kernel"], r["impl"], r["pass"]) for r in rows}
    for kernel, base in (("rmsnorm", "torch"), ("swiglu", "torch"), ("rope_qk", "torch"), ("ce", "megatron")):
        for impl in (base, "triton"):
            assert {(kernel, impl, "fwd"), (kernel, impl, "fwd+bwd")} <= seen
    assert {("lm_head_loss", impl, "fwd+bwd") for impl in ("megatron", "fused")} <= seen
    assert all(r["ms"] > 0 for r in rows)
    assert "speedup" in next(r for r in rows if r["impl"] == "triton")


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")
def test_kernels_at_llama_1b_shapes_on_gpu(dtype):
    tokens, h, f, heads, vocab = 4096, 2048, 5632, 32, 32000
    x = randn(tokens, h, dtype=dtype, seed=40).requires_grad_()
    w = (1 + randn(h, dtype=dtype, seed=41, scale=0.1)).requires_grad_()
    assert_close(rmsnorm(x, w, 1e-5), rmsnorm_reference(x, w, 1e-5), dtype, "rmsnorm")
    u = randn(tokens, 2 * f, dtype=dtype, seed=42, scale=2.0)
    assert_close(swiglu(u), swiglu_reference(u), dtype, "swiglu")
    q = randn(2048, 2, heads, h // heads, dtype=dtype, seed=43)
    freqs = rope_freqs(2048, h // heads)
    assert_close(apply_rope(q, freqs), rope_reference(q, freqs), dtype, "rope")
    weight = randn(vocab, h, dtype=dtype, seed=44, scale=0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    loss = linear_cross_entropy(x, weight, labels)
    ref = linear_cross_entropy_reference(x, weight, labels)
    assert_close(loss, ref, dtype, "loss")
    dloss = torch.rand(tokens, device=DEVICE)
    for g, r, name in zip(torch.autograd.grad(loss, (x, weight), dloss), torch.autograd.grad(ref, (x, weight), dloss),
                          ("dhidden", "dweight")):
        assert_close(g, r, dtype, name)


def gpu_model_check() -> None:
    """Stock vs fused model on one GPU in bf16 (compiled kernels), in a process of its own (NCCL world)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    device = torch.device("cuda")
    for extra in ([], ["epas.enabled=true", "epas.final_region=1"]):
        cfg = tiny_cfg("model.hidden_size=256", "model.ffn_hidden_size=688", "model.vocab_size=1000",
                       "model.max_position_embeddings=512", *extra)
        fused = build_model(cfg, fused=True, device=device, dtype=torch.bfloat16)
        stock = build_model(cfg, fused=False, device=device, dtype=torch.bfloat16)
        if extra:
            from effdist.epas import apply_region

            for model in (fused, stock):
                apply_region([model], [2])
        assert_models_agree(fused, stock, tol=5e-2, seq=256, batch=2)  # bf16: two roundings of the same math
        print("agree", extra)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA GPU")
def test_fused_model_on_gpu_matches_the_stock_model():
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--gpu-model-check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("agree") == 2


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", help="TP worker: output path prefix (one JSON file per rank)")
    parser.add_argument("--compile-check", action="store_true", help="compile every kernel for sm_90")
    parser.add_argument("--gpu-model-check", action="store_true", help="stock vs fused model on the GPU")
    args = parser.parse_args()
    if args.compile_check:
        sys.exit(compile_check())
    if args.gpu_model_check:
        sys.exit(gpu_model_check())
    if not HAVE_CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    tp_worker(args.worker)
