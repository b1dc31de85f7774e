"""HF LLaMA <-> effdist conversion: a small random LlamaForCausalLM made here gives the same logits
once converted (fp32), and converting back reproduces its tensors bit for bit, through the
functions and through `effdist convert` (torch file and dist_checkpointing directory)."""

from __future__ import annotations

import pytest
import torch

from effdist.model.hf_convert import (
    ConversionError,
    config_from_hf,
    effdist_to_hf,
    hf_to_effdist,
    load_hf_checkpoint,
    load_torch,
    main,
    one_process_megatron,
)

transformers = pytest.importorskip("transformers")

VOCAB = 100  # pads to 128 in effdist: the padding must vanish again on the way back


@pytest.fixture(scope="module", autouse=True)
def megatron_one_process():
    with one_process_megatron():
        yield


def make_hf_model(tmp_path, tie: bool = False, **overrides):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie, **overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initialises norms to 1: make them tell layers apart
                p.uniform_(0.5, 1.5)
    path = tmp_path / ("hf_tied" if tie else "hf")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def effdist_logits(cfg, sd, tokens, epas_region: int | None = None):
    from effdist.config import config_from_dict
    from effdist.epas import set_region
    from effdist.model.gpt import build_gpt

    cfg = config_from_dict(cfg.to_dict())
    if epas_region is not None:
        cfg.epas.enabled = True
    model = build_gpt(cfg, torch.float32, torch.device("cpu"))
    model.load_state_dict(sd, strict=True)
    if epas_region is not None:
        set_region([model], epas_region)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


@pytest.mark.parametrize("tie", [False, True])
def test_converted_model_gives_the_hf_logits(tmp_path, tie):
    hf_model, path = make_hf_model(tmp_path, tie=tie)
    hf_config, hf_sd = load_hf_checkpoint(path)
    cfg = config_from_hf(hf_config)
    assert (cfg.model.num_query_groups, cfg.model.tie_embeddings, cfg.model.vocab_size) == (2, tie, VOCAB)
    sd = hf_to_effdist(hf_sd, cfg)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
    for region in (None, 0):  # the plain model, and the EPAS model at region 0
        got = effdist_logits(cfg, sd, tokens, epas_region=region)
        assert got.shape == (2, 24, 128)
        torch.testing.assert_close(got[..., :VOCAB], expected, rtol=1e-5, atol=1e-5)
    # A sharing region changes the function (the comparison can fail).
    shared = effdist_logits(cfg, sd, tokens, epas_region=2)
    assert (shared[..., :VOCAB] - expected).abs().max() > 1e-3


def test_round_trip_is_exact(tmp_path):
    _, path = make_hf_model(tmp_path)
    hf_config, hf_sd = load_hf_checkpoint(path)
    cfg = config_from_hf(hf_config)
    back = effdist_to_hf(hf_to_effdist(hf_sd, cfg), cfg)
    assert back.keys() == hf_sd.keys()
    for k, v in hf_sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize("fmt", ["torch", "dist"])
def test_convert_command_both_ways(tmp_path, fmt):
    hf_model, path = make_hf_model(tmp_path)
    out = tmp_path / ("model.pt" if fmt == "torch" else "model_dist")
    assert main(["hf-to-effdist", "--hf-dir", str(path), "--out", str(out), "--format", fmt,
                 "--config-out", str(tmp_path / "cfg.yaml")]) == 0
    from effdist.config import load_config

    cfg = load_config(tmp_path / "cfg.yaml")
    assert cfg.model.num_layers == 3 and cfg.model.ffn_hidden_size == 96
    if fmt == "torch":
        saved_cfg, sd = load_torch(out)
        assert saved_cfg.model == cfg.model
        assert torch.equal(sd["decoder.layers.1.mlp.linear_fc2.weight"], hf_model.model.layers[1].mlp.down_proj.weight)
    back_dir = tmp_path / "hf_back"
    assert main(["effdist-to-hf", "--checkpoint", str(out), "--out", str(back_dir)]) == 0
    _, original = load_hf_checkpoint(path)
    _, back = load_hf_checkpoint(back_dir)
    assert back.keys() == original.keys()
    for k in original:
        assert torch.equal(back[k], original[k]), k
    reloaded = transformers.LlamaForCausalLM.from_pretrained(back_dir).float().eval()
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf_model(tokens).logits, rtol=0, atol=0)


def test_unsupported_checkpoints_are_named(tmp_path):
    _, path = make_hf_model(tmp_path)
    hf_config, hf_sd = load_hf_checkpoint(path)
    with pytest.raises(ConversionError, match="rope"):
        config_from_hf(dict(hf_config, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(ConversionError, match="hidden_act"):
        config_from_hf(dict(hf_config, hidden_act="gelu"))
    cfg = config_from_hf(hf_config)
    missing = dict(hf_sd)
    del missing["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="up_proj"):
        hf_to_effdist(missing, cfg)
    wrong = dict(hf_sd, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(ConversionError, match="shape"):
        hf_to_effdist(wrong, cfg)
    assert main(["hf-to-effdist", "--hf-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")]) == 2
