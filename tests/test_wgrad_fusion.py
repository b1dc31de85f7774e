"""Fused weight-gradient accumulation into megatron DDP's main_grad (effdist.model.wgrad_fusion, lever "wgrad").

CPU: the accumulation function (apex's argument order, [s, b, h] inputs, on CPU tensors megatron's unfused
arithmetic exactly); when build_gpt turns the fusion on (lever, device, engine, torch support) and that a CPU
build is today's model; and megatron's fused plumbing with the fusion forced on in a CPU build (through the
CPU path of the same function): the main_grad of a DDP-wrapped model equals the unfused model's (untied, tied
embeddings, an EPAS sharing region, the pipeline executor's B/W-split linears with and without deferred weight
gradients), and a fused model that is not wrapped keeps megatron's plain path.

GPU (marked gpu): a tiny bf16 model under megatron DDP with the lever on and off from the same weights, in a
process of its own (NCCL world): ``python tests/test_wgrad_fusion.py --gpu-check``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effdist.model import wgrad_fusion
from effdist.model.wgrad_fusion import EXTENSION, EXTENSION_NAME, wgrad_gemm_accum_fp16, wgrad_gemm_accum_fp32

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH = 16, 2


def tiny_cfg(*overrides: str):
    from effdist.config import load_config

    return load_config(None, ["model.num_layers=3", "model.hidden_size=64", "model.num_attention_heads=4",
                              "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.vocab_size=128",
                              "train.fused_kernels=[wgrad]", *overrides])


# ---------------------------------------------------------------------------------------- the accumulation


@pytest.mark.parametrize("main_dtype,dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.bfloat16, torch.bfloat16)])
def test_accumulation_on_cpu_is_megatrons_unfused_arithmetic(main_dtype, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 12, generator=g).to(dtype)   # input [s, b, in]
    dy = torch.randn(5, 3, 7, generator=g).to(dtype)   # output gradient [s, b, out]
    main = torch.randn(7, 12, generator=g).to(main_dtype)
    start = main.clone()
    expected = main.clone()
    accumulate = wgrad_gemm_accum_fp32 if main_dtype == torch.float32 else wgrad_gemm_accum_fp16
    for _ in range(2):
        # megatron's unfused weight gradient (2-D, in the operands' dtype), then DDP's hook adding it.
        expected.add_(dy.reshape(15, 7).t().matmul(x.reshape(15, 12)))
        accumulate(x, dy, main)
    assert main.dtype == main_dtype
    assert torch.equal(main, expected)
    exact = start.double() + 2 * dy.double().reshape(15, 7).t() @ x.double().reshape(15, 12)
    tol = 1e-5 if main_dtype == dtype == torch.float32 else 5e-2
    torch.testing.assert_close(main.double(), exact, rtol=tol, atol=tol)


def test_accumulation_names_the_argument_order_when_shapes_do_not_fit():
    x, dy, main = torch.randn(10, 12), torch.randn(10, 7), torch.zeros(7, 12)
    with pytest.raises(ValueError, match="apex's order: input, grad_output, main_grad"):
        wgrad_gemm_accum_fp32(dy, x, main)
    with pytest.raises(ValueError, match="do not fit"):
        wgrad_gemm_accum_fp32(x[:9], dy, main)


# ---------------------------------------------------------------------------------------- when it is on


def test_fusion_needs_the_lever_cuda_the_megatron_engine_and_torch_support(monkeypatch):
    from effdist.model.fused import FUSED_KERNELS, fused_kernel_set

    assert "wgrad" in FUSED_KERNELS and "wgrad" in fused_kernel_set(True)
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    probes = []

    def probe(device, dtype=bf16):
        probes.append((device, dtype))
        return supported

    monkeypatch.setattr(wgrad_fusion, "fp32_accumulating_gemm_available", probe)
    supported = True
    applies = wgrad_fusion.wgrad_fusion_applies
    assert not applies(tiny_cfg("train.fused_kernels=true").train, cpu, bf16)
    assert not applies(tiny_cfg("train.fused_kernels=true").train, cpu, torch.float32)
    # Set after loading: validating train.engine=deepspeed needs the optional DeepSpeed installed.
    deepspeed_engine = tiny_cfg("train.fused_kernels=true")
    deepspeed_engine.train.engine = "deepspeed"
    assert not applies(deepspeed_engine.train, cuda, bf16)
    assert not applies(tiny_cfg("train.fused_kernels=[rmsnorm,rope,swiglu,loss]").train, cuda, bf16)
    assert not applies(tiny_cfg("train.fused_kernels=false").train, cuda, bf16)
    assert probes == []  # none of these asks the GPU anything
    assert applies(tiny_cfg("train.fused_kernels=true").train, cuda, bf16)
    assert applies(tiny_cfg().train, cuda, torch.float16)
    assert probes == [(cuda, bf16), (cuda, torch.float16)]
    assert applies(tiny_cfg().train, cuda, torch.float32) and len(probes) == 2  # fp32 operands: plain addmm_
    supported = False
    with pytest.warns(UserWarning, match="wgrad.*accumulated unfused"):
        assert not applies(tiny_cfg().train, cuda, bf16)


def test_the_fp32_accumulating_gemm_is_not_probed_off_cuda():
    assert not wgrad_fusion.fp32_accumulating_gemm_available(torch.device("cpu"), torch.bfloat16)


@pytest.fixture
def megatron_slots(monkeypatch):
    """Restore megatron's extension slots (and sys.modules) after a test installs effdist's implementation."""
    from megatron.core.tensor_parallel import layers

    monkeypatch.setattr(layers, "_grad_accum_fusion_available", layers._grad_accum_fusion_available)
    monkeypatch.setattr(layers, EXTENSION_NAME, getattr(layers, EXTENSION_NAME, None), raising=False)
    if EXTENSION_NAME in sys.modules:
        monkeypatch.setitem(sys.modules, EXTENSION_NAME, sys.modules[EXTENSION_NAME])
    else:
        monkeypatch.delitem(sys.modules, EXTENSION_NAME, raising=False)
    return layers


def test_install_fills_megatrons_slot_and_keeps_apexs(megatron_slots):
    layers = megatron_slots
    apex = object()
    layers._grad_accum_fusion_available, layers.fused_weight_gradient_mlp_cuda = True, apex
    assert not wgrad_fusion.install_wgrad_fusion()
    assert layers.fused_weight_gradient_mlp_cuda is apex
    layers._grad_accum_fusion_available = False
    assert wgrad_fusion.install_wgrad_fusion() and wgrad_fusion.install_wgrad_fusion()
    assert layers._grad_accum_fusion_available and layers.fused_weight_gradient_mlp_cuda is EXTENSION
    import fused_weight_gradient_mlp_cuda  # megatron.core.utils imports it lazily by this name

    assert fused_weight_gradient_mlp_cuda is EXTENSION
    assert EXTENSION.wgrad_gemm_accum_fp32 is wgrad_gemm_accum_fp32


def test_a_cpu_build_with_the_lever_on_is_todays_model(megatron_one_process):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    model = build(tiny_cfg("train.fused_kernels=true"))
    assert model.config.gradient_accumulation_fusion is False
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert linears and not any(m.gradient_accumulation_fusion for m in linears)
    assert not any(m._forward_pre_hooks for m in linears)


# ---------------------------------------------------------------------------------------- megatron's plumbing


def build(cfg, seed: int = 7, forced: bool = False, linears=None):
    """build_gpt on CPU (fp32); ``forced``: with its fusion decision patched to the lever alone."""
    from effdist.model import gpt
    from effdist.model.fused import fused_kernel_set
    from effdist.model.spec import DEFAULT_LINEARS
    from effdist.runtime.distributed import _seed_cpu_tracker

    torch.manual_seed(seed)
    _seed_cpu_tracker(seed)
    original = gpt.wgrad_fusion_applies
    if forced:
        gpt.wgrad_fusion_applies = lambda train, device, dtype: "wgrad" in fused_kernel_set(train.fused_kernels)
    try:
        return gpt.build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"),
                             linears=linears or DEFAULT_LINEARS)
    finally:
        gpt.wgrad_fusion_applies = original


def batches(cfg, n: int = 2, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ), generator=g)
        mask = torch.rand(BATCH, SEQ, generator=g)
        out.append((tokens, torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ), labels, mask))
    return out


def ddp_wrap(model):
    """megatron DDP as the trainer configures it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=False)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)


def accumulate_main_grads(ddp, mbs, defer: bool = False) -> dict[str, torch.Tensor]:
    """One step's microbatches forward and backward (weight GEMMs deferred and run after each backward, as
    the pipeline's W actions do, when ``defer``); every parameter's main_grad."""
    from effdist.pipeline.wgrad import WEIGHT_GRAD_STORE

    ddp.zero_grad_buffer()
    n = sum(float(mb[3].sum()) for mb in mbs)
    for i, (tokens, positions, labels, mask) in enumerate(mbs):
        loss = (ddp(tokens, positions, None, labels=labels).float() * mask).sum() / n
        if defer:
            with WEIGHT_GRAD_STORE.deferring(("wgrad-fusion-test", i)):
                loss.backward()
            assert WEIGHT_GRAD_STORE.run(("wgrad-fusion-test", i)) > 0
        else:
            loss.backward()
    ddp.finish_grad_sync()
    return {name: p.main_grad.clone() for name, p in ddp.module.named_parameters()}


def linear_weights(model) -> dict[str, torch.nn.Parameter]:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            weight = module.weight if module.weight is not None else model.shared_embedding_or_output_weight()
            out[names[id(weight)]] = weight
    return out


@pytest.fixture
def counted_extension(monkeypatch, megatron_slots):
    """Count megatron's calls of the (installed) extension."""
    calls = {"fp32": 0, "fp16": 0}

    def counted(kind, fn):
        def run(*args):
            calls[kind] += 1
            return fn(*args)
        return run

    monkeypatch.setattr(EXTENSION, "wgrad_gemm_accum_fp32", counted("fp32", wgrad_gemm_accum_fp32))
    monkeypatch.setattr(EXTENSION, "wgrad_gemm_accum_fp16", counted("fp16", wgrad_gemm_accum_fp16))
    return calls


@pytest.mark.parametrize("case", ["untied", "tied", "epas"])
def test_fused_main_grad_equals_the_unfused_one_under_megatron_ddp(megatron_one_process, counted_extension, case):
    extra = {"untied": [], "tied": ["model.tie_embeddings=true"],
             "epas": ["epas.enabled=true", "epas.final_region=2"]}[case]
    cfg = tiny_cfg(*extra)
    plain, fused = build(cfg), build(cfg, forced=True)
    fused.load_state_dict(plain.state_dict())
    assert plain.config.gradient_accumulation_fusion is False and fused.config.gradient_accumulation_fusion is True
    if case == "epas":
        from effdist.epas import apply_region

        for model in (plain, fused):
            apply_region([model], {2})
    mbs = batches(cfg)
    reference = accumulate_main_grads(ddp_wrap(plain), mbs)
    got = accumulate_main_grads(ddp_wrap(fused), mbs)
    linears = linear_weights(fused)
    # Per microbatch: one call per linear weight (the sharing layer's linear_qkv takes EPAS's V-row path).
    assert counted_extension == {"fp32": len(mbs) * (len(linears) - (case == "epas")), "fp16": 0}
    for name, p in linears.items():
        assert p.grad_added_to_main_grad, name
    assert all(p.grad is None for p in fused.parameters())
    for name, g in reference.items():
        if case == "tied" and name == "embedding.word_embeddings.weight":
            # The output layer's part goes in first, then the lookup's (DDP adds their sum unfused): the same
            # terms in another order.
            torch.testing.assert_close(got[name], g, rtol=1e-6, atol=1e-9, msg=name)
        else:
            assert torch.equal(got[name], g), name
    assert all(torch.count_nonzero(reference[name]) > 0 for name in linears)


@pytest.mark.parametrize("defer", [False, True])
def test_split_linears_of_the_pipeline_add_into_main_grad_themselves(megatron_one_process, counted_extension, defer):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from effdist.pipeline.wgrad import SPLIT_LINEARS, SplitColumnParallelLinear, SplitRowParallelLinear

    cfg = tiny_cfg()
    plain, fused = build(cfg), build(cfg, forced=True, linears=SPLIT_LINEARS)
    fused.load_state_dict(plain.state_dict())
    split = [m for m in fused.modules() if isinstance(m, (SplitColumnParallelLinear, SplitRowParallelLinear))]
    assert len(split) == 4 * cfg.model.num_layers and all(m.gradient_accumulation_fusion for m in split)
    assert type(fused.output_layer) is ColumnParallelLinear
    mbs = batches(cfg)
    reference = accumulate_main_grads(ddp_wrap(plain), mbs)
    got = accumulate_main_grads(ddp_wrap(fused), mbs, defer=defer)
    # The split linears add through their own _ManualTarget; only the output layer (megatron's) calls the extension.
    assert counted_extension == {"fp32": len(mbs), "fp16": 0}
    assert all(p.grad is None for p in fused.parameters())
    for name, g in reference.items():
        assert torch.equal(got[name], g), name


def test_a_fused_model_outside_ddp_keeps_megatrons_plain_path(megatron_one_process, counted_extension):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    cfg = tiny_cfg("model.tie_embeddings=true")
    plain, fused = build(cfg), build(cfg, forced=True)
    fused.load_state_dict(plain.state_dict())
    guarded = [m for m in fused.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert wgrad_fusion.guard_wgrad_fusion(fused) == len(guarded)  # build_gpt guarded them all; idempotent
    assert all(len(m._forward_pre_hooks) == 1 for m in guarded)
    grads = []
    for model in (plain, fused):
        for tokens, positions, labels, mask in batches(cfg):
            (model(tokens, positions, None, labels=labels) * mask).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert counted_extension == {"fp32": 0, "fp16": 0}
    assert not any(m.gradient_accumulation_fusion for m in guarded)
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name


# ---------------------------------------------------------------------------------------- GPU


def compare_lever_on_off(device: torch.device, dtype: torch.dtype, size: list[str], seq: int,
                         lr: float = 1e-3) -> list[str]:
    """The lever on vs off under megatron DDP (fp32 main_grad) from the same weights: the main_grads agree to
    bf16 rounding of the unfused weight gradients, and one AdamW step moves the weights alike. One line per case."""
    from megatron.core import parallel_state

    from effdist.model.fused import fused_kernel_set
    from effdist.model.gpt import build_gpt
    from effdist.train.optim import MasterWeightAdamW

    cases = {  # name: (lever on, lever off, extra overrides)
        "all-levers": ("true", "[rmsnorm,rope,swiglu,loss]", []),
        "wgrad-only-tied": ("[wgrad]", "false", ["model.tie_embeddings=true"]),
    }
    batch, report = 2, []
    for name, (on, off, extra) in cases.items():
        cfg_on = tiny_cfg(*size, *extra, f"train.fused_kernels={on}")
        cfg_off = tiny_cfg(*size, *extra, f"train.fused_kernels={off}")
        model_on = build_gpt(cfg_on.model, cfg_on.parallel, cfg_on.train, cfg_on.ffn, cfg_on.epas, dtype, device)
        model_off = build_gpt(cfg_off.model, cfg_off.parallel, cfg_off.train, cfg_off.ffn, cfg_off.epas, dtype, device)
        assert model_on.config.gradient_accumulation_fusion, f"{name}: build_gpt left the fusion off"
        assert not model_off.config.gradient_accumulation_fusion, f"{name}: the fusion is on without the lever"
        params_on, params_off = dict(model_on.named_parameters()), dict(model_off.named_parameters())
        assert params_on.keys() == params_off.keys()
        with torch.no_grad():
            for n, p in params_on.items():
                params_off[n].copy_(p)
        g = torch.Generator().manual_seed(5)
        mbs = []
        for _ in range(2):
            tokens = torch.randint(0, cfg_on.model.vocab_size, (batch, seq), generator=g)
            labels = torch.randint(0, cfg_on.model.vocab_size, (batch, seq), generator=g)
            mbs.append((tokens.to(device), torch.arange(seq, device=device).expand(batch, seq), labels.to(device),
                        torch.ones(batch, seq, device=device)))
        wrapped = {"on": ddp_wrap(model_on), "off": ddp_wrap(model_off)}
        grads = {k: accumulate_main_grads(w, mbs) for k, w in wrapped.items()}
        # Every decoder linear, and the output layer unless the fused loss multiplies its weight itself.
        linears = {f"decoder.{n}": p for n, p in linear_weights(model_on.decoder).items()}
        if "loss" not in fused_kernel_set(cfg_on.train.fused_kernels):
            tied = model_on.share_embeddings_and_output_weights
            linears["output layer"] = (model_on.shared_embedding_or_output_weight() if tied
                                       else model_on.output_layer.weight)
        for n, p in linears.items():
            assert p.grad_added_to_main_grad, f"{name}: {n} did not take the fused path"
        for n, g_off in grads["off"].items():
            g_on = grads["on"][n]
            assert g_on.dtype == torch.float32 and torch.isfinite(g_on).all(), f"{name}: {n}"
            scale = float(g_off.abs().max())
            assert scale > 0, f"{name}: {n} has no gradient"
            err = float((g_on - g_off).abs().max())
            # Unfused, each microbatch's weight gradient is rounded to bf16 before the fp32 add.
            assert err <= 1e-2 * scale, f"{name}: main_grad of {n} differs by {err:.3g} (max |g| {scale:.3g})"

        before = {n: p.detach().float().clone() for n, p in params_on.items()}
        updates, weights = {}, {}
        for k, w in wrapped.items():
            opt = MasterWeightAdamW([p for p in w.parameters() if p.requires_grad], cfg_on.optim,
                                    fused=device.type == "cuda", tp_rank=0,
                                    model_parallel_group=parallel_state.get_model_parallel_group())
            opt.collect_grads()
            opt.clip(opt.grad_norm())
            opt.step(lr=lr)
            named = dict(w.module.named_parameters())
            updates[k] = {n: opt.master_of(named[n]).detach().float() - before[n] for n in before}
            weights[k] = {n: p.detach().float() for n, p in named.items()}
        flipped = total = 0
        for n in before:
            u_on, u_off = updates["on"][n], updates["off"][n]
            # Adam's first step moves each weight by about lr * sign(gradient) (+ decay).
            assert float((u_on - u_off).abs().max()) <= 2.5 * lr, f"{name}: update of {n}"
            flipped += int((u_on.sign() != u_off.sign()).sum())
            total += u_on.numel()
            ulp = float(weights["off"][n].abs().max()) * 2 ** -7
            assert float((weights["on"][n] - weights["off"][n]).abs().max()) <= 2.5 * lr + ulp, f"{name}: {n}"
        # Only weights whose gradient is within rounding of zero may step the other way.
        assert flipped <= 0.01 * total, f"{name}: {flipped} of {total} weights stepped the other way"
        with torch.no_grad():
            losses = [float(w(*mbs[0][:2], None, labels=mbs[0][2]).float().mean()) for w in wrapped.values()]
        assert abs(losses[0] - losses[1]) <= 2e-3 * abs(losses[1]), f"{name}: losses after the step {losses}"
        report.append(f"wgrad-gpu ok {name}: {len(linears)} fused weights, {flipped}/{total} flipped, losses {losses}")
    return report


def test_the_gpu_comparison_runs_on_cpu_with_the_fusion_forced(megatron_one_process, megatron_slots, monkeypatch):
    """The GPU check's own code, on CPU (fp32) with build_gpt's decision patched to the lever alone: there the
    fused path is megatron's unfused arithmetic, so everything agrees; what is tested is the check itself."""
    from effdist.model import gpt
    from effdist.model.fused import fused_kernel_set

    monkeypatch.setattr(gpt, "wgrad_fusion_applies",
                        lambda train, device, dtype: "wgrad" in fused_kernel_set(train.fused_kernels))
    report = compare_lever_on_off(torch.device("cpu"), torch.float32, ["model.num_layers=2"], seq=SEQ)
    assert len(report) == 2 and all(" 0/" in line for line in report), report


def gpu_check() -> None:
    """`compare_lever_on_off` on one GPU in bf16, in an NCCL world of one process."""
    from effdist.runtime.distributed import one_process_megatron

    device, dtype = torch.device("cuda"), torch.bfloat16
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        raise SystemExit(f"torch {torch.__version__} has no aten::addmm.dtype_out (torch.addmm(..., out_dtype=...)): "
                         "the wgrad lever needs torch >= 2.10")
    if not wgrad_fusion.fp32_accumulating_gemm_available(device, dtype):
        raise SystemExit(f"torch {torch.__version__} on {torch.cuda.get_device_name()} cannot run torch.addmm(fp32, "
                         "bf16, bf16, out_dtype=torch.float32, out=fp32): the wgrad lever stays off")
    size = ["model.num_layers=2", "model.hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=688", "model.vocab_size=1000", "model.max_position_embeddings=512"]
    with one_process_megatron(cuda=True, seed=1234):
        for line in compare_lever_on_off(device, dtype, size, seq=256):
            print(line, flush=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_wgrad_on_gpu_matches_the_unfused_step():
    env = dict(os.environ, PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__, "--gpu-check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("wgrad-gpu ok") == 2, proc.stdout[-3000:]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-check", action="store_true", help="lever on vs off under megatron DDP on the GPU")
    args = parser.parse_args()
    if args.gpu_check:
        gpu_check()
