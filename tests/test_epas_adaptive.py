"""EPAS adaptive mode: the region grows at a probe step only when the candidate layers' Q/K are similar
enough to the Q/K they would share, as measured during that step and decided by global rank 0.

One process: the statistic against a direct cosine, the decision and its broadcast in a world of one,
the bookkeeping (probe steps, candidates, groups, transitions, final region) with injected similarities,
a probing layer computing exactly what a dense layer computes, checkpoint state, named config errors.
Real processes: the trainer with TP=1, TP=2 and PP=2 (probing and sharing across the stage boundary) and a
resume between a decision and its join; and a worker (this file) with layers built to be similar, so that
probes say yes twice and then no, under DP=2 and TP=2 where rank 1 alone would decide otherwise.

Worker: ``torchrun --nproc_per_node=N tests/test_epas_adaptive.py --out DIR LAYOUT...`` (LAYOUTS, in turn).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as the torchrun worker
    sys.path.insert(0, str(ROOT))

from tests.launching import clean_env, losses, run_train  # noqa: E402

MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=96", "model.vocab_size=128"]


def make_cfg(*overrides: str):
    from effdist.config import load_config

    return load_config(None, MODEL + ["epas.enabled=true", "epas.final_region=3", "optim.weight_decay=0.1",
                                      *overrides])


def build(cfg, seed: int = 5, **kwargs):
    from effdist.model.gpt import build_gpt
    from effdist.runtime.distributed import _seed_cpu_tracker

    torch.manual_seed(seed)
    _seed_cpu_tracker(seed)
    return build_gpt(cfg.model, cfg.parallel, cfg.train, cfg.ffn, cfg.epas, torch.float32, torch.device("cpu"),
                     **kwargs)


def batch(seed: int, rows: int = 2, seq: int = 16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (rows, seq), generator=g)
    positions = torch.arange(seq).unsqueeze(0).expand(rows, seq)
    return tokens, positions, torch.roll(tokens, -1, 1)


def make_similar(model) -> None:
    """Layers 1 and 2 become identities at init (zero output projections) and layers 2 and 3 get layer 1's
    norm and QKV weights: layers 1, 2, 3 then compute the same Q/K (cosine 1) and layer 0 other ones."""
    layers = model.decoder.layers
    with torch.no_grad():
        for i in (1, 2):
            layers[i].self_attention.linear_proj.weight.zero_()
            layers[i].mlp.linear_fc2.weight.zero_()
        for i in (2, 3):
            layers[i].input_layernorm.weight.copy_(layers[1].input_layernorm.weight)
            layers[i].self_attention.linear_qkv.weight.copy_(layers[1].self_attention.linear_qkv.weight)


# ====================================================================== one process

@pytest.fixture(scope="module")
def one_process(megatron_one_process):
    yield


def _packed_cosine(own, incoming) -> float:
    a = torch.cat([own[0].reshape(-1), own[1].reshape(-1)]).double()
    b = torch.cat([incoming[0].reshape(-1), incoming[1].reshape(-1)]).double()
    return F.cosine_similarity(a, b, dim=0).item()


def test_statistic_is_the_cosine_of_the_packed_qk():
    from effdist.epas.adaptive import cosine, qk_similarity_stats

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 2, 4, 16, generator=g), torch.randn(8, 2, 2, 16, generator=g)
    nq, nk = torch.randn(8, 2, 4, 16, generator=g), torch.randn(8, 2, 2, 16, generator=g)
    iq, ik = 0.6 * q + 0.4 * nq, 0.3 * k + 0.7 * nk  # correlated, neither identical nor orthogonal
    stats = qk_similarity_stats(q, k, iq, ik)
    assert stats.dtype == torch.float64 and stats.shape == (3,)
    direct = _packed_cosine((q, k), (iq, ik))
    assert 0.3 < direct < 0.95
    assert cosine(stats) == pytest.approx(direct, abs=1e-12)
    torch.testing.assert_close(qk_similarity_stats(q, k, iq, ik, chunk=77), stats, rtol=1e-12, atol=0)
    assert cosine(qk_similarity_stats(q, k, q, k)) == pytest.approx(1.0, abs=1e-12)
    assert cosine(qk_similarity_stats(q, k, 3 * q, 3 * k)) == pytest.approx(1.0, abs=1e-12)
    assert cosine(qk_similarity_stats(q, k, -q, -k)) == pytest.approx(-1.0, abs=1e-12)
    # Sums over microbatches (or ranks) give the cosine of the whole batch.
    halves = qk_similarity_stats(q[:, :1], k[:, :1], iq[:, :1], ik[:, :1]) + \
        qk_similarity_stats(q[:, 1:], k[:, 1:], iq[:, 1:], ik[:, 1:])
    assert cosine(halves) == pytest.approx(direct, abs=1e-12)
    assert math.isnan(cosine(qk_similarity_stats(q, k, 0 * q, 0 * k)))
    with pytest.raises(ValueError, match="cannot be compared"):
        qk_similarity_stats(q, k, iq[:4], ik)


def test_rank_zero_decision_in_a_world_of_one(one_process):
    from effdist.epas.adaptive import agree_on_growth

    stats = torch.tensor([[0.5, 1.0, 1.0], [2.8, 4.0, 4.0]], dtype=torch.float64)  # cosines 0.5, 0.7
    assert agree_on_growth(stats, 0.6) == (pytest.approx([0.5, 0.7]), False)  # every candidate must pass
    assert agree_on_growth(stats, 0.5)[1] is True  # at the threshold: grows
    assert agree_on_growth(torch.zeros(1, 3, dtype=torch.float64), -0.9)[1] is False  # nothing measured


def test_schedule_probe_steps_groups_transitions_and_final_region():
    from effdist.config import EpasConfig
    from effdist.epas.adaptive import AdaptiveSchedule

    e = EpasConfig(enabled=True, mode="adaptive", start_step=2, interval=3, group_size=2, final_region=5,
                   transition_steps=1)
    s = AdaptiveSchedule(e, 8)
    assert [t for t in range(15) if s.is_probe_step(t)] == [2, 5, 8, 11, 14]
    assert [s.candidates(t) for t in (0, 1, 2, 3)] == [(), (), (7, 6), ()]
    assert s.grow(2, (7, 6)) == 4
    assert s.blend_factors(3) == {6: 0.5, 7: 0.5} and s.sharing_layers(3) == frozenset()
    assert s.sharing_layers(4) == {6, 7} and s.blend_factors(4) == {}
    assert s.candidates(5) == (5, 4)  # no: the region stays, the same group probes again 3 steps later
    assert s.candidates(8) == (5, 4) and s.grow(8, (5, 4)) == 10
    assert s.candidates(11) == (3,)  # the last group stops at final_region = 5
    with pytest.raises(ValueError, match="candidates"):
        s.grow(11, (3, 2))
    s.grow(11, (3,))
    assert s.candidates(14) == () and s.sharing_layers(100) == {3, 4, 5, 6, 7}
    assert s.joins == {7: 4, 6: 4, 5: 10, 4: 10, 3: 13}
    s.check_joins(s.joins, 11)
    with pytest.raises(ValueError, match="no probe step"):
        s.check_joins(s.joins, 10)  # the last group's probe (step 11) had not run yet
    with pytest.raises(ValueError, match="no probe step"):
        s.check_joins({7: 5, 6: 5}, 20)  # 5 - 1 - 1 = 3 is not a probe step
    with pytest.raises(ValueError, match="one step"):
        s.check_joins({7: 4, 6: 10}, 20)
    with pytest.raises(ValueError, match="deepest"):
        s.check_joins({6: 4, 5: 4}, 20)

    t = EpasConfig(enabled=True, mode="adaptive", start_step=0, interval=4, group_size=1, final_region=2,
                   transition_steps=3)
    s = AdaptiveSchedule(t, 4)
    s.grow(0, (3,))
    # Progressive's blend formula: 1/(T+1) ... T/(T+1) over the T steps before the join step.
    assert [s.blend_factors(step) for step in range(5)] == [{}, {3: 0.25}, {3: 0.5}, {3: 0.75}, {}]


def _controller(cfg, model, **kw):
    from effdist.epas import EpasController

    messages = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return EpasController(cfg, [model], optimizer=optimizer, log=messages.append, **kw), optimizer, messages


def test_controller_decides_from_injected_similarities(one_process):
    """Stats written into the probing layers stand in for a forward: 0.7 (yes), 0.4 (no), exactly the
    threshold (yes), 0.9 (yes), then the region is full."""
    from effdist.epas import current_region

    cfg = make_cfg("epas.mode=adaptive", "epas.similarity_threshold=0.5", "epas.start_step=1", "epas.interval=2",
                   "epas.group_size=1", "epas.transition_steps=1")
    model = build(cfg)
    controller, optimizer, messages = _controller(cfg, model)
    attention = {i: layer.self_attention for i, layer in enumerate(model.decoder.layers)}
    inject = {1: 0.7, 3: 0.4, 5: 0.5, 7: 0.9}
    seen = []
    for step in range(11):
        region = controller.begin_step(step)
        probing = controller.probing
        assert current_region([model]) == controller.sharing_layers
        for i, attn in attention.items():
            assert attn.probing == (i in probing) and attn.probe_stats is None
            assert attn.exports_qk == ((i + 1) in controller.qk_consumers)
        assert controller.qk_consumers == controller.sharing_layers | controller.blending.keys() | set(probing)
        if step in inject:
            attention[probing[0]].probe_stats = torch.tensor([inject[step], 1.0, 1.0], dtype=torch.float64)
        controller.after_optimizer_step(optimizer)
        assert controller.probing == () and all(not a.probing for a in attention.values())
        seen.append((region, probing, controller.blending, controller.switched_this_step,
                     controller.step_metrics().get("epas_grow")))
    assert seen == [
        (0, (), {}, True, None),
        (0, (3,), {}, True, True),        # probe: 0.7 >= 0.5
        (0, (), {3: 0.5}, True, None),    # transition step
        (1, (2,), {}, True, False),       # layer 3 shares; layer 2 probes: 0.4 < 0.5
        (1, (), {}, True, None),
        (1, (2,), {}, True, True),        # again, 0.5: grows
        (1, (), {2: 0.5}, True, None),
        (2, (1,), {}, True, True),
        (2, (), {1: 0.5}, True, None),
        (3, (), {}, True, None),          # full: no more probes
        (3, (), {}, False, None),
    ]
    assert controller.join_steps == {3: 3, 2: 7, 1: 9}
    assert [(p["step"], p["layers"], p["grow"], p["joins_at"]) for p in controller.probes] == [
        (1, [3], True, 3), (3, [2], False, None), (5, [2], True, 7), (7, [1], True, 9)]
    assert controller.probes[1]["similarity"] == pytest.approx([0.4])
    # One line per probe, and (since the console change) one per region change: 0 -> 1 -> 2 -> 3.
    probe_lines = [m for m in messages if m.startswith("epas probe")]
    assert len(probe_lines) == 4 and "step 3: layers [2] cosine [0.4000] vs threshold 0.5: stay" in probe_lines[1]
    assert len(messages) == 4 + 3

    # Groups of two: the shallower candidate passes the future anchor's Q/K on to the deeper one.
    cfg2 = make_cfg("epas.mode=adaptive", "epas.group_size=2", "epas.interval=1", "epas.similarity_threshold=0.5")
    model2 = build(cfg2)
    controller2, optimizer2, _ = _controller(cfg2, model2)
    controller2.begin_step(0)
    a = [layer.self_attention for layer in model2.decoder.layers]
    assert controller2.probing == (3, 2) and a[2].probe_passes_incoming and not a[3].probe_passes_incoming
    assert [x.exports_qk for x in a] == [False, True, True, False]
    a[3].probe_stats = torch.tensor([0.9, 1.0, 1.0], dtype=torch.float64)
    a[2].probe_stats = torch.tensor([0.45, 1.0, 1.0], dtype=torch.float64)  # one of the group is not similar
    controller2.after_optimizer_step(optimizer2)
    assert controller2.step_metrics() == {"epas_similarity": pytest.approx([0.9, 0.45]),
                                          "epas_probed_layers": [3, 2], "epas_grow": False}
    assert controller2.begin_step(1) == 0 and controller2.probing == (3, 2)
    for layer, value in ((3, 0.8), (2, 0.6)):
        a[layer].probe_stats = torch.tensor([value, 1.0, 1.0], dtype=torch.float64)
    controller2.after_optimizer_step(optimizer2)
    assert controller2.begin_step(2) == 2 and controller2.probing == (1,)  # the last group: 1 layer


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_probing_layer_is_dense_bit_for_bit_and_measures_the_cosine(one_process):
    from effdist.epas import apply_region
    from effdist.epas.adaptive import cosine

    cfg = make_cfg()
    dense, probed = build(make_cfg("epas.enabled=false")), build(cfg)
    tokens, positions, labels = batch(3)
    captured = {}

    def capture(i, attn):
        original = attn.get_query_key_value_tensors

        def hooked(*a, **k):
            q, key, v = original(*a, **k)
            captured.setdefault(i, (q.detach().clone(), key.detach().clone()))
            return q, key, v
        attn.get_query_key_value_tensors = hooked

    for region, probing in ((set(), {3}), ({3}, {2}), ({3}, {1, 2}), (set(), {1, 2, 3})):
        reference = build(cfg)
        apply_region([reference], region)
        apply_region([probed], region, probing=probing)
        if not region:
            reference = dense  # region 0 + probing is the dense model
        for model in (reference, probed):
            model.zero_grad(set_to_none=True)
        out_ref = reference(tokens, positions, None, labels=labels).mean()
        out = probed(tokens, positions, None, labels=labels).mean()
        assert torch.equal(out_ref, out), (region, probing)
        out_ref.backward()
        out.backward()
        g_ref, g = _grads(reference), _grads(probed)
        for name in g_ref:
            assert torch.equal(g_ref[name], g[name]), (region, probing, name)
        # What it measured: the cosine of its own post-RoPE Q/K with its future anchor's (layer min(probing)-1),
        # which (RoPE rotating both alike) is the cosine of the pre-RoPE ones of the dense model.
        anchor = min(probing) - 1
        captured.clear()
        for i, layer in enumerate(dense.decoder.layers):
            capture(i, layer.self_attention)
        with torch.no_grad():
            dense(tokens, positions, None)
        for i, layer in enumerate(dense.decoder.layers):
            del layer.self_attention.get_query_key_value_tensors
        for i in probing:
            stats = probed.decoder.layers[i].self_attention.probe_stats
            assert cosine(stats) == pytest.approx(_packed_cosine(captured[i], captured[anchor]), abs=1e-5), (i, probing)
            assert abs(cosine(stats)) < 0.5, "random layers are not similar"

    # Evaluation forwards do not count; a full-recompute backward's re-forward does not count twice.
    apply_region([probed], set(), probing={3})
    probed.eval()
    with torch.no_grad():
        probed(tokens, positions, None)
    probed.train()
    assert probed.decoder.layers[3].self_attention.probe_stats is None
    probed(tokens, positions, None, labels=labels).mean().backward()
    once = probed.decoder.layers[3].self_attention.probe_stats.clone()
    recomputed = build(make_cfg("train.recompute=true"))
    apply_region([recomputed], set(), probing={3})
    recomputed(tokens, positions, None, labels=labels).mean().backward()
    torch.testing.assert_close(recomputed.decoder.layers[3].self_attention.probe_stats, once, rtol=1e-12, atol=0)

    # Identical Q/K (layer 1 an identity, layer 2 a copy of its Q/K) measure a cosine of 1.
    similar = build(cfg)
    make_similar(similar)
    apply_region([similar], set(), probing={2})
    similar(tokens, positions, None)
    assert cosine(similar.decoder.layers[2].self_attention.probe_stats) == pytest.approx(1.0, abs=1e-12)


def _train(cfg, steps: int, seed: int = 5, prepare=None):
    model = build(cfg, seed=seed)
    if prepare is not None:
        prepare(model)
    controller, optimizer, messages = _controller(cfg, model)
    out = []
    for step in range(steps):
        region = controller.begin_step(step)
        tokens, positions, labels = batch(100 + step)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, positions, None, labels=labels).mean()
        loss.backward()
        optimizer.step()
        controller.after_optimizer_step(optimizer)
        out.append((region, loss.item()))
    return out, controller, model, optimizer


def test_always_growing_adaptive_run_is_the_shifted_progressive_run(one_process):
    """Probing changes no number: an adaptive run whose probes all say yes trains exactly like the progressive
    run whose joins fall on the same steps (start_step + 1 + transition_steps); a threshold no probe reaches
    keeps the region at 0, as dense as region 0."""
    common = ["epas.interval=2", "epas.group_size=1", "epas.transition_steps=1"]
    adaptive, controller, _, _ = _train(make_cfg("epas.mode=adaptive", "epas.similarity_threshold=-0.5",
                                                 "epas.start_step=0", *common), 8)
    progressive, _, _, _ = _train(make_cfg("epas.start_step=2", *common), 8)
    assert [r for r, _ in adaptive] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert adaptive == progressive
    never, controller, _, _ = _train(make_cfg("epas.mode=adaptive", "epas.similarity_threshold=0.9",
                                              "epas.start_step=0", *common), 5)
    region0, _, _, _ = _train(make_cfg("epas.start_step=100", *common), 5)
    assert [r for r, _ in never] == [0] * 5 and never == region0
    assert [p["grow"] for p in controller.probes] == [False] * 3


def test_state_dict_restores_decided_joins_and_checks_them(one_process):
    from effdist.epas import EpasError

    cfg = make_cfg("epas.mode=adaptive", "epas.similarity_threshold=0.5", "epas.start_step=0", "epas.interval=2",
                   "epas.transition_steps=1")
    trained, controller, model, _ = _train(cfg, 6, prepare=make_similar)
    # Layers 3 and 2 copy layer 1 (probes at 0 and 2 say yes), layer 1 does not resemble layer 0 (step 4: no).
    assert [p["grow"] for p in controller.probes] == [True, True, False]
    state = controller.state_dict()
    assert state["version"] == 2 and state["schedule"]["similarity_threshold"] == 0.5
    assert state["adaptive"]["joins"] == [[2, 4], [3, 2]] and state["sharing_layers"] == [2, 3]
    resumed_model = build(cfg)
    resumed, optimizer, _ = _controller(cfg, resumed_model)
    resumed.load_state_dict(state)
    assert resumed.join_steps == {3: 2, 2: 4} and resumed.sharing_layers == {2, 3}
    assert resumed.probes == controller.probes
    assert resumed.begin_step(6) == 2 and resumed.probing == (1,) and resumed.switched_this_step

    # The joins decide the region: one tampered with, or one this schedule's probes could not decide, is refused.
    bad = dict(state, adaptive={"joins": [[2, 4], [3, 3]]})
    with pytest.raises(EpasError, match="join steps"):
        _controller(cfg, build(cfg))[0].load_state_dict(bad)
    with pytest.raises(EpasError, match="gives"):
        _controller(cfg, build(cfg))[0].load_state_dict(dict(state, sharing_layers=[3]))
    with pytest.raises(EpasError, match="join steps"):
        _controller(make_cfg("epas.mode=adaptive", "epas.start_step=1", "epas.interval=2",
                             "epas.transition_steps=1"), build(cfg))[0].load_state_dict(state)
    # Modes do not mix on resume; a progressive version-1 state still loads into a progressive run.
    progressive_cfg = make_cfg("epas.start_step=1", "epas.interval=2")
    with pytest.raises(EpasError, match="epas.mode = adaptive"):
        _controller(progressive_cfg, build(cfg))[0].load_state_dict(state)
    old = {"version": 1, "step": 3, "region": 2, "sharing_layers": [2, 3], "num_layers": 4,
           "schedule": {"mode": "progressive", "transition_steps": 0}}
    loaded, _, _ = _controller(progressive_cfg, build(cfg))
    loaded.load_state_dict(old)
    assert loaded.sharing_layers == {2, 3}
    with pytest.raises(EpasError, match="epas.mode = progressive"):
        _controller(cfg, build(cfg))[0].load_state_dict(old)


@pytest.mark.parametrize("override, field", [
    ("epas.similarity_threshold=1.5", "epas.similarity_threshold"),
    ("epas.similarity_threshold=-1", "epas.similarity_threshold"),     # cos >= -1 always: use progressive
    ("epas.similarity_threshold=nan", "epas.similarity_threshold"),
    ("epas.similarity_threshold=high", "epas.similarity_threshold"),   # not a number
    ("epas.direction=shallow_to_deep", "epas.direction"),
    ("epas.transition_steps=2", "epas.transition_steps"),               # must be below interval = 2
])
def test_adaptive_config_errors_name_the_field(override, field):
    from effdist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["epas.enabled=true", "model.num_layers=4", "epas.final_region=3", "epas.mode=adaptive",
                           "epas.interval=2", override])


def test_adaptive_config_is_accepted_and_pure_schedule_functions_refuse_it():
    from effdist.config import ConfigError, EpasConfig, load_config
    from effdist.epas import check_schedule, sharing_layers, steps_to_final_region

    cfg = load_config(None, ["epas.enabled=true", "model.num_layers=4", "epas.final_region=3", "epas.mode=adaptive",
                             "epas.similarity_threshold=1"])
    assert cfg.epas.mode == "adaptive" and cfg.epas.similarity_threshold == 1.0
    assert EpasConfig().similarity_threshold == 0.5
    with pytest.raises(ConfigError, match=r"epas\.similarity_threshold = '0\.5'"):
        check_schedule(EpasConfig(enabled=True, mode="adaptive", final_region=2, similarity_threshold="0.5"), 4)
    for fn in (sharing_layers, steps_to_final_region):
        with pytest.raises(ValueError, match="adaptive"):
            fn(cfg.epas, 4, *([0] if fn is sharing_layers else []))


# ====================================================================== real processes: the trainer

STEPS = 12
RUN = [f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "data.seq_length=64",
       "logging.tensorboard=false", "checkpoint.interval=4", "optim.warmup_steps=2", "epas.enabled=true",
       "epas.mode=adaptive", "epas.start_step=1", "epas.interval=2", "epas.group_size=1", "epas.final_region=3",
       "epas.transition_steps=1",
       # Random layers measure cosines near 0 (printed in the log): -0.5 says yes with a wide margin.
       "epas.similarity_threshold=-0.5"]
# Probes at steps 1, 3, 5 (layers 3, 2, 1) -> join steps 3, 5, 7, each after one blending step; logged 1-based.
REGIONS = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2, 7: 2, 8: 3, 9: 3, 10: 3, 11: 3, 12: 3}


def _regions(run_dir):
    return losses(run_dir, "epas_region")


def _epas_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "common.pt", weights_only=False)["common"]["epas"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Every real-process run of this file, two at a time: the one-process trainer run (then resumed from its
    step-4 checkpoint), the TP=2 and PP=2 trainer runs (one data cache) and the worker launches. The TP=2/PP=2
    and resumed runs save only at the end (the tests read their final EPAS state)."""
    from tests.launching import in_parallel

    root = tmp_path_factory.mktemp("adaptive")
    run = RUN + [f"data.cache_dir={root / 'data'}"]
    final_only = ["checkpoint.interval=0"]

    def single_then_resumed():
        single = run_train(root / "single", run)
        # Killed after step 4: its metrics and its step-4 checkpoint.
        resumed = root / "resumed"
        shutil.copytree(root / "single", resumed)
        for later in (8, 12):
            shutil.rmtree(resumed / "checkpoints" / f"iter_{later:07d}")
        (resumed / "checkpoints" / "latest").write_text("iter_0000004")
        return single.stderr, run_train(resumed, run + final_only).stderr

    jobs = {"single": single_then_resumed,
            "tp2": lambda: run_train(root / "tp2", run + final_only + ["parallel.tp=2"], 2),
            "pp2": lambda: run_train(root / "pp2", run + final_only + ["parallel.pp=2"], 2),
            "workers": lambda: _run_workers(root / "workers")}
    out = in_parallel(jobs)
    out["single"], out["resumed"] = out["single"]
    return root, out


@pytest.fixture(scope="module")
def single(launches):
    root, out = launches
    return root / "single", out["single"]


@pytest.mark.slow
def test_trainer_tp2_and_pp2_follow_one_process(single, launches):
    """Same decisions, regions and losses with TP=2 and with PP=2, where layer 2 (first of stage 1) probes at
    step 3 against layer 1's Q/K, blends with them at step 4 and shares them from step 5."""
    run, stderr = single
    assert _regions(run) == REGIONS
    for step, layer, joins in ((1, 3, 3), (3, 2, 5), (5, 1, 7)):
        assert f"epas probe at step {step}: layers [{layer}] cosine" in stderr
        assert f"grow (they share from step {joins})" in stderr
    state = _epas_state(run / "checkpoints" / "iter_0000004")
    assert state["step"] == 3 and state["sharing_layers"] == [3]
    assert state["adaptive"]["joins"] == [[2, 5], [3, 3]]  # decided at step 3, joins after step 4's blend
    root, _ = launches
    reference = losses(run)
    for name in ("tp2", "pp2"):
        assert _regions(root / name) == REGIONS, name
        got = losses(root / name)
        for s, v in reference.items():
            assert got[s] == pytest.approx(v, rel=2e-5), (name, s)
        final = _epas_state(root / name / "checkpoints" / f"iter_{STEPS:07d}")["adaptive"]
        assert final["joins"] == [[1, 7], [2, 5], [3, 3]]
        want = _epas_state(run / "checkpoints" / f"iter_{STEPS:07d}")["adaptive"]["probes"]
        assert [p["similarity"] for p in final["probes"]] == [pytest.approx(p["similarity"], abs=1e-5) for p in want]


@pytest.mark.slow
def test_trainer_resume_between_a_decision_and_its_join(single, launches):
    """Killed after step 4 (layer 2 decided at step 3, blending at step 4, joining at 5): the resumed run
    takes the decided joins from the checkpoint, probes only from step 5 on, and repeats region and losses."""
    source, _ = single
    root, out = launches
    run, stderr = root / "resumed", out["resumed"]
    assert "resumed from" in stderr
    assert "epas probe at step 5: layers [1]" in stderr and "epas probe at step 3" not in stderr
    assert _regions(run) == REGIONS
    for s, v in losses(source).items():
        assert losses(run)[s] == pytest.approx(v, rel=1e-6, abs=0), s
    final = _epas_state(run / "checkpoints" / f"iter_{STEPS:07d}")
    want = _epas_state(source / "checkpoints" / f"iter_{STEPS:07d}")
    assert final["adaptive"]["joins"] == want["adaptive"]["joins"] == [[1, 7], [2, 5], [3, 3]]
    assert final["sharing_layers"] == want["sharing_layers"] == [1, 2, 3]
    assert [p["similarity"] for p in final["adaptive"]["probes"]] == [
        pytest.approx(p["similarity"], rel=1e-6) for p in want["adaptive"]["probes"]]


# ====================================================================== real processes: the worker

WORKER_STEPS = 8
LR = 1e-4
# Probes at 0, 2, 4, 6: layer 3 ~ layer 2 (yes), layer 2 ~ layer 1 (yes), layer 1 vs layer 0 (no, twice).
ADAPTIVE = ["epas.mode=adaptive", "epas.similarity_threshold=0.5", "epas.start_step=0", "epas.interval=2",
            "epas.group_size=1", "epas.transition_steps=0"]


# name: (processes, tp, sabotage); the two-process layouts run one after the other in one launch.
LAYOUTS = {"single": (1, 1, False), "dp2": (2, 1, True), "tp2": (2, 2, True)}


def worker(names: list[str], out: Path) -> None:
    import torch.distributed as dist

    from effdist.runtime import cpu_compat

    cpu_compat.install()
    dist.init_process_group("gloo")
    for name in names:
        _, tp, sabotage = LAYOUTS[name]
        record = train_similar_layers(tp, sabotage)
        (out / f"{name}.rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def train_similar_layers(tp: int, sabotage: bool) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    rank = dist.get_rank()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, 1, create_gloo_process_groups=False)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group()
    cfg = make_cfg(f"parallel.tp={tp}", *ADAPTIVE)
    if sabotage and rank == 1:
        cfg.epas.similarity_threshold = 1.0  # rank 1 alone would say no at every probe
    model = build(cfg, seed=11)
    make_similar(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    from effdist.epas import EpasController

    controller = EpasController(cfg, [model], optimizer=optimizer, log=lambda message: None)
    record = {"regions": [], "probing": [], "losses": [], "grow": [], "similarity": []}
    for step in range(WORKER_STEPS):
        record["regions"].append(controller.begin_step(step))
        record["probing"].append(list(controller.probing))
        tokens, positions, labels = batch(100 + step, rows=4, seq=32)
        rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)
        model.zero_grad(set_to_none=True)
        loss = model(tokens[rows], positions[rows], None, labels=labels[rows]).mean()
        loss.backward()
        if dp > 1:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad /= dp
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=dp_group)
            loss /= dp
        optimizer.step()
        controller.after_optimizer_step(optimizer)
        record["losses"].append(loss.item())
        metrics = controller.step_metrics()
        if metrics:
            record["grow"].append(metrics["epas_grow"])
            record["similarity"].append(metrics["epas_similarity"])
    record["threshold"] = cfg.epas.similarity_threshold
    parallel_state.destroy_model_parallel()
    return record


def _run_workers(out: Path) -> dict[str, list[dict]]:
    """The one-process worker and the two-process one (DP=2, then TP=2) side by side: {layout: [record per rank]}."""
    out.mkdir(parents=True, exist_ok=True)
    env = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    launches = {1: ["single"], 2: ["dp2", "tp2"]}
    procs = {nproc: subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={nproc}", str(Path(__file__).resolve()), "--out", str(out),
                                      *names], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
             for nproc, names in launches.items()}
    for nproc, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{launches[nproc]} failed:\n{output[-6000:]}"
    return {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(nproc)]
            for name, (nproc, _, _) in LAYOUTS.items()}


@pytest.mark.slow
def test_rank_zero_decides_for_every_layout(launches):
    """Similar layers grow the region twice, then a probe says no twice. DP=2 and TP=2 measure the same cosines
    (statistics summed over all ranks) and switch at the same steps as one process, although rank 1 there has
    a threshold of 1.0 that would refuse every probe: the decision is rank 0's, broadcast."""
    _, out = launches
    results = out["workers"]
    reference = results["single"][0]
    assert reference["regions"] == [0, 1, 1, 2, 2, 2, 2, 2]
    assert reference["probing"] == [[3], [], [2], [], [1], [], [1], []]
    assert reference["grow"] == [True, True, False, False]
    similar, different = [c for (c,) in reference["similarity"][:2]], [c for (c,) in reference["similarity"][2:]]
    assert min(similar) > 0.9 and max(abs(c) for c in different) < 0.3, reference["similarity"]
    for name in ("dp2", "tp2"):
        assert results[name][1]["threshold"] == 1.0
        for rank, got in enumerate(results[name]):
            for key in ("regions", "probing", "grow"):
                assert got[key] == reference[key], (name, rank, key)
            assert got["similarity"] == [pytest.approx(c, abs=1e-5) for c in reference["similarity"]], (name, rank)
            assert got["losses"] == [pytest.approx(v, rel=1e-5) for v in reference["losses"]], (name, rank)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("layouts", nargs="+", choices=sorted(LAYOUTS))
    args = parser.parse_args()
    worker(args.layouts, args.out)
