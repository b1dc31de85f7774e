"""EPAS shared-QK layers on CPU, one process: exactness against the dense model, a hand-written
reference of the whole model's forward and gradients, recompute, and the pipeline-chunk hand-over."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effdist.config import load_config
from effdist.epas import EpasError, apply_region, boundary_needs_qk, pop_exported_qk, qk_context_shape
from effdist.model.gpt import build_gpt

SEQ, BATCH = 16, 2


@pytest.fixture(scope="module", autouse=True)
def megatron_one_process(megatron_one_process):
    yield

def make_cfg(*overrides: str, epas: bool = True):
    base = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=96", "model.vocab_size=128"]
    return load_config(None, base + (["epas.enabled=true", "epas.final_region=3"] if epas else []) + list(overrides))


def build(cfg, seed: int = 7, **kwargs):
    from effdist.runtime.distributed import _seed_cpu_tracker

    torch.manual_seed(seed)
    _seed_cpu_tracker(seed)
    return build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"),
                     **kwargs)


def batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 128, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return tokens, positions, labels


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def qkv_blocks(weight, cfg):
    m = cfg.model
    groups, heads_per_group = m.num_query_groups, m.num_attention_heads // m.num_query_groups
    head_dim = m.hidden_size // m.num_attention_heads
    return weight.view(groups, heads_per_group + 2, head_dim, -1), heads_per_group


# ---------------------------------------------------------------------- hand-written reference model

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, base):
    """x: [b, heads, s, d]; rotate-half RoPE with positions 0..s-1."""
    s, d = x.shape[2], x.shape[3]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def reference_loss(params: dict[str, torch.Tensor], tokens, labels, cfg, region: set[int],
                   blending: dict[int, float] | None = None) -> torch.Tensor:
    """The LLaMA forward written out by hand; a layer in `region` uses the Q/K of the layer before it, a
    layer in `blending` mixes its own Q/K with those: (1 - a) * own + a * previous."""
    blending = blending or {}
    m = cfg.model
    nh, ng, hidden = m.num_attention_heads, m.num_query_groups, m.hidden_size
    hd, qpg = hidden // nh, nh // ng
    b, s = tokens.shape
    x = params["embedding.word_embeddings.weight"][tokens]
    previous_qk = None
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        h = _rms(x, params[p + "input_layernorm.weight"], m.norm_eps)
        w = params[p + "self_attention.linear_qkv.weight"].view(ng, qpg + 2, hd, hidden)
        wq, wk, wv = (w[:, :qpg].reshape(-1, hidden), w[:, qpg].reshape(-1, hidden), w[:, qpg + 1].reshape(-1, hidden))
        v = (h @ wv.T).view(b, s, ng, hd).transpose(1, 2)
        if i in region:
            q, k = previous_qk
        else:
            q = _rope((h @ wq.T).view(b, s, nh, hd).transpose(1, 2), m.rotary_base)
            k = _rope((h @ wk.T).view(b, s, ng, hd).transpose(1, 2), m.rotary_base)
            if i in blending:
                a = blending[i]
                q, k = (1 - a) * q + a * previous_qk[0], (1 - a) * k + a * previous_qk[1]
        previous_qk = (q, k)
        k_all, v_all = k.repeat_interleave(qpg, dim=1), v.repeat_interleave(qpg, dim=1)
        scores = (q @ k_all.transpose(-1, -2)) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (probs @ v_all).transpose(1, 2).reshape(b, s, nh * hd)
        x = x + attn @ params[p + "self_attention.linear_proj.weight"].T
        h2 = _rms(x, params[p + "pre_mlp_layernorm.weight"], m.norm_eps)
        gate, up = (h2 @ params[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ params[p + "mlp.linear_fc2.weight"].T
    x = _rms(x, params["decoder.final_layernorm.weight"], m.norm_eps)
    logits = x @ params["output_layer.weight"].T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# ---------------------------------------------------------------------- tests

def test_region_zero_is_the_dense_model_exactly():
    dense, epas = build(make_cfg(epas=False)), build(make_cfg())
    dense_sd, epas_sd = dense.state_dict(), epas.state_dict()
    assert dense_sd.keys() == epas_sd.keys()
    for k, v in dense_sd.items():
        if torch.is_tensor(v):
            assert torch.equal(v, epas_sd[k]), k
    tokens, positions, labels = batch()
    apply_region([epas], set())
    loss_d = dense(tokens, positions, None, labels=labels).mean()
    loss_e = epas(tokens, positions, None, labels=labels).mean()
    assert torch.equal(loss_d, loss_e)
    loss_d.backward()
    loss_e.backward()
    gd, ge = grads(dense), grads(epas)
    for k in gd:
        assert torch.equal(gd[k], ge[k]), k


def test_exporting_layer_output_is_unchanged():
    """The anchor (which packs its post-RoPE Q/K for the next layer) computes exactly what it did."""
    cfg = make_cfg()
    dense, epas = build(make_cfg(epas=False)), build(cfg)
    tokens, positions, _ = batch()
    apply_region([epas], {3})  # layer 2 becomes the anchor; layers 0..2 must be untouched
    assert epas.decoder.layers[2].self_attention.exports_qk
    hidden = {}
    for name, model in (("dense", dense), ("epas", epas)):
        model.decoder.layers[2].register_forward_hook(lambda mod, inp, out, name=name: hidden.__setitem__(name, out[0]))
        model(tokens, positions, None)
    assert torch.equal(hidden["dense"], hidden["epas"])


def test_sharing_layer_equals_dense_layer_fed_previous_qk():
    cfg = make_cfg()
    dense, epas = build(make_cfg(epas=False)), build(cfg)
    tokens, positions, _ = batch()
    apply_region([epas], {2})

    # The dense layer 2 is fed layer 1's (pre-RoPE) Q/K: its own forward then applies the same RoPE.
    captured = {}
    attn1, attn2 = dense.decoder.layers[1].self_attention, dense.decoder.layers[2].self_attention
    own_qkv1, own_qkv2 = attn1.get_query_key_value_tensors, attn2.get_query_key_value_tensors

    def layer1_qkv(*a, **k):
        q, key, v = own_qkv1(*a, **k)
        captured["qk"] = (q, key)
        return q, key, v

    def layer2_qkv(*a, **k):
        _, _, v = own_qkv2(*a, **k)
        return (*captured["qk"], v)

    attn1.get_query_key_value_tensors, attn2.get_query_key_value_tensors = layer1_qkv, layer2_qkv
    outputs, inputs = {}, {}
    for name, model in (("dense", dense), ("epas", epas)):
        layer = model.decoder.layers[2]
        layer.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out[0]))
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: inputs.__setitem__(name, kwargs["hidden_states"]), with_kwargs=True)
        model(tokens, positions, None)
    assert torch.equal(inputs["dense"], inputs["epas"])
    torch.testing.assert_close(outputs["epas"], outputs["dense"], rtol=1e-6, atol=1e-6)
    # ... and differs from the layer computing its own Q/K, so the comparison above can fail.
    attn2.get_query_key_value_tensors = own_qkv2
    dense(tokens, positions, None)
    assert (outputs["dense"] - outputs["epas"]).abs().max() > 1e-4


@pytest.mark.parametrize("region, blending", [({3}, {}), ({2, 3}, {}), ({1, 2, 3}, {}),
                                              (set(), {3: 0.5}), ({3}, {2: 0.25}), ({3}, {1: 0.4, 2: 0.8})])
def test_whole_model_matches_hand_written_reference(region, blending):
    cfg = make_cfg()
    model = build(cfg)
    tokens, positions, labels = batch()
    apply_region([model], region, blending)
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref = reference_loss(params, tokens, labels, cfg, region, blending)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # The reference itself tells regions apart (the check is not vacuous): without sharing (or with the
    # transition layers' weights changed), the first such layer's Wq/Wk gradient would differ far above
    # the tolerance.
    other_params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    reference_loss(other_params, tokens, labels, cfg, set() if not blending else region,
                   {i: a / 2 for i, a in blending.items()}).backward()
    name = f"decoder.layers.{min(region | blending.keys())}.self_attention.linear_qkv.weight"
    assert (other_params[name].grad - params[name].grad).abs().max() > 100 * 1e-6


def test_sharing_layers_get_no_wq_wk_gradient():
    cfg = make_cfg()
    model = build(cfg)
    tokens, positions, labels = batch()
    apply_region([model], {2, 3})
    model(tokens, positions, None, labels=labels).mean().backward()
    for i, layer in enumerate(model.decoder.layers):
        blocks, qpg = qkv_blocks(layer.self_attention.linear_qkv.weight.grad, cfg)
        qk_grad, v_grad = blocks[:, : qpg + 1], blocks[:, qpg + 1]
        if i in (2, 3):
            assert torch.count_nonzero(qk_grad) == 0, f"layer {i}"
        else:
            assert torch.count_nonzero(qk_grad) > 0, f"layer {i}"
        assert torch.count_nonzero(v_grad) > 0, f"layer {i}"


def test_under_megatron_ddp_sharing_layers_accumulate_v_rows_straight_into_main_grad():
    """Under DDP the V rows' gradient goes into main_grad directly (two microbatches, so it accumulates);
    the result must equal plain autograd's gradients, with Wq/Wk rows of sharing layers exactly zero."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    region = {2, 3}
    plain, wrapped_model = build(make_cfg()), build(make_cfg())
    for model in (plain, wrapped_model):
        apply_region([model], region)
    ddp = DistributedDataParallel(config=wrapped_model.config, module=wrapped_model,
                                  ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    ddp.zero_grad_buffer()
    for seed in (3, 4):
        tokens, positions, labels = batch(seed)
        plain(tokens, positions, None, labels=labels).mean().backward()
        ddp(tokens, positions, None, labels=labels).mean().backward()
    ddp.finish_grad_sync()
    for (name, p), q in zip(plain.named_parameters(), wrapped_model.parameters()):
        torch.testing.assert_close(q.main_grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    for i in region:
        weight = wrapped_model.decoder.layers[i].self_attention.linear_qkv.weight
        assert weight.grad_added_to_main_grad, f"layer {i}: the V rows did not take the direct route"
        blocks, qpg = qkv_blocks(weight.main_grad, make_cfg())
        assert torch.count_nonzero(blocks[:, : qpg + 1]) == 0 and torch.count_nonzero(blocks[:, qpg + 1]) > 0


def test_sharing_layer_multiplies_only_the_v_rows():
    """No full QKV GEMM in a sharing layer: linear_qkv's own forward is not called."""
    cfg = make_cfg()
    model = build(cfg)
    calls = []
    for i, layer in enumerate(model.decoder.layers):
        layer.self_attention.linear_qkv.register_forward_hook(lambda *a, i=i: calls.append(i))
    apply_region([model], {2, 3})
    tokens, positions, _ = batch()
    model(tokens, positions, None)
    assert calls == [0, 1]


def test_full_recompute_gives_the_same_loss_and_gradients():
    region = {1, 2, 3}
    plain, recomputed = build(make_cfg()), build(make_cfg("train.recompute=true"))
    assert recomputed.config.recompute_granularity == "full"
    tokens, positions, labels = batch()
    results = []
    for model in (plain, recomputed):
        apply_region([model], region)
        loss = model(tokens, positions, None, labels=labels).mean()
        loss.backward()
        results.append((loss.detach(), grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("region, blending", [({2, 3}, {}), ({1, 2, 3}, {}), ({3}, {}), ({3}, {2: 0.5}),
                                              ({2, 3}, {1: 0.3})])
@pytest.mark.parametrize("recompute", [False, True])
def test_pipeline_chunks_hand_over_qk(region, blending, recompute):
    """Two chunks [0, 1] and [2, 3]: seeding chunk 2's context and backpropagating chunk 1's exported
    Q/K gives the full model's loss and gradients (also when layer 2 is in transition)."""
    cfg = make_cfg(*(["train.recompute=true"] if recompute else []))
    full = build(cfg)
    first = build(cfg, layer_indices=[0, 1], post_process=False)
    second = build(cfg, layer_indices=[2, 3], pre_process=False)
    full_sd = full.state_dict()
    for chunk, offset in ((first, 0), (second, 2)):
        sd = {}
        for k in chunk.state_dict():
            src = k
            if k.startswith("decoder.layers."):
                idx, rest = k[len("decoder.layers."):].split(".", 1)
                src = f"decoder.layers.{int(idx) + offset}.{rest}"
            sd[k] = full_sd[src]
        chunk.load_state_dict(sd)
    tokens, positions, labels = batch()
    apply_region([full], region, blending)
    apply_region([first, second], region, blending)
    full_loss = full(tokens, positions, None, labels=labels).mean()
    full_loss.backward()

    needs_qk = boundary_needs_qk(frozenset(region) | blending.keys(), 2)
    assert needs_qk == (2 in region or 2 in blending)
    hidden = first(tokens, positions, None)
    qk = pop_exported_qk(first)
    assert (qk is not None) == needs_qk
    assert pop_exported_qk(first) is None, "pop forgets the exported tensor"
    hidden_in = hidden.detach().requires_grad_(True)
    second.set_input_tensor(hidden_in)
    extra = {}
    if needs_qk:
        assert tuple(qk.shape) == qk_context_shape(first.config, SEQ, BATCH)
        assert qk.requires_grad
        qk_in = qk.detach().requires_grad_(True)
        extra = {"context": qk_in}
    loss = second(tokens, positions, None, labels=labels, extra_block_kwargs=extra).mean()
    loss.backward()
    outputs, output_grads = [hidden], [hidden_in.grad]
    if needs_qk:
        assert qk_in.grad is not None and qk_in.grad.abs().sum() > 0
        outputs.append(qk)
        output_grads.append(qk_in.grad)
    torch.autograd.backward(outputs, output_grads)
    # The backward's re-forward (recompute) does not stash its internal Q/K on the module.
    assert first.decoder.layers[-1].exported_qk is None

    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    full_grads = grads(full)
    for chunk, offset in ((first, 0), (second, 2)):
        for k, p in chunk.named_parameters():
            src = k
            if k.startswith("decoder.layers."):
                idx, rest = k[len("decoder.layers."):].split(".", 1)
                src = f"decoder.layers.{int(idx) + offset}.{rest}"
            torch.testing.assert_close(p.grad, full_grads[src], rtol=1e-5, atol=1e-6, msg=src)


def test_sharing_first_layer_of_a_chunk_without_context_is_a_named_error():
    cfg = make_cfg()
    second = build(cfg, layer_indices=[2, 3], pre_process=False)
    apply_region([second], {2, 3})
    tokens, positions, labels = batch()
    second.set_input_tensor(torch.randn(SEQ, BATCH, cfg.model.hidden_size))
    with pytest.raises(EpasError, match="extra_block_kwargs"):
        second(tokens, positions, None, labels=labels)
    wrong = torch.randn(SEQ, BATCH, 3, 16)
    with pytest.raises(EpasError, match="shape"):
        second(tokens, positions, None, labels=labels, extra_block_kwargs={"context": wrong})


def test_layer_zero_cannot_share_and_dense_models_have_no_epas_layers():
    model = build(make_cfg())
    with pytest.raises(EpasError, match="layer 0"):
        apply_region([model], {0, 1})
    with pytest.raises(EpasError, match="epas.enabled"):
        apply_region([build(make_cfg(epas=False))], {1})


def test_invalid_transition_layers_are_named_errors():
    model = build(make_cfg())
    with pytest.raises(EpasError, match="layer 0"):
        apply_region([model], set(), {0: 0.5})
    with pytest.raises(EpasError, match=r"layers \[2\] are listed as sharing and as in transition"):
        apply_region([model], {2, 3}, {2: 0.5})
    with pytest.raises(EpasError, match=r"weight in \(0, 1\)"):
        apply_region([model], {3}, {2: 1.0})


def test_packed_qk_gradient_is_summed_over_its_readers():
    """Sharing layers reading one packed Q/K build one gradient in place (the last reader returns it): with a
    gradient arriving for the packed tensor from elsewhere too (a pipeline boundary), through a retained graph,
    and with a no-grad read (a checkpointed layer's first forward) that must not count."""
    from effdist.model.shared_qk import pack_qk, unpack_qk

    g = torch.Generator().manual_seed(0)
    q = torch.randn(SEQ, BATCH, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(SEQ, BATCH, 2, 8, generator=g, requires_grad=True)
    qk = pack_qk(q, k)
    with torch.no_grad():
        unpack_qk(qk, 4)
    readers = [(torch.randn(SEQ, BATCH, 4, 8, generator=g), torch.randn(SEQ, BATCH, 2, 8, generator=g))
               for _ in range(3)]
    loss = sum((qi * wq).sum() + (ki * wk).sum() for (wq, wk), (qi, ki) in zip(readers, [unpack_qk(qk, 4)
                                                                                        for _ in readers]))
    from_elsewhere = torch.randn(qk.shape, generator=g)
    torch.autograd.backward([loss, qk], [None, from_elsewhere], retain_graph=True)
    q_else, k_else = from_elsewhere.reshape(-1).split([q.numel(), k.numel()])
    want_q = sum(wq for wq, _ in readers) + q_else.view_as(q)
    want_k = sum(wk for _, wk in readers) + k_else.view_as(k)
    torch.testing.assert_close(q.grad, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k.grad, want_k, rtol=1e-6, atol=1e-6)
    loss.backward()  # again through the retained graph: every reader returns its own part
    torch.testing.assert_close(q.grad, 2 * want_q - q_else.view_as(q), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k.grad, 2 * want_k - k_else.view_as(k), rtol=1e-6, atol=1e-6)
