"""Sparse FFN modules on a GPU: the Triton paths equal the CPU (torch reference) paths, and ELAS's
cuSPARSELt down projection equals its dense GEMM."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H = 256


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1_cuda():
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    warnings.filterwarnings("ignore", category=UserWarning)
    torch.cuda.set_device(0)
    started_dist = not dist.is_initialized()
    if started_dist:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    started_mp = not parallel_state.model_parallel_is_initialized()
    if started_mp:
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield
    if started_mp:
        parallel_state.destroy_model_parallel()
    if started_dist:
        dist.destroy_process_group()


def _build(sets: list[str], dtype: torch.dtype):
    from megatron.core.transformer.spec_utils import build_module

    from effdist.config import load_config
    from effdist.model.ffn.registry import build_mlp_spec
    from effdist.model.gpt import transformer_config

    cfg = load_config(None, [f"model.hidden_size={H}", "model.num_attention_heads=4", "model.ffn_hidden_size=704"]
                      + sets)
    torch.manual_seed(0)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.ffn, dtype, torch.device("cuda"))
    return build_module(build_mlp_spec(cfg.ffn, cfg.model, 0), config=tcfg)


def _run(module, x, dout):
    x = x.detach().clone().requires_grad_(True)
    out, _ = module(x)
    out.backward(dout)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("sets", [["ffn.kind=moc"], ["ffn.kind=moc", "ffn.moc_structured=true"], ["ffn.kind=topk"],
                                  ["ffn.kind=elas"], ["ffn.kind=elas", "ffn.elas_rank=64"]])
def test_gpu_module_matches_cpu_reference_path(sets):
    # fp64, so that GPU and CPU GEMMs agree far below any gap between selected and dropped values.
    module = _build(sets, torch.float64)
    x = torch.randn(64, 3, H, device="cuda", dtype=torch.float64)
    dout = torch.randn(64, 3, H, device="cuda", dtype=torch.float64)
    out_gpu, grads_gpu = _run(module, x, dout)
    module_cpu = module.cpu()
    out_cpu, grads_cpu = _run(module_cpu, x.cpu(), dout.cpu())
    assert torch.allclose(out_gpu.cpu(), out_cpu, rtol=1e-9, atol=1e-12)
    for g, c in zip(grads_gpu, grads_cpu):
        assert torch.allclose(g.cpu(), c, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["moc", "topk"])
def test_gpu_fused_selection_equals_the_separate_kernels(kind, monkeypatch):
    """fp32/bf16 take the fused top-k select + activate kernel; it equals topk_select + select_activate."""
    from effdist.model.ffn import channel

    for dtype in (torch.float32, torch.bfloat16):
        module = _build([f"ffn.kind={kind}"], dtype)
        x = torch.randn(64, 3, H, device="cuda", dtype=dtype)
        dout = torch.randn(64, 3, H, device="cuda", dtype=dtype)
        fused = _run(module, x, dout)
        monkeypatch.setattr(channel.ChannelSelectMLP, "fused_topk", lambda self: None)
        separate = _run(module, x, dout)
        monkeypatch.undo()
        for a, b in zip([fused[0]] + fused[1], [separate[0]] + separate[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("ste", ["identity", "masked"])
@pytest.mark.parametrize("rank", [None, 64])
def test_elas_cusparselt_down_projection_matches_dense(ste, rank):
    sets = ["ffn.kind=elas"] + ([f"ffn.elas_rank={rank}"] if rank else [])
    module = _build(sets, torch.bfloat16)
    module.ste = ste
    x = torch.randn(256, 2, H, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(256, 2, H, device="cuda", dtype=torch.bfloat16)
    module.sparse_gemm = "always"
    out_sparse, grads_sparse = _run(module, x, dout)
    assert module.used_sparse_gemm
    module.sparse_gemm = "never"
    out_dense, grads_dense = _run(module, x, dout)
    assert not module.used_sparse_gemm
    scale = out_dense.float().abs().max()
    assert (out_sparse.float() - out_dense.float()).abs().max() <= 2e-2 * scale
    for s, d in zip(grads_sparse, grads_dense):
        assert (s.float() - d.float()).abs().max() <= 2e-2 * d.float().abs().max() + 1e-6


def test_elas_auto_sparse_gemm_follows_the_measured_table_and_agrees_with_dense(monkeypatch):
    from effdist.model.ffn import elas as elas_mod
    from effdist.model.ffn import sparse_gemm_table as table

    module = _build(["ffn.kind=elas"], torch.bfloat16)
    assert module.sparse_gemm == "auto"
    module.sparse_min_tokens = 0
    x = torch.randn(512, 2, H, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(x)
    out_features, in_features = module._sharded_fc2().weight.shape
    chosen = {}
    for name, sparse_ms in (("sparse", 1.0), ("dense", 3.0)):
        entry = table.Entry(1024, in_features, out_features, "bf16", dense_ms=2.0, sparse_ms=sparse_ms)
        monkeypatch.setattr(table, "shipped_tables", lambda entry=entry: (table.Table(
            torch.cuda.get_device_name(0), (entry,)),))
        elas_mod._table_choice.cache_clear()  # looked up once per shape: forget the last table's answer
        chosen[name], _ = _run(module, x, dout)
        assert module.used_sparse_gemm == (name == "sparse"), name
    monkeypatch.setattr(table, "shipped_tables", lambda: ())  # no table for this GPU: dense
    elas_mod._table_choice.cache_clear()
    _run(module, x, dout)
    assert not module.used_sparse_gemm
    looked_up = elas_mod._table_choice.cache_info().misses
    _run(module, x, dout)  # the same shape again: no new lookup in the forward pass
    assert elas_mod._table_choice.cache_info().misses == looked_up
    out_auto = chosen["sparse"]
    module.sparse_gemm = "never"
    out_dense, _ = _run(module, x, dout)
    assert (out_auto.float() - out_dense.float()).abs().max() <= 2e-2 * out_dense.float().abs().max()
