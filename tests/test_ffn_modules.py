"""Sparse FFN modules on CPU (TP = 1): math against dense references, the ELAS straight-through
gradient, saved-activation bytes against their predictions, low-rank linears and the registry."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from effdist.config import load_config

H, FFN = 64, 176  # effdist's tiny model
TOKENS_S, TOKENS_B = 16, 4
N = TOKENS_S * TOKENS_B


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1(megatron_one_process):
    yield

def _cfg(*sets: str):
    return load_config(None, list(sets))


def _build(cfg, layer: int = 0, dtype=torch.float32):
    from megatron.core.transformer.spec_utils import build_module

    from effdist.model.ffn.registry import build_mlp_spec
    from effdist.model.gpt import transformer_config

    torch.manual_seed(0)
    return build_module(build_mlp_spec(cfg.ffn, cfg.model, layer),
                        config=transformer_config(cfg.model, cfg.parallel, cfg.ffn, dtype, torch.device("cpu")))


def _input(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS_S, TOKENS_B, H, generator=g, dtype=dtype).requires_grad_(True)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages saved for backward by one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = module(x)
    out.sum().backward()  # the compact recipes must also rebuild correctly
    return sum(storages.values())


# ------------------------------------------------------------------------------------ memory

def test_moc_saved_activations_fall_by_the_predicted_ratio():
    from effdist.config import resolve_count

    x = _input()
    dense = saved_bytes(_build(_cfg("ffn.kind=swiglu")), x)
    k = resolve_count(0.1875, FFN)
    moc = saved_bytes(_build(_cfg("ffn.kind=moc")), x)
    structured = saved_bytes(_build(_cfg("ffn.kind=moc", "ffn.moc_structured=true")), x)
    # megatron 0.16.1's SwiGLU keeps x, the fused [G | U] fc1 output, SiLU(G), U + glu_linear_offset (a
    # copy) and Z: h + 5·d_ffn values per token. MoC keeps x, G and U at the K selected channels and which
    # channels: a bit mask of the row for its plain top-K (int32 words), int16 indices for 2:8.
    predicted_dense = N * (H + 5 * FFN) * 4
    predicted_moc = N * (H + 2 * k) * 4 + N * math.ceil(FFN / 32) * 4
    predicted_structured = N * (H + 2 * (FFN // 4)) * 4 + N * (FFN // 4) * 2
    assert dense == predicted_dense
    assert moc == predicted_moc
    assert structured == predicted_structured
    assert dense / moc == pytest.approx(predicted_dense / predicted_moc)
    assert dense / moc > 5


def test_topk_and_elas_saved_activations_match_predictions():
    from effdist.config import resolve_count
    from effdist.model.ffn.elas import ElasMLP

    x = _input()
    k = resolve_count(0.1, FFN)
    assert saved_bytes(_build(_cfg("ffn.kind=topk")), x) == N * (H + k) * 4 + N * math.ceil(FFN / 32) * 4
    width = round(1.5 * FFN)
    relu2 = saved_bytes(_build(_cfg("ffn.kind=relu2")), x)  # ELAS's dense reference: the same 1.5x width
    assert relu2 == N * (H + 2 * width) * 4  # megatron keeps relu(h) and relu(h)²
    elas = _build(_cfg("ffn.kind=elas"))
    assert isinstance(elas, ElasMLP) and elas.local_width == width
    assert saved_bytes(elas, x) == N * (H + width) * 4  # identity STE: h only
    elas.ste = "masked"
    # masked STE: 2:4-compressed relu(h) (half the values) + one byte of positions per 2 groups.
    assert saved_bytes(elas, x) == N * (H + width // 2) * 4 + N * math.ceil(width / 8)


def test_the_saved_bytes_model_is_what_every_kind_saves():
    """effdist.pipeline.memory_model.ffn_saved_bytes_per_token, the per-kind accounting that tools and the
    planner use, equals what each module saves (megatron's own SwiGLU here: the fused kernel's autograd function
    runs on GPU only)."""
    from effdist.pipeline.memory_model import ffn_saved_bytes_per_token

    x = _input()
    for sets in (["ffn.kind=swiglu"], ["ffn.kind=relu2"], ["ffn.kind=moc"], ["ffn.kind=moc", "ffn.moc_structured=true"],
                 ["ffn.kind=topk"], ["ffn.kind=topk", "ffn.topk_k=7"], ["ffn.kind=elas"],
                 ["ffn.kind=moc", "ffn.save_selection=indices"], ["ffn.kind=topk", "ffn.save_selection=indices"],
                 ["ffn.kind=elas", "ffn.elas_ste=masked"]):
        cfg = _cfg(*sets)
        predicted = N * ffn_saved_bytes_per_token(cfg.ffn, cfg.model, element_bytes=4, fused_swiglu=False)
        assert saved_bytes(_build(cfg), x) == predicted, sets


@pytest.mark.parametrize("sets", [["ffn.kind=moc"], ["ffn.kind=moc", "ffn.moc_structured=true"], ["ffn.kind=topk"],
                                  ["ffn.kind=elas"], ["ffn.kind=elas", "ffn.elas_ste=masked"]])
def test_the_dense_fc2_input_a_compact_kind_replaces_is_freed_after_forward(sets):
    """The saved-tensor hooks above see what autograd saves; this holds the memory itself: once the forward has
    returned, nothing keeps the dense fc2 input alive (it cost one [tokens, f] tensor per layer in GPU training
    while the hooks of `save_compactly` held it through their closure)."""
    import gc
    import weakref

    module = _build(_cfg(*sets))
    seen = []
    handle = module.linear_fc2.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(args[0])))
    out, _ = module(_input())
    handle.remove()
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None, f"{sets}: the dense fc2 input is still alive after forward"
    out.sum().backward()  # and backward rebuilds it


# ------------------------------------------------------------------------------------ MoC / top-k

def _dense_swiglu_masked(module, x, k=None, structured=False):
    w1, w2 = module.linear_fc1.weight, module.linear_fc2.weight
    gu = x @ w1.t()
    g, u = gu.chunk(2, dim=-1)
    if structured:
        top = torch.topk(g.detach().reshape(*g.shape[:-1], -1, 8), 2, dim=-1).indices
        mask = torch.zeros_like(g.reshape(*g.shape[:-1], -1, 8), dtype=torch.bool).scatter_(-1, top, True).reshape(g.shape)
    else:
        top = torch.topk(g.detach(), k, dim=-1).indices
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, top, True)
    return (F.silu(g) * u * mask) @ w2.t()


@pytest.mark.parametrize("structured", [False, True])
def test_moc_matches_dense_masked_swiglu_and_its_gradients(structured):
    from effdist.config import resolve_count

    sets = ["ffn.kind=moc"] + (["ffn.moc_structured=true"] if structured else [])
    module = _build(_cfg(*sets))
    x = _input(seed=2, dtype=torch.float64)
    module.double()
    out, bias = module(x)
    assert bias is None
    ref = _dense_swiglu_masked(module, x, resolve_count(0.1875, FFN), structured)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, module.linear_fc1.weight, module.linear_fc2.weight], dout)
    ref_grads = torch.autograd.grad(ref, [x, module.linear_fc1.weight, module.linear_fc2.weight], dout)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # Unselected channels get no gradient: fc2 columns of channels never selected stay zero.
    gu = x.detach() @ module.linear_fc1.weight.detach().t()
    chosen = torch.zeros(FFN, dtype=torch.bool)
    if not structured:
        chosen[torch.topk(gu[..., :FFN], resolve_count(0.1875, FFN), dim=-1).indices.unique()] = True
        assert bool((grads[2][:, ~chosen] == 0).all())


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_topk_matches_dense_masked_reference(activation):
    from effdist.config import resolve_count

    module = _build(_cfg("ffn.kind=topk", f"ffn.topk_activation={activation}")).double()
    k = resolve_count(0.1, FFN)
    x = _input(seed=3, dtype=torch.float64)
    out, _ = module(x)
    h = x @ module.linear_fc1.weight.t()
    mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, torch.topk(h.detach(), k, dim=-1).indices, True)
    a = torch.relu(h) if activation == "relu" else torch.relu(h) ** 2
    ref = (a * mask) @ module.linear_fc2.weight.t()
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert int(((a * mask) != 0).sum(-1).max()) <= k
    dout = torch.randn_like(out)
    params = [x, module.linear_fc1.weight, module.linear_fc2.weight]
    for g, r in zip(torch.autograd.grad(out, params, dout), torch.autograd.grad(ref, params, dout)):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("save_selection", ["mask", "indices"])
@pytest.mark.parametrize("kind", ["moc", "topk"])
def test_fused_topk_select_activate_path_matches_the_masked_reference(kind, save_selection, monkeypatch):
    """The plain top-K path (selection inside the select + activate kernel, the selection saved as a bit mask or
    as int16 indices, ffn.save_selection; on CPU through the kernels' references): same output and gradients as
    the masked dense FFN, and the saved tensors still rebuild fc2's input."""
    from effdist.config import resolve_count
    from effdist.model.ffn import channel

    calls = []
    real = channel.topk_select_activate
    monkeypatch.setattr(channel, "topk_select_activate", lambda *a: calls.append((a[1], a)) or real(*a))
    module = _build(_cfg(f"ffn.kind={kind}", f"ffn.save_selection={save_selection}")).double()
    x = _input(seed=5, dtype=torch.float64)
    out, _ = module(x)
    k = resolve_count(0.1875 if kind == "moc" else 0.1, FFN)
    assert [(c[0], c[1][4:]) for c in calls] == [(k, (torch.int16, "bisect", save_selection == "mask"))]
    if kind == "moc":
        ref = _dense_swiglu_masked(module, x, k)
    else:
        h = x @ module.linear_fc1.weight.t()
        mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, torch.topk(h.detach(), k, dim=-1).indices, True)
        ref = (torch.relu(h) * mask) @ module.linear_fc2.weight.t()
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    dout = torch.randn_like(out)
    params = [x, module.linear_fc1.weight, module.linear_fc2.weight]
    for g, r in zip(torch.autograd.grad(out, params, dout), torch.autograd.grad(ref, params, dout)):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ ELAS

@pytest.mark.parametrize("ste", ["identity", "masked"])
def test_elas_keeps_exactly_two_of_four_and_follows_the_ste_formula(ste):
    from effdist.model.ffn.elas import _Relu2Sparse24

    g = torch.Generator().manual_seed(4)
    # Strictly positive pre-activations: every kept entry is non-zero, so zeros show the mask.
    h = (torch.rand(37, 44, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)
    y = _Relu2Sparse24.apply(h, True, ste, [])
    groups = y.detach().view(37, 11, 4)
    kept = groups != 0
    assert bool((kept.sum(-1) == 2).all()), "exactly 2 of every 4 kept"
    r = h.detach().view(37, 11, 4) ** 2
    assert bool((r.masked_fill(~kept, float("inf")).amin(-1) >= r.masked_fill(kept, 0).amax(-1)).all())
    assert torch.equal(groups, torch.where(kept, r, 0.0))
    dy = torch.randn(37, 44, generator=g, dtype=torch.float64)
    (dh,) = torch.autograd.grad(y, h, dy)
    mask = kept.view(37, 44)
    # identity: dL/dh = dL/dy · 2 relu(h); masked: M · dL/dy · 2 relu(h)
    expected = dy * 2 * torch.relu(h.detach())
    if ste == "masked":
        expected = expected * mask
    assert torch.allclose(dh, expected, rtol=1e-12, atol=0)
    if ste == "identity":
        assert bool((dh[~mask] != 0).all()), "dropped entries still get the straight-through gradient"


@pytest.mark.parametrize("ste", ["identity", "masked"])
@pytest.mark.parametrize("rank", [None, 16])
def test_elas_module_matches_reference(ste, rank):
    sets = ["ffn.kind=elas"] + ([f"ffn.elas_rank={rank}"] if rank else [])
    module = _build(_cfg(*sets)).double()
    module.ste = ste
    x = _input(seed=5, dtype=torch.float64)
    out, _ = module(x)

    def linear(mod, t):
        return mod(t)[0]

    h = linear(module.linear_fc1, x)
    r = torch.relu(h) ** 2
    groups = r.detach().reshape(-1, 4)
    top = torch.topk(groups, 2, dim=-1).indices  # random inputs: no ties among positive entries
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).view(r.shape) & (r.detach() > 0)
    if ste == "identity":
        y = r + (r * mask - r).detach()  # forward S(r), gradient of the identity
    else:
        y = r * mask
    ref = linear(module.linear_fc2, y)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    params = [x] + [p for p in module.parameters()]
    dout = torch.randn_like(out)
    for g, rg in zip(torch.autograd.grad(out, params, dout), torch.autograd.grad(ref, params, dout)):
        assert torch.allclose(g, rg, rtol=1e-9, atol=1e-12)


def test_elas_dense_warmup_then_sparse():
    module = _build(_cfg("ffn.kind=elas", "ffn.elas_warmup_steps=2"))
    seen = []
    module.linear_fc2.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    x = _input(seed=6)
    zeros_per_group = []
    for step in range(4):
        module.on_train_step(step)
        module(x)
        y = seen[-1].reshape(-1, 4)
        h = module.linear_fc1(x)[0].detach().reshape(-1, 4)
        zeros_per_group.append(bool(((y == 0) == (h <= 0)).all()))
    # Steps 0, 1: plain ReLU² (zeros exactly where h <= 0). Steps 2, 3: 2:4 drops positive entries too.
    assert zeros_per_group == [True, True, False, False]
    assert module.sparsity_active


# ------------------------------------------------------------------------------------ low-rank

def test_lowrank_linears_compose_and_initialise_to_the_target_std():
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from effdist.model.gpt import transformer_config
    from effdist.model.lowrank import LowRankColumnParallelLinear, LowRankRowParallelLinear

    cfg = _cfg()
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.ffn, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    col = build_module(ModuleSpec(LowRankColumnParallelLinear, params={"rank": 16}), 256, 384, config=tcfg,
                       init_method=tcfg.init_method, bias=False, gather_output=False, skip_bias_add=True)
    row = build_module(ModuleSpec(LowRankRowParallelLinear, params={"rank": 16}), 384, 256, config=tcfg,
                       init_method=tcfg.output_layer_init_method, bias=True, input_is_parallel=True,
                       skip_bias_add=True)
    w_col = col.factor_out.weight @ col.factor_in.weight
    w_row = row.factor_out.weight @ row.factor_in.weight
    assert w_col.std().item() == pytest.approx(tcfg.init_method_std, rel=0.1)
    assert w_row.std().item() == pytest.approx(tcfg.output_layer_init_method.keywords["std"], rel=0.1)
    assert sum(p.numel() for p in col.parameters()) == 16 * (256 + 384)
    x = torch.randn(5, 3, 256, requires_grad=True)
    h, bias = col(x)
    assert bias is None and torch.allclose(h, x @ w_col.t(), atol=1e-5)
    out, out_bias = row(h)
    assert out_bias is row.bias and torch.allclose(out, h @ w_row.t(), atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in [*col.parameters(), *row.parameters()] if p is not row.bias)
    with pytest.raises(ValueError, match="rank"):
        build_module(ModuleSpec(LowRankColumnParallelLinear, params={"rank": 300}), 256, 384, config=tcfg,
                     init_method=tcfg.init_method, bias=False)


# ------------------------------------------------------------------------------------ registry

def test_registry_builds_each_kind_and_mixed_layers():
    from effdist.model.ffn.channel import MixtureOfChannelsMLP, TopKMLP
    from effdist.model.ffn.dense import ReLU2MLP, SwiGLUMLP
    from effdist.model.ffn.elas import ElasMLP
    from effdist.model.lowrank import LowRankColumnParallelLinear

    kinds = {"relu2": ReLU2MLP, "topk": TopKMLP, "moc": MixtureOfChannelsMLP, "elas": ElasMLP}
    for kind, cls in kinds.items():
        assert type(_build(_cfg(f"ffn.kind={kind}"))) is cls
    # ELAS on layers 1 and 2 only: the others stay SwiGLU at ffn_hidden_size although the shared
    # TransformerConfig carries the ELAS width.
    cfg = _cfg("ffn.kind=elas", "ffn.layers=[1,2]", "ffn.elas_rank=8", "ffn.elas_warmup_steps=3")
    first, second = _build(cfg, 0), _build(cfg, 1)
    assert type(first) is SwiGLUMLP and first.linear_fc2.weight.shape == (H, FFN)
    assert type(second) is ElasMLP and second.warmup_steps == 3 and not second.sparsity_active
    assert isinstance(second.linear_fc1, LowRankColumnParallelLinear) and second.linear_fc1.rank == 8


def test_invalid_module_settings_are_rejected():
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from effdist.model.ffn.channel import MixtureOfChannelsMLP, TopKMLP
    from effdist.model.ffn.elas import ElasMLP
    from effdist.model.gpt import transformer_config

    cfg = _cfg()
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.ffn, torch.float32, torch.device("cpu"))
    subs = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    with pytest.raises(ValueError, match="top-k"):
        TopKMLP(tcfg, subs, k=FFN + 1, ffn_hidden_size=FFN)
    with pytest.raises(ValueError, match="divisible by 8"):
        MixtureOfChannelsMLP(tcfg, subs, k=8, structured=True, ffn_hidden_size=180)
    with pytest.raises(ValueError, match="straight-through"):
        ElasMLP(tcfg, subs, ste="sometimes", ffn_hidden_size=264)
    with pytest.raises(ValueError, match="divisible by 4"):
        ElasMLP(tcfg, subs, ffn_hidden_size=266)


def test_sharded_state_dicts_of_sparse_ffns():
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    meta = ensure_metadata_has_dp_cp_group(None)
    moc = _build(_cfg("ffn.kind=moc"))
    sd = moc.sharded_state_dict(prefix="mlp.", metadata=meta)
    # MoC keeps SwiGLU's fc1 layout, so it keeps megatron's [gate | up] checkpoint split too.
    assert isinstance(sd["mlp.linear_fc1.weight"], ShardedTensorFactory)
    elas = _build(_cfg("ffn.kind=elas", "ffn.elas_rank=16"))
    sd = elas.sharded_state_dict(prefix="mlp.", metadata=meta)
    for key, shape in [("mlp.linear_fc1.factor_in.weight", (16, H)), ("mlp.linear_fc1.factor_out.weight", (264, 16)),
                       ("mlp.linear_fc2.factor_in.weight", (16, 264)), ("mlp.linear_fc2.factor_out.weight", (H, 16))]:
        assert isinstance(sd[key], ShardedTensor) and tuple(sd[key].global_shape) == shape


@pytest.mark.parametrize("sets", [["ffn.kind=moc"], ["ffn.kind=topk"], ["ffn.kind=elas"],
                                  ["ffn.kind=elas", "ffn.elas_rank=16"]])
def test_sparse_ffns_defer_weight_gradients_with_split_linears(sets):
    """With the pipeline executor's B/W-split linears, B queues fc1/fc2's weight GEMMs (fc2's from the
    rebuilt compact input) and W computes the same gradients as a plain backward."""
    from megatron.core.transformer.spec_utils import build_module

    from effdist.model.ffn.registry import build_mlp_spec
    from effdist.model.gpt import transformer_config
    from effdist.pipeline.wgrad import WEIGHT_GRAD_STORE, SplitColumnParallelLinear, SplitRowParallelLinear

    cfg = _cfg(*sets)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.ffn, torch.float64, torch.device("cpu"))
    torch.manual_seed(0)
    plain = build_module(build_mlp_spec(cfg.ffn, cfg.model, 0), config=tcfg)
    torch.manual_seed(0)
    split = build_module(build_mlp_spec(cfg.ffn, cfg.model, 0, SplitColumnParallelLinear, SplitRowParallelLinear),
                         config=tcfg)
    x = _input(seed=7, dtype=torch.float64)
    out, _ = plain(x)
    out.sum().backward()
    key = ("ffn", 0)
    with WEIGHT_GRAD_STORE.deferring(key):
        out_split, _ = split(x.detach())
        out_split.sum().backward()
    deferred = [name for name, p in split.named_parameters() if p.grad is None]
    assert deferred, "no weight gradient was deferred"
    assert WEIGHT_GRAD_STORE.run(key) == len(deferred)
    assert torch.equal(out_split, out)
    for (name, p), q in zip(plain.named_parameters(), split.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-12, atol=1e-15), name


def test_select_method_reaches_the_module_and_a_wrong_one_is_named():
    """ffn.select_method (the fused top-K kernel's threshold search on GPU) is each MoC / top-k module's; a value
    outside bisect/bisect4/radix is one line naming the key."""
    from effdist.config import ConfigError

    for kind in ("moc", "topk"):
        assert _build(_cfg(f"ffn.kind={kind}", "ffn.select_method=radix")).select_method == "radix"
        assert _build(_cfg(f"ffn.kind={kind}", "ffn.select_method=bisect4")).select_method == "bisect4"
        assert _build(_cfg(f"ffn.kind={kind}")).select_method == "bisect"
    with pytest.raises(ConfigError, match="ffn.select_method.*heap.*valid: bisect, bisect4, radix"):
        _cfg("ffn.kind=moc", "ffn.select_method=heap")
    assert _build(_cfg("ffn.kind=moc", "ffn.save_selection=indices")).save_selection == "indices"
    with pytest.raises(ConfigError, match="ffn.save_selection.*bits.*valid: mask, indices"):
        _cfg("ffn.kind=topk", "ffn.save_selection=bits")
