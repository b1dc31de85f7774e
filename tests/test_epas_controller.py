"""EPAS schedule (pure function of the step), named errors for invalid settings, and the controller:
region switching, frozen Wq/Wk rows under AdamW (weights, master weights, Adam moments), checkpoint
state and inference regions."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effdist.config import ConfigError, EpasConfig, load_config
from effdist.epas import (
    EpasController,
    EpasError,
    blend_factors,
    boundary_needs_qk,
    check_schedule,
    current_region,
    join_step,
    qk_uses,
    region_size,
    set_region,
    sharing_layers,
    steps_to_final_region,
)
from effdist.model.gpt import build_gpt


@pytest.fixture(scope="module", autouse=True)
def megatron_one_process(megatron_one_process):
    yield

def epas(**kw) -> EpasConfig:
    return EpasConfig(enabled=True, **kw)


# ---------------------------------------------------------------------- schedule

def test_progressive_deep_to_shallow_grows_by_groups():
    e = epas(start_step=10, interval=5, group_size=2, final_region=5)
    got = {s: sorted(sharing_layers(e, 8, s)) for s in (0, 9, 10, 14, 15, 19, 20, 100)}
    assert got == {0: [], 9: [], 10: [6, 7], 14: [6, 7], 15: [4, 5, 6, 7], 19: [4, 5, 6, 7],
                   20: [3, 4, 5, 6, 7], 100: [3, 4, 5, 6, 7]}
    assert steps_to_final_region(e, 8) == 20


def test_shallow_to_deep_starts_at_layer_one():
    e = epas(start_step=0, interval=1, group_size=1, final_region=3, direction="shallow_to_deep")
    assert [sorted(sharing_layers(e, 6, s)) for s in range(4)] == [[1], [1, 2], [1, 2, 3], [1, 2, 3]]


def test_fixed_region_and_fractions():
    e = epas(mode="fixed", final_region=0.5)
    assert sharing_layers(e, 24, 0) == frozenset(range(12, 24))
    assert sharing_layers(epas(mode="fixed", final_region=0.75, start_step=3), 16, 2) == frozenset()
    assert sharing_layers(epas(mode="fixed", final_region=0.75, start_step=3), 16, 3) == frozenset(range(4, 16))
    assert sharing_layers(EpasConfig(enabled=False), 16, 1000) == frozenset()


@settings(max_examples=200, deadline=None)
@given(num_layers=st.integers(2, 40), start=st.integers(0, 50), interval=st.integers(1, 20),
       group=st.integers(1, 8), final=st.integers(1, 39), direction=st.sampled_from(["deep_to_shallow", "shallow_to_deep"]),
       steps=st.lists(st.integers(0, 500), min_size=2, max_size=6))
def test_schedule_properties(num_layers, start, interval, group, final, direction, steps):
    final = min(final, num_layers - 1)
    e = epas(start_step=start, interval=interval, group_size=group, final_region=final, direction=direction)
    previous = frozenset()
    for s in sorted(steps):
        region = sharing_layers(e, num_layers, s)
        assert 0 not in region
        assert len(region) <= final and len(region) == region_size(e, num_layers, s)
        assert region >= previous, "the region only grows"
        if region:
            assert sorted(region) == list(range(min(region), max(region) + 1)), "contiguous"
            assert (max(region) == num_layers - 1) if direction == "deep_to_shallow" else (min(region) == 1)
        assert (len(region) == 0) == (s < start)
        previous = region
    assert len(sharing_layers(e, num_layers, steps_to_final_region(e, num_layers))) == final
    assert region_size(e, num_layers, max(0, steps_to_final_region(e, num_layers) - 1)) < final or \
        steps_to_final_region(e, num_layers) == start


@settings(max_examples=100, deadline=None)
@given(num_layers=st.integers(2, 24), start=st.integers(0, 30), interval=st.integers(1, 10),
       group=st.integers(1, 4), final=st.integers(1, 23), span=st.integers(0, 12),
       direction=st.sampled_from(["deep_to_shallow", "shallow_to_deep"]), mode=st.sampled_from(["progressive", "fixed"]))
def test_join_steps_and_transitions_follow_the_region(num_layers, start, interval, group, final, span, direction, mode):
    final = min(final, num_layers - 1)
    e = epas(start_step=start, interval=interval, group_size=group, final_region=final, direction=direction,
             mode=mode, transition_steps=span)
    last = steps_to_final_region(e, num_layers) + 2
    for s in range(last):
        region = sharing_layers(e, num_layers, s)
        # A layer shares exactly from its join step on.
        assert region == {i for i in range(num_layers) if join_step(e, num_layers, i) is not None
                          and join_step(e, num_layers, i) <= s}
        blending = blend_factors(e, num_layers, s)
        assert not (blending.keys() & region) and 0 not in blending
        for layer, weight in blending.items():
            joins = join_step(e, num_layers, layer)
            assert joins - span <= s < joins and 0 < weight < 1
            # The weight rises by 1/(span+1) per step and would reach 1 at the join step.
            assert weight == pytest.approx(1 - (joins - s) / (span + 1))
        if span == 0:
            assert blending == {}
        else:  # every layer about to join (within span steps) is in transition
            assert blending.keys() == {i for i in range(1, num_layers) if join_step(e, num_layers, i) is not None
                                       and s < join_step(e, num_layers, i) <= s + span}


def test_transition_weights_of_one_layer():
    e = epas(start_step=10, interval=5, group_size=1, final_region=2, transition_steps=3)
    assert [blend_factors(e, 8, s) for s in range(6, 16)] == [
        {}, {7: 0.25}, {7: 0.5}, {7: 0.75}, {}, {}, {6: 0.25}, {6: 0.5}, {6: 0.75}, {}]


def test_boundary_needs_qk():
    region = frozenset({5, 6, 7})
    assert boundary_needs_qk(region, 5) and boundary_needs_qk(region, 6)
    assert not boundary_needs_qk(region, 4) and not boundary_needs_qk(frozenset(), 4)


# ---------------------------------------------------------------------- invalid settings

@pytest.mark.parametrize("override, field", [
    ("epas.interval=0", "epas.interval"),
    ("epas.group_size=0", "epas.group_size"),
    ("epas.start_step=-1", "epas.start_step"),
    ("epas.final_region=4", "epas.final_region"),      # 4 layers: at most 3 can share
    ("epas.final_region=0", "epas.final_region"),
    ("epas.mode=sometimes", "epas.mode"),
    ("epas.direction=sideways", "epas.direction"),
    ("epas.inference_region=4", "epas.inference_region"),
    ("epas.transition_steps=-1", "epas.transition_steps"),
    ("epas.anchor_grad=median", "epas.anchor_grad"),
    ("epas.anchor_grad=mean train.engine=deepspeed", "epas.anchor_grad"),
])
def test_config_validation_names_the_field(override, field, monkeypatch):
    # train.engine=deepspeed first checks that DeepSpeed imports; a stand-in module lets the EPAS check
    # run (and be tested) whether or not the optional DeepSpeed is installed.
    monkeypatch.setitem(sys.modules, "deepspeed", sys.modules.get("deepspeed") or types.ModuleType("deepspeed"))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["epas.enabled=true", "model.num_layers=4", *override.split()])


@pytest.mark.parametrize("kw, field", [
    ({"mode": "sometimes"}, "epas.mode"),
    # adaptive is implemented (tests/test_epas_adaptive.py); it grows from the deep end only and needs its
    # transitions shorter than the probe interval.
    ({"mode": "adaptive", "direction": "shallow_to_deep"}, "epas.direction"),
    ({"mode": "adaptive", "interval": 2, "transition_steps": 2}, "epas.transition_steps"),
    ({"similarity_threshold": 1.5}, "epas.similarity_threshold"),
    ({"final_region": 0.1}, "epas.final_region"),     # 10% of 4 layers rounds to 0
    ({"final_region": 2.5}, "epas.final_region"),     # a count must be whole
    ({"final_region": 4}, "epas.final_region"),
    ({"interval": 0}, "epas.interval"),
    ({"group_size": 0}, "epas.group_size"),
    ({"transition_steps": 2.5}, "epas.transition_steps"),
])
def test_schedule_check_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_schedule(epas(**kw), 4)


def test_adaptive_mode_passes_the_schedule_check():
    check_schedule(epas(mode="adaptive", final_region=3, interval=2, transition_steps=1), 4)


# ---------------------------------------------------------------------- controller

def make_cfg(*overrides: str):
    base = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=96", "model.vocab_size=128", "epas.enabled=true", "epas.start_step=1",
            "epas.interval=2", "epas.group_size=1", "epas.final_region=3", "optim.weight_decay=0.1"]
    return load_config(None, base + list(overrides))


def build(cfg, dtype=torch.float32, seed=5):
    from effdist.runtime.distributed import _seed_cpu_tracker

    torch.manual_seed(seed)
    _seed_cpu_tracker(seed)
    return build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, dtype, torch.device("cpu"))


def qk_rows(t: torch.Tensor, cfg) -> torch.Tensor:
    m = cfg.model
    qpg = m.num_attention_heads // m.num_query_groups
    return t.view(m.num_query_groups, qpg + 2, m.hidden_size // m.num_attention_heads, -1)[:, : qpg + 1]


def v_rows(t: torch.Tensor, cfg) -> torch.Tensor:
    m = cfg.model
    qpg = m.num_attention_heads // m.num_query_groups
    return t.view(m.num_query_groups, qpg + 2, m.hidden_size // m.num_attention_heads, -1)[:, qpg + 1]


def train_step(model, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (2, 16), generator=g)
    positions = torch.arange(16).unsqueeze(0).expand(2, 16)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).float().mean()
    loss.backward()


def snapshot(model, state_of, cfg):
    """Per layer: the Q/K rows and V rows of the fused weight (and of its master + Adam moments)."""
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        w = layer.self_attention.linear_qkv.weight
        tensors = {"weight": w.detach()}
        master, state = state_of(w)
        if master is not w:
            tensors["master"] = master.detach()
        tensors.update({k: v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")})
        out[i] = {k: (qk_rows(t, cfg).clone(), v_rows(t, cfg).clone()) for k, t in tensors.items()}
    return out


def check_frozen_rows(model, optimizer, state_of, step_fn, cfg, controller, steps=7, expect_state_keys=2):
    sharing_steps = {}
    for step in range(steps):
        region = controller.begin_step(step)
        assert region == len(sharing_layers(cfg.epas, 4, step))
        before = snapshot(model, state_of, cfg)
        step_fn(step)
        controller.after_optimizer_step(optimizer)
        after = snapshot(model, state_of, cfg)
        for i in range(4):
            if step > 0:
                assert len([k for k in after[i] if k.startswith("exp_")]) == expect_state_keys
            for name, (qk_after, v_after) in after[i].items():
                qk_before, v_before = before[i].get(name, (torch.zeros_like(qk_after), None))
                if i in controller.sharing_layers:
                    assert torch.equal(qk_after, qk_before), f"step {step} layer {i} {name}: Q/K rows moved"
                    sharing_steps.setdefault(i, 0)
                else:
                    assert not torch.equal(qk_after, qk_before), f"step {step} layer {i} {name}: Q/K rows frozen"
                if v_before is not None:
                    assert not torch.equal(v_after, v_before), f"step {step} layer {i} {name}: V rows did not train"
        for i in controller.sharing_layers:
            sharing_steps[i] += 1
    assert sharing_steps == {3: 6, 2: 4, 1: 2}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("optimizer_known_from_start", [True, False])
def test_controller_keeps_wq_wk_rows_and_adam_state_bit_identical(fused, optimizer_known_from_start):
    cfg = make_cfg()
    model = build(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
    controller = EpasController(cfg, [model], optimizer=optimizer if optimizer_known_from_start else None)

    def state_of(w):
        return w, optimizer.state.get(w, {})

    def step_fn(step):
        train_step(model, step)
        optimizer.step()

    check_frozen_rows(model, optimizer, state_of, step_fn, cfg, controller)


@pytest.mark.parametrize("fused", [False, True])
def test_controller_with_master_weight_adamw_on_a_bf16_model(fused):
    """fused: the optimizer leaves the rows alone itself (freeze_rows); unfused: the controller restores them.
    Either way, and although the optimizer is first seen after a sharing step, the rows stay bit-identical."""
    from effdist.train.optim import MasterWeightAdamW

    cfg = make_cfg("epas.start_step=0")
    model = build(cfg, dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = MasterWeightAdamW(params, cfg.optim, fused=fused, tp_rank=0)
    # As the trainer builds it today: no optimizer given; the region is non-empty at step 0.
    controller = EpasController(cfg, [model])

    def state_of(w):
        return optimizer.master_of(w), optimizer.state_of(w)

    def step_fn(step):
        train_step(model, step)
        optimizer.collect_grads()
        optimizer.step(lr=1e-2)

    sharing_steps = {}
    for step in range(6):
        controller.begin_step(step)
        before = snapshot(model, state_of, cfg)
        step_fn(step)
        controller.after_optimizer_step(optimizer)
        after = snapshot(model, state_of, cfg)
        for i in controller.sharing_layers:
            for name, (qk_after, _) in after[i].items():
                qk_before = before[i][name][0] if name in before[i] else torch.zeros_like(qk_after)
                assert torch.equal(qk_after, qk_before), f"step {step} layer {i} {name}"
            sharing_steps[i] = sharing_steps.get(i, 0) + 1
        for i in set(range(4)) - controller.sharing_layers:
            assert not torch.equal(after[i]["master"][0], before[i]["master"][0])
        for i in controller.sharing_layers:
            assert not torch.equal(after[i]["master"][1], before[i]["master"][1]), "V rows train"
    assert sharing_steps == {3: 6, 2: 4, 1: 2}
    assert len(optimizer._trainable_pieces) == (3 if fused else 0)


def test_controller_without_optimizer_snapshot_refuses_an_inexact_restore():
    """A controller that first meets a used optimizer after a sharing step cannot restore exactly."""
    cfg = make_cfg("epas.start_step=2")
    model = build(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        train_step(model, step)
        optimizer.step()
    controller = EpasController(cfg, [model])  # e.g. rebuilt on resume without the optimizer
    assert controller.begin_step(2) == 1
    train_step(model, 2)
    optimizer.step()
    with pytest.raises(EpasError, match="optimizer=optimizer"):
        controller.after_optimizer_step(optimizer)


def test_switched_this_step_and_state_dict_round_trip():
    cfg = make_cfg()
    model = build(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = EpasController(cfg, [model], optimizer=optimizer)
    switched = []
    for step in range(6):
        controller.begin_step(step)
        switched.append(controller.switched_this_step)
        assert current_region([model]) == controller.sharing_layers
    assert switched == [True, True, False, True, False, True]
    state = controller.state_dict()
    assert state["step"] == 5 and state["region"] == 3 and state["sharing_layers"] == [1, 2, 3]

    resumed_model = build(cfg)
    resumed = EpasController(cfg, [resumed_model], optimizer=torch.optim.AdamW(resumed_model.parameters()))
    resumed.load_state_dict(state)
    assert resumed.sharing_layers == frozenset({1, 2, 3}) and current_region([resumed_model]) == {1, 2, 3}
    assert resumed.begin_step(6) == 3 and resumed.switched_this_step  # first step of the process

    other = EpasController(make_cfg("epas.interval=10"), [build(cfg)])
    with pytest.raises(EpasError, match="schedule"):
        other.load_state_dict(state)
    # Same region at that step, but another transition length would blend differently from there on.
    blended = EpasController(make_cfg("epas.transition_steps=1"), [build(cfg)])
    with pytest.raises(EpasError, match="trained with epas.transition_steps = 0"):
        blended.load_state_dict(state)


def test_qk_uses_count_every_layer_that_attends_with_the_q_k():
    assert qk_uses(8, frozenset(), {}) == {}
    assert qk_uses(8, frozenset({5, 6, 7}), {}) == {4: 4.0}
    # Layer 4 blends half of layer 3's Q/K into its own; layers 5-7 use that blend.
    assert qk_uses(8, frozenset({5, 6, 7}), {4: 0.5}) == {3: 1.0 + 4 * 0.5, 4: 4.0}
    assert qk_uses(8, frozenset(), {7: 0.25}) == {6: 1.25}


@pytest.mark.parametrize("anchor_grad", ["sum", "mean"])
def test_mean_anchor_grad_divides_only_the_shared_q_k_rows(anchor_grad):
    cfg = make_cfg(f"epas.anchor_grad={anchor_grad}", "epas.transition_steps=1")
    model = build(cfg)
    controller = EpasController(cfg, [model])
    controller.begin_step(2)  # layer 3 shares, layer 2 blends in half of layer 1's Q/K
    assert controller.sharing_layers == {3} and controller.blending == {2: 0.5}
    train_step(model, 0)
    before = {i: layer.self_attention.linear_qkv.weight.grad.clone() for i, layer in enumerate(model.decoder.layers)}
    controller.scale_shared_qk_grads()
    uses = {1: 1.0 + 0.5 + 0.5, 2: 2.0} if anchor_grad == "mean" else {}
    for i, layer in enumerate(model.decoder.layers):
        grad = layer.self_attention.linear_qkv.weight.grad
        torch.testing.assert_close(qk_rows(grad, cfg), qk_rows(before[i], cfg) / uses.get(i, 1.0), rtol=0, atol=0)
        assert torch.equal(v_rows(grad, cfg), v_rows(before[i], cfg))
    assert qk_rows(before[3], cfg).abs().sum() == 0  # the sharing layer's own Wq/Wk got no gradient


def test_set_region_for_inference():
    cfg = make_cfg()
    model = build(cfg)
    for n in range(4):
        assert set_region([model], n) == frozenset(range(4 - n, 4))
        assert current_region([model]) == frozenset(range(4 - n, 4))
    with pytest.raises(ValueError, match="num_layers-1"):
        set_region([model], 4)
    assert set_region([model], 2, direction="shallow_to_deep") == {1, 2}


def test_sharing_rows_have_zero_moments_and_get_them_back_when_leaving_the_region():
    """While a layer shares, its Wq/Wk Adam moments are zero (so AdamW leaves those rows alone but for weight
    decay, which the controller undoes); a layer that leaves the region trains on from the moments it had."""
    cfg = make_cfg("epas.start_step=2", "epas.interval=100")
    model = build(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    controller = EpasController(cfg, [model], optimizer=optimizer)
    weight = model.decoder.layers[3].self_attention.linear_qkv.weight
    for step in range(2):
        controller.begin_step(step)
        train_step(model, step)
        optimizer.step()
        controller.after_optimizer_step(optimizer)
    moments = {k: qk_rows(optimizer.state[weight][k], cfg).clone() for k in ("exp_avg", "exp_avg_sq")}
    assert all(m.abs().sum() > 0 for m in moments.values())
    controller.begin_step(2)
    assert controller.sharing_layers == {3}
    for step in (2, 3):
        train_step(model, step)
        optimizer.step()
        controller.after_optimizer_step(optimizer)
        for k in moments:
            assert torch.count_nonzero(qk_rows(optimizer.state[weight][k], cfg)) == 0, k
    controller.close()  # leaving the region (no training schedule shrinks it)
    for k, m in moments.items():
        assert torch.equal(qk_rows(optimizer.state[weight][k], cfg), m), k


def test_fused_master_weight_adamw_updates_only_the_trainable_pieces():
    """freeze_rows: the frozen rows of weight, master and moments are left exactly as they were (no weight
    decay, no moment decay), and everything else gets bit for bit what torch's fused AdamW step gives for
    the same gradients."""
    from effdist.train.optim import MasterWeightAdamW

    cfg = make_cfg("optim.weight_decay=0.1")
    models = [build(cfg, dtype=torch.bfloat16) for _ in range(2)]
    optimizers = [MasterWeightAdamW([p for p in m.parameters() if p.requires_grad], cfg.optim, fused=True, tp_rank=0)
                  for m in models]
    frozen, reference = (m.decoder.layers[2].self_attention.linear_qkv.weight for m in models)

    def v_pieces(t):
        return list(v_rows(t, cfg).unbind(0))

    lists = []
    for step in range(5):
        if step == 1:
            assert optimizers[0].freeze_rows(frozen, v_pieces)
        master = optimizers[0].master_of(frozen)
        before = {"weight": frozen.detach().clone(), "master": master.detach().clone()}
        before.update({k: v.clone() for k, v in optimizers[0].state_of(frozen).items() if k.startswith("exp_")})
        train_step(models[0], step)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            # The same gradients for both, in persistent fp32 buffers as megatron DDP keeps them (so the
            # optimizer's cached piece lists are reused from step to step).
            for p in (a, b):
                if not hasattr(p, "main_grad"):
                    p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
                p.main_grad.copy_(a.grad)
        for optimizer in optimizers:
            optimizer.collect_grads()
            optimizer.step(lr=1e-2)
        after = {"weight": frozen, "master": master, **optimizers[0].state_of(frozen)}
        for name, a, b in zip([n for n, _ in models[0].named_parameters()], models[0].parameters(),
                              models[1].parameters()):
            if a is not frozen or step == 0:
                assert torch.equal(a, b), (step, name)
        if step == 0:
            continue
        assert torch.equal(v_rows(frozen, cfg), v_rows(reference, cfg)), "V rows: torch's fused AdamW update"
        for k, was in before.items():
            assert torch.equal(qk_rows(after[k], cfg), qk_rows(was, cfg)), (step, k)
            assert not torch.equal(v_rows(after[k], cfg), v_rows(was, cfg)), (step, k)
        assert not torch.equal(qk_rows(frozen, cfg), qk_rows(reference, cfg)), "the reference does move them"
        if step >= 2:
            lists.append(optimizers[0]._step_tensor_cache[0][1])
    assert all(t is lists[0] for t in lists), "the piece lists are built once and reused while nothing changes"
    unfused = MasterWeightAdamW([torch.nn.Parameter(torch.zeros(2, 2))], cfg.optim, fused=False, tp_rank=0)
    assert not unfused.freeze_rows(frozen, v_pieces), "torch's unfused AdamW cannot"


def test_the_start_line_says_when_the_final_region_is_reached_or_that_it_is_not():
    from effdist.epas.schedule import describe_plan

    cfg = load_config(None, ["epas.enabled=true", "model.num_layers=4", "epas.interval=20", "epas.final_region=2"])
    assert describe_plan(cfg.epas, 4, 60).endswith("to region 2 (2 of 4 layers) at step 21")
    short = describe_plan(cfg.epas, 4, 10)
    assert "train.steps = 10, so it ends at region 1 without reaching it" in short
